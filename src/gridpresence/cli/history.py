"""``gridpresence history DEVICE… [--from T] [--to T] [--every 1m] --csv|--xlsx|--json``: the
historian's data in self-describing form ([00100]): CSV whose header names each column and its
unit, a workbook with one sheet per device and a chart of its load profile ([00103]), or JSON
with the units and the device's events (state, health, alarms, command outcomes)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gridpresence.cli.common import EXIT_OK, CliError
from gridpresence.services.historian import HISTORY_FILE, METRIC_UNITS, HistoryStore, StoreError, open_store
from gridpresence.services.historian.store import epoch, instant
from gridpresence.xmpp.session import ConnectionInfo, SessionError, connection_path

_SPAN = re.compile(r"^(\d+)\s*(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_ROWS = 1_000_000  # a sheet holds 1,048,576 rows; refuse rather than write a truncated file


def span_s(text: str) -> int:
    """`--every`: "raw" (0), or a whole number of seconds, minutes, hours or days ("1m", "15m")."""
    if text.strip().lower() == "raw":
        return 0
    m = _SPAN.match(text.strip().lower())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"must be raw or a step like 30s, 1m, 15m, 1h, 1d, not {text[:40]!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


span_s.__name__ = "step"  # type: ignore[attr-defined]


def when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`--from`/`--to`: "now", a time ago ("-2h", "-30m", "-1d") or ISO 8601 with a time zone."""
    now = now or dt.datetime.now(dt.timezone.utc)
    t = text.strip()
    if t.lower() == "now":
        return now
    if t.startswith("-") and _SPAN.match(t[1:].lower()):
        return now - dt.timedelta(seconds=span_s(t[1:]))
    try:
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be now, -2h style or ISO 8601 (2026-05-01T12:00Z), not {t[:40]!r}") \
            from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{t[:40]!r} has no time zone: add Z or +01:00")
    return parsed


when.__name__ = "time"  # type: ignore[attr-defined]


def find_store(args: argparse.Namespace) -> HistoryStore:
    """--history, else the store connection.json names, else DATA/history.sqlite."""
    url = args.history
    if url is None:
        path = connection_path(args.connection, args.data)
        try:
            url = ConnectionInfo.load(path).history
        except SessionError:
            url = None
        url = url or str(path.parent / HISTORY_FILE)
    if not url.startswith(("postgresql://", "postgres://")) and not Path(url).exists():
        raise CliError(f"{url}: no history recorded there; `gridpresence up` records it (or give --history)")
    try:
        return open_store(url)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def metric_order(store: HistoryStore, device: str) -> list[str]:
    stored = set(store.metrics(device))
    return [m for m in METRIC_UNITS if m in stored]


def device_rows(store: HistoryStore, device: str, start: float, end: float, every_s: int) -> tuple[list[str], list[list[Any]]]:
    """The device's metrics side by side, one row per instant (a metric missing there is None)."""
    metrics = metric_order(store, device)
    table: dict[float, list[Any]] = {}
    for i, metric in enumerate(metrics):
        for p in store.series(device, metric, start, end, every_s):
            table.setdefault(p.ts, [None] * len(metrics))[i] = round(p.mean, 6)
    if len(table) > MAX_ROWS:
        raise CliError(f"{device}: {len(table)} rows between those times; choose a coarser --every or a shorter span")
    return metrics, [[ts, *vals] for ts, vals in sorted(table.items())]


def header(metric: str) -> str:
    return f"{metric} ({METRIC_UNITS[metric]})"


def write_csv(out: io.TextIOBase, data: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
    metrics = [m for m in METRIC_UNITS if any(m in ms for ms, _ in data.values())]
    w = csv.writer(out)
    w.writerow(["device", "time (UTC, ISO 8601)", *map(header, metrics)])
    for device, (ms, rows) in data.items():
        for ts, *vals in rows:
            by = dict(zip(ms, vals))
            w.writerow([device, instant(ts).isoformat(), *("" if by.get(m) is None else by[m] for m in metrics)])


def write_xlsx(path: Path, data: dict[str, tuple[list[str], list[list[Any]]]], every_s: int) -> None:
    from openpyxl import Workbook
    from openpyxl.chart import LineChart, Reference
    from openpyxl.styles import Font

    book = Workbook()
    book.remove(book.active)  # type: ignore[arg-type]
    for device, (metrics, rows) in data.items():
        sheet = book.create_sheet(_sheet_name(device, book.sheetnames))
        sheet.append(["time (UTC)", *map(header, metrics)])
        for cell in sheet[1]:
            cell.font = Font(bold=True)
        for ts, *vals in rows:
            sheet.append([instant(ts).replace(tzinfo=None), *vals])  # Excel has no time zones: UTC, as the header says
        for (cell,) in sheet.iter_rows(min_row=2, max_col=1):
            cell.number_format = "yyyy-mm-dd hh:mm:ss"
        sheet.column_dimensions["A"].width = 20
        sheet.freeze_panes = "A2"
        profile = "kw" if "kw" in metrics else (metrics[0] if metrics else None)
        if profile and rows:
            col = 2 + metrics.index(profile)
            chart = LineChart()
            chart.title = f"{device}: load profile ({'raw' if not every_s else f'every {every_s} s'})"
            chart.y_axis.title = header(profile)
            chart.x_axis.title = "time (UTC)"
            chart.x_axis.number_format = "hh:mm"
            chart.add_data(Reference(sheet, min_col=col, min_row=1, max_row=len(rows) + 1), titles_from_data=True)
            chart.set_categories(Reference(sheet, min_col=1, min_row=2, max_row=len(rows) + 1))
            chart.width, chart.height = 24, 10
            sheet.add_chart(chart, f"{chr(ord('A') + len(metrics) + 2)}2")
    if not book.sheetnames:
        book.create_sheet("no data")
    book.save(path)


def _sheet_name(device: str, taken: list[str]) -> str:
    """Excel's rules: at most 31 characters, none of []:*?/\\, unique."""
    base = re.sub(r"[\[\]:*?/\\]", "_", device)[:31]
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base[:28]}~{n}"
    return name


def as_json(store: HistoryStore, data: dict[str, tuple[list[str], list[list[Any]]]], start: float, end: float,
            every_s: int) -> dict[str, Any]:
    return {
        "from": instant(start).isoformat(), "to": instant(end).isoformat(), "every_s": every_s,
        "units": {m: METRIC_UNITS[m] for m in METRIC_UNITS},
        "devices": {
            device: {
                "columns": ["time", *metrics],
                "rows": [[instant(ts).isoformat(), *vals] for ts, *vals in rows],
                "events": [{"time": instant(e.ts).isoformat(), "event": e.kind, "detail": e.detail}
                           for e in store.events(device, start, end)],
            } for device, (metrics, rows) in data.items()
        },
    }


async def cmd_history(args: argparse.Namespace) -> int:
    if args.start >= args.end:
        raise CliError("--from must be before --to")
    fmt = "xlsx" if args.xlsx else "json" if args.json else "csv"
    if fmt == "xlsx" and not args.out:
        raise CliError("--xlsx writes a file: give --out FILE.xlsx")
    store = find_store(args)
    try:
        known = set(store.devices())
        unknown = [d for d in args.devices if d not in known]
        if unknown:
            raise CliError(f"nothing recorded for {', '.join(repr(d[:40]) for d in unknown)}"
                           f" (recorded: {', '.join(sorted(known)[:10]) or 'nothing yet'})")
        start, end = epoch(args.start), epoch(args.end)
        data = {d: device_rows(store, d, start, end, args.every) for d in dict.fromkeys(args.devices)}
        if fmt == "xlsx":
            write_xlsx(Path(args.out), data, args.every)
            return EXIT_OK
        text = io.StringIO(newline="")
        if fmt == "csv":
            write_csv(text, data)
        else:
            json.dump(as_json(store, data, start, end, args.every), text, indent=1)
            text.write("\n")
    finally:
        store.close()
    if args.out:
        Path(args.out).write_text(text.getvalue(), encoding="utf-8", newline="")
    else:
        sys.stdout.write(text.getvalue())
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("history", help="export the historian's data: CSV, XLSX (a sheet per device) or JSON")
    p.add_argument("devices", nargs="+", metavar="DEVICE")
    p.add_argument("--from", dest="start", type=when, default=when("-1h"),
                   help="start: now, -2h, -1d (write --from=-2h) or ISO 8601 with a time zone (default: an hour ago)")
    p.add_argument("--to", dest="end", type=when, default=when("now"), help="end (default: now)")
    p.add_argument("--every", type=span_s, default=60, help="step: raw, 30s, 1m (default), 15m, 1h, 1d")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV, a header naming columns and units (default)")
    fmt.add_argument("--xlsx", action="store_true", help="an Excel workbook, one sheet and chart per device")
    fmt.add_argument("--json", action="store_true", help="JSON with units and each device's events")
    p.add_argument("--out", help="write to this file (default: standard output; --xlsx needs it)")
    p.add_argument("--history", metavar="URL", help="the store: a SQLite file or postgresql://… "
                                                    "(default: the one connection.json names)")
    p.add_argument("--connection", help="connection.json written by `up`")
    p.add_argument("--data", help="the grid's data directory (its history.sqlite)")
    p.set_defaults(run=cmd_history)


__all__: Sequence[str] = ["register", "span_s", "when"]
