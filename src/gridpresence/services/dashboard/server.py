"""The grid's dashboard ([00102]-[00103], [00146]): an HTTPS page where an operator, logged in
with their grid account, sees the branch hierarchy live, trends from the historian and the open
alarms, and acts: command buttons send commands signed with that operator's key, alarm buttons
say the same signed chat lines as `gridpresence ack` / `judge`.

Each logged-in operator gets their own GridOperator session (their account, their key): what
the page does is done, and audited, under their name. Updates are pushed as server-sent events.
Nothing but the login form is served without a session cookie.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from typing import Any

from aiohttp import web

from gridpresence.config import Fleet
from gridpresence.operator.library import GridOperator, UnknownDevice
from gridpresence.operator.shedding import net_load_kw
from gridpresence.protocol.alarm import Alarm, AlarmLevel, AlarmStatus
from gridpresence.protocol.models import Action, Outcome
from gridpresence.security.ox import OxRefused
from gridpresence.services.historian import HistoryStore, StoreError, open_store
from gridpresence.xmpp.session import ConnectionInfo, SessionError

log = logging.getLogger(__name__)

COOKIE = "gp_session"
PUSH_EVERY_S = 0.25  # at most four snapshots a second per page, however busy the grid
ACTIONS_BY_KIND = {"load": ("shed", "restore"), "generator": ("start", "stop"), "breaker": ("open", "close"),
                   "meter": ("read",), "master": ("read",)}
VERDICTS = {"ack": "ack {id}", "not-a-fault": "not a fault {id}", "fault": "fault {id}"}
MAX_BODY = 4096
# A page that is closed must not leave its operator "available" to the devices (alarms would go to
# a session nobody reads): a session without an open page for this long is logged out.
IDLE_S = 60.0


@dataclass
class _Session:
    operator: str
    grid: GridOperator
    alarms: dict[tuple[str, str], Alarm] = field(default_factory=dict)  # newest state by (device, id)
    pages: int = 0  # open event streams
    idle: asyncio.TimerHandle | None = None


class Dashboard:
    def __init__(self, fleet: Fleet, connection: Callable[[], ConnectionInfo], passwords: Mapping[str, str],
                 history: str | None, cert: tuple[str, str], bind: str = "127.0.0.1", port: int = 0,
                 record_outcome: Callable[[str, str, Outcome], None] | None = None) -> None:
        self.fleet = fleet
        self._connection = connection
        self._passwords = passwords  # operator name -> grid password (the secrets file)
        self._history_url = history
        self._cert = cert
        self.bind, self.port = bind, port
        self._sessions: dict[str, _Session] = {}
        self._record_outcome = record_outcome  # the historian keeps what the page's commands did
        self._runner: web.AppRunner | None = None
        self._store: HistoryStore | None = None

    @property
    def url(self) -> str:
        return f"https://{self.bind}:{self.port}/"

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.add_routes([web.get("/", self._index), web.post("/login", self._login), web.post("/logout", self._logout),
                        web.get("/events", self._events), web.get("/api/history", self._history),
                        web.post("/api/command", self._command), web.post("/api/alarm", self._alarm)])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*self._cert)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.port, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for token in list(self._sessions):
            await self._end(token)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            self._store.close()

    # -- authentication -------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except web.HTTPException:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # malformed input: say so, keep serving
            return web.json_response({"error": f"bad request: {exc}"}, status=400)

    def _session(self, request: web.Request) -> _Session:
        token = request.cookies.get(COOKIE, "")
        session = self._sessions.get(token)
        if session is None:
            raise web.HTTPUnauthorized(text="log in first", content_type="text/plain")
        return session

    def check_password(self, operator: str, password: str) -> bool:
        known = self._passwords.get(operator) if operator in {o.name for o in self.fleet.operators} else None
        # compare_digest on both paths: no timing tells which operator names exist
        return hmac.compare_digest((known or "\0").encode(), password.encode()) and known is not None

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        operator, password = str(form.get("operator", "")).strip()[:300], str(form.get("password", ""))[:200]
        if operator.endswith(f"@{self.fleet.domain}"):  # the JID `up` prints, or the bare name
            operator = operator.rsplit("@", 1)[0]
        if not self.check_password(operator, password):
            log.warning("dashboard: refused a login as %r", operator)
            return web.Response(status=403, content_type="text/html", text=_page("login", error="Wrong operator or password."))
        info = self._connection()
        token = secrets.token_urlsafe(32)
        grid = GridOperator.from_connection(info, operator=operator, resource=f"dashboard-{token[:6]}")
        try:
            await grid.connect(settle_s=0.5)
        except SessionError as exc:
            return web.Response(status=503, content_type="text/html", text=_page("login", error=f"Grid unreachable: {exc}"))
        session = _Session(operator, grid)
        grid.listen_alarms(lambda a: session.alarms.__setitem__((a.device, a.id), a))
        if self._record_outcome is not None:
            grid.listen_outcomes(self._record_outcome)
        self._sessions[token] = session
        self._idle(token, session)
        log.info("dashboard: %s logged in", operator)
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="Strict")
        raise resp

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(COOKIE, "")
        await self._end(token)
        resp = web.HTTPSeeOther("/")
        resp.del_cookie(COOKIE)
        raise resp

    def _idle(self, token: str, session: _Session) -> None:
        """Log the session out after IDLE_S unless a page opens its stream meanwhile."""
        if session.idle is not None:
            session.idle.cancel()
        session.idle = asyncio.get_running_loop().call_later(
            IDLE_S, lambda: asyncio.ensure_future(self._end(token)) if session.pages == 0 else None)

    async def _end(self, token: str) -> None:
        session = self._sessions.pop(token, None)
        if session is not None:
            if session.idle is not None:
                session.idle.cancel()
            log.info("dashboard: %s logged out", session.operator)
            await session.grid.close()

    # -- pages and data ---------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        if request.cookies.get(COOKIE, "") not in self._sessions:
            return web.Response(content_type="text/html", text=_page("login"))
        return web.Response(content_type="text/html", text=_page("app"))

    def snapshot(self, session: _Session) -> dict[str, Any]:
        """Everything the page shows, from the operator's own session."""
        devices = []
        for spec in self.fleet.devices:
            view = session.grid.tracker.find(self.fleet.jid(spec.name))
            data: dict[str, Any] = view.as_dict() if view else {"name": spec.name, "state": "unknown", "telemetry": {}}
            data.update(parent=spec.parent, label=spec.label, rated_kw=spec.rated_kw, kind=spec.kind.value,
                        present=bool(view and view.present), actions=list(ACTIONS_BY_KIND.get(spec.kind.value, ())))
            devices.append(data)
        open_alarms = [a for a in session.alarms.values() if a.status is AlarmStatus.RAISED]
        # the most urgent first, then the newest
        open_alarms.sort(key=lambda a: (a.level is not AlarmLevel.URGENT, -a.raised.timestamp()))
        alarms = [{**a.model_dump(mode="json"), "name": a.device.split("@", 1)[0]} for a in open_alarms]
        return {"operator": session.operator, "devices": devices, "alarms": alarms,
                "net_kw": round(net_load_kw(session.grid.devices), 1)}

    async def _events(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        token = request.cookies[COOKIE]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)
        changed = asyncio.Event()
        stops = [session.grid.tracker.listen(lambda _c: changed.set()), session.grid.listen_alarms(lambda _a: changed.set())]
        loop = asyncio.get_running_loop()
        session.pages += 1
        try:
            while True:
                await resp.write(f"data: {json.dumps(self.snapshot(session))}\n\n".encode())
                sent = loop.time()
                changed.clear()
                # Wake each second to see whether the page went away (aiohttp does not cancel a
                # handler when its client disconnects); a snapshot at least every 15 s keeps proxies open.
                while not changed.is_set() and loop.time() - sent < 15.0:
                    if request.transport is None or request.transport.is_closing():
                        return resp
                    try:
                        await asyncio.wait_for(changed.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
                # A change after a quiet spell goes out at once; a burst is folded into one snapshot.
                await asyncio.sleep(max(0.0, PUSH_EVERY_S - (loop.time() - sent)))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            for stop in stops:
                stop()
            session.pages -= 1
            if session.pages == 0 and token in self._sessions:
                self._idle(token, session)
        return resp

    async def _history(self, request: web.Request) -> web.StreamResponse:
        self._session(request)
        device = request.query["device"]
        minutes = min(max(int(request.query.get("minutes", "60")), 1), 60 * 24 * 31)
        every = int(request.query.get("every", "0"))
        if self._history_url is None:
            return web.json_response({"points": [], "events": []})
        if self._store is None:
            try:
                self._store = await asyncio.to_thread(open_store, self._history_url)
            except StoreError as exc:
                return web.json_response({"error": str(exc)}, status=503)
        end = time.time() + 1
        start = end - 60 * minutes
        store = self._store
        points = await asyncio.to_thread(store.series, device, "kw", start, end, every)
        events = await asyncio.to_thread(store.events, device, start, end, ["state", "outcome"])
        return web.json_response({
            "device": device, "points": [[p.ts, round(p.mean, 3)] for p in points],
            "marks": [{"ts": e.ts, "text": e.detail.get("action") or e.detail.get("state")} for e in events
                      if e.kind == "outcome" and e.detail.get("status") == "executed"
                      or e.kind == "state"]})

    async def _command(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        body = await request.json()
        device, action = str(body["device"]), Action(str(body["action"]))
        try:
            outcome = await session.grid.command(device, action)
        except UnknownDevice as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response({"device": device, "action": action.value, "status": outcome.status.value,
                                  "detail": outcome.detail, "ok": outcome.ok})

    async def _alarm(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        body = await request.json()
        device, alarm_id, verb = str(body["device"]), str(body["id"]), str(body["verb"])
        if verb not in VERDICTS:
            raise ValueError(f"verb must be one of {', '.join(VERDICTS)}")
        line = VERDICTS[verb].format(id=alarm_id[:64])
        try:
            reply = await session.grid.ask(device, line, signed=True)
        except (OxRefused, UnknownDevice, TimeoutError) as exc:
            return web.json_response({"error": str(exc) or "the device did not answer"}, status=502)
        done = reply.startswith("Acknowledged:" if verb == "ack" else "Recorded:")
        if done and verb == "ack":
            for key, alarm in list(session.alarms.items()):
                if key[1] == alarm_id and alarm.device.split("@", 1)[0] == device:
                    session.alarms[key] = alarm.model_copy(update={"status": AlarmStatus.ACKNOWLEDGED,
                                                                   "acked_by": session.grid.jid})
        return web.json_response({"device": device, "id": alarm_id, "done": done, "reply": reply})


def _page(which: str, error: str = "") -> str:
    text = resources.files("gridpresence.services.dashboard").joinpath(f"{which}.html").read_text(encoding="utf-8")
    return text.replace("{{error}}", escape(error))
