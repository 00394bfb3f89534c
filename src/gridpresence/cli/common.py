"""What every sub-command shares: defaults, exit codes, the error type printed without a traceback,
the operator options, and logging in as an operator for one command."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gridpresence.cli import argtypes
from gridpresence.operator.library import UNHEARD_QUIET_S, GridOperator
from gridpresence.protocol.models import Outcome
from gridpresence.xmpp.session import ConnectionInfo, connection_path

DEFAULT_DATA = Path(".gridpresence")
DEFAULT_FLEET = Path(__file__).resolve().parents[3] / "bots" / "demo-fleet.toml"  # the checkout's bots/
COMMAND_ACTIONS = ("shed", "restore", "start", "stop", "open", "close", "read")

EXIT_OK, EXIT_FAILED_OUTCOME, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """An error for the person at the terminal: printed without a traceback, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C ended an operator's command: `waiting` commands it sent (or adopted) still had no
    outcome. They were not withdrawn and stay in the pending store (`where`)."""

    def __init__(self, waiting: int, where: Path | None) -> None:
        super().__init__(waiting, where)
        self.waiting, self.where = waiting, where

    def __str__(self) -> str:
        one = self.waiting == 1
        return (f"interrupted: {self.waiting} command{'' if one else 's'} sent had no outcome yet. "
                f"{'It was' if one else 'They were'} not withdrawn: a device that gets "
                f"{'it' if one else 'one'} before it expires still runs it. "
                f"{'It stays' if one else 'They stay'} pending in {self.where}; "
                f"`gridpresence pending` reports {'its outcome' if one else 'their outcomes'}.")


def outcome_dict(name: str, outcome: Outcome) -> dict[str, Any]:
    data = outcome.model_dump(mode="json", exclude_none=True)
    data["name"] = name
    return data


def operator_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connection", help="connection.json written by `up`")
    p.add_argument("--as", dest="operator", help="operator name (default: the first)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--settle", type=argtypes.non_negative, default=1.0, metavar="S",
                   help="on connect, wait for presence until S seconds pass without a device newly heard from "
                        f"(default 1, at least {UNHEARD_QUIET_S:g} while some have sent nothing yet; a fleet "
                        "still answering is waited out; 0 waits for nothing)")


async def with_operator(args: argparse.Namespace, body: Callable[[GridOperator], Awaitable[int]]) -> int:
    info = ConnectionInfo.load(connection_path(args.connection))
    grid = GridOperator.from_connection(info, operator=args.operator)
    await grid.connect(settle_s=args.settle)
    try:
        return await body(grid)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or not task.cancelling():
            raise
        # Ctrl-C (asyncio.run cancels this task): the waits were cancelled, so every command
        # still without an outcome is on disk by now (operator/issuer.py send); say so.
        store = grid.issuer.store
        raise Interrupted(store.waiting_here(), store.directory) from None
    finally:
        await grid.close()
