"""Run a private Prosody as a child process: own config, data, certificates, ports and log.

Everything lives under one `data_dir`, so tests and benchmarks can run several servers side by
side without touching the system Prosody (/etc/prosody, /var/lib/prosody, port 5222).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from string import Template
from types import TracebackType

from gridpresence.server.certs import CertPaths, cert_ips, ensure_certificates
from gridpresence.server.pids import process_alive
from gridpresence.server.ports import free_ports, port_is_free
from gridpresence.server.provision import lua_string
from gridpresence.transport.probe import serves_http, serves_xmpp

TEMPLATE_PATH = Path(__file__).resolve().parents[3] / "server_config" / "prosody.cfg.lua.tmpl"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TAIL_LINES = 30
HOSTED_OFFLINE_WAIT_S = 300.0  # mod_gridpresence_hosted_offline.lua: see PROTOCOL.md "A host that is down"
# Prosody 0.12's own default (mod_c2s.lua); it refuses less than 10,000. A client sending a bigger
# stanza has its stream closed: whatever may grow with the fleet is paged below it (fleet health).
C2S_STANZA_SIZE_LIMIT = 256 * 1024
C2S_STANZA_SIZE_MIN = 10_000
# First line of every config we render, with the SHA-256 of the rest: a file whose rest no
# longer matches was edited by hand, and is kept aside before a new rendering replaces it.
RENDERED_MARK = "-- rendered by gridpresence from server_config/prosody.cfg.lua.tmpl; sha256 "
EDITED_SUFFIX = ".edited"

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The embedded server could not be started or run; the message is meant for a person."""


class ProsodyMissing(ServerError):
    """The Prosody executable is not installed (or not where we were told)."""


class PortInUse(ServerError):
    """A port we were asked to use is already taken by another listener."""

    def __init__(self, setting: str, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} (the {setting} port) is already in use; "
            f"stop whatever listens there or choose another {setting} port"
        )
        self.setting = setting
        self.host = host
        self.port = port


@dataclass
class ServerPorts:
    """The TCP ports Prosody listens on: XMPP clients, BOSH/WebSocket (http, https), components."""

    c2s: int
    http: int
    https: int
    component: int

    @classmethod
    def choose(cls, host: str) -> ServerPorts:
        """Four distinct ports that are free on `host` now."""
        return cls(*free_ports(len(fields(cls)), host))

    def items(self) -> list[tuple[str, int]]:
        """(setting name, port) pairs, for checks and messages."""
        return list(asdict(self).items())


def _rendered_by_us(text: str) -> bool:
    first, _, rest = text.partition("\n")
    return first == RENDERED_MARK + hashlib.sha256(rest.encode()).hexdigest()


# Process groups of servers still running; killed if the interpreter exits without stop().
_live_groups: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    for pgid in list(_live_groups):
        _signal_group(pgid, signal.SIGKILL)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
SUPERVISOR_SUFFIX = ".supervisor"  # beside the pidfile: the pid of the process that started Prosody


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec step: the kernel SIGKILLs Prosody when the process that started it dies, even
    by kill -9 (no atexit runs then), so a crashed `up` never leaves an orphan server."""
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


class ProsodyServer:
    """A Prosody child process configured from server_config/prosody.cfg.lua.tmpl.

    With ``ports=None`` ports are chosen once and remembered in ``data_dir/ports.json`` when the
    config is rendered; if one of them is busy when `start` runs, a fresh set is chosen, so read
    `ports` after `start`. Nothing is written while another Prosody runs from `data_dir`.
    Explicitly given ports are never changed: a busy one raises `PortInUse`.
    `template_path` exists for tests and experiments; normally the repository's template is used.
    `adhoc_accounts` (usernames, the fleet's devices) get their XEP-0050 commands answered at their
    bare JID by their connected resource (server_config/mod_gridpresence_adhoc.lua).
    `advertise` is the name other machines dial when it is not `bind` (a container's service
    name, where the server binds every interface): clients and the certificate use it.
    """

    def __init__(
        self,
        data_dir: Path,
        domain: str = "localhost",
        bind: str = "127.0.0.1",
        ports: ServerPorts | None = None,
        prosody_bin: str = "prosody",
        log_level: str = "info",
        extra_modules: Sequence[str] = (),
        component_secret: str | None = None,
        template_path: Path = TEMPLATE_PATH,
        adhoc_accounts: Sequence[str] = (),
        advertise: str | None = None,
        c2s_stanza_size_limit: int = C2S_STANZA_SIZE_LIMIT,
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, not {log_level!r}")
        if c2s_stanza_size_limit < C2S_STANZA_SIZE_MIN:
            raise ValueError(f"c2s_stanza_size_limit must be at least {C2S_STANZA_SIZE_MIN} bytes (Prosody's minimum), "
                             f"not {c2s_stanza_size_limit}")
        self.data_dir = Path(data_dir).resolve()
        self.domain = domain
        self.bind = bind
        self.prosody_bin = prosody_bin
        self.log_level = log_level
        self.extra_modules = tuple(extra_modules)
        self.component_secret = component_secret
        self.template_path = Path(template_path)
        self.adhoc_accounts = tuple(adhoc_accounts)
        self.advertise = advertise
        # Bytes of one stanza from an authenticated client (tests lower it to meet the limit sooner).
        self.c2s_stanza_size_limit = c2s_stanza_size_limit
        # Seconds the server waits, after the component's return, for a hosted identity that has
        # messages kept for it before returning them to their senders (tests shorten it).
        self.hosted_offline_wait_s = HOSTED_OFFLINE_WAIT_S
        self.certs = CertPaths.in_directory(self.data_dir / "certs")
        self._auto_ports = ports is None
        self.ports = ports if ports is not None else self._remembered_or_new_ports()
        self._process: asyncio.subprocess.Process | None = None
        self._log_offset = 0

    # --- paths ----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.data_dir / "prosody.cfg.lua"

    @property
    def storage_path(self) -> Path:
        """Prosody's data_path: pass this to `provision`."""
        return self.data_dir / "prosody"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "prosody.log"

    @property
    def pidfile_path(self) -> Path:
        return self.data_dir / "prosody.pid"

    @property
    def connect_host(self) -> str:
        """Address clients should dial: `advertise`, else `bind`, or loopback when bound to every
        interface."""
        if self.advertise:
            return self.advertise
        if self.bind == "0.0.0.0":
            return "127.0.0.1"
        if self.bind == "::":
            return "::1"
        return self.bind

    @property
    def web_url(self) -> str:
        """The HTTPS origin (the embedded CA's certificate covers `connect_host`)."""
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"https://{host}:{self.ports.https}"

    @property
    def bosh_url(self) -> str:
        """mod_bosh over HTTPS; also announced at web_url/.well-known/host-meta."""
        return f"{self.web_url}/http-bind"

    @property
    def component_domain(self) -> str | None:
        """JID of the devices component, when a component secret was given."""
        return f"devices.{self.domain}" if self.component_secret is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    # --- configuration --------------------------------------------------------------------

    def render(self) -> Path:
        """Write data_dir/prosody.cfg.lua (and certificates if needed) and remember the ports;
        return the config path. The config is rewritten only when the rendering changes it; a
        hand-edited one is first kept as ``prosody.cfg.lua.edited``. Refuses (ServerError) while
        another Prosody runs from data_dir, before writing anything."""
        self.refuse_if_running_elsewhere()
        self.storage_path.mkdir(mode=0o750, parents=True, exist_ok=True)
        ensure_certificates(self.certs.ca.parent, self.domain, self._cert_ips(), hosts=self._cert_hosts())
        if self._auto_ports:
            self._remember_ports()
        body = Template(self.template_path.read_text()).substitute(self._template_values())
        text = f"{RENDERED_MARK}{hashlib.sha256(body.encode()).hexdigest()}\n{body}"
        try:
            current = self.config_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            current = None
        if current == text:
            return self.config_path
        if current is not None and not _rendered_by_us(current):
            kept = self.config_path.with_name(self.config_path.name + EDITED_SUFFIX)
            shutil.copyfile(self.config_path, kept)
            log.warning("%s was edited by hand; the edits are kept in %s and the config is rendered again from %s "
                        "(make lasting changes there)", self.config_path, kept, self.template_path)
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)
        return self.config_path

    def _template_values(self) -> dict[str, str]:
        modules = "".join(f"\t{lua_string(name)};\n" for name in self.extra_modules)
        component, component_host = "", self.component_domain or ""
        if self.component_secret is not None:
            component = (
                f"Component {lua_string(component_host)}\n"
                f"\tcomponent_secret = {lua_string(self.component_secret)}\n"
                # Messages for hosted devices kept while their host is down, as mod_offline
                # keeps an account's (server_config/mod_gridpresence_hosted_offline.lua).
                f"\tmodules_enabled = {{ \"gridpresence_hosted_offline\" }}\n"
                f"\tgridpresence_server_host = {lua_string(self.domain)}\n"
                f"\tgridpresence_offline_wait = {float(self.hosted_offline_wait_s)!r}\n"
            )
        return {
            "pidfile": lua_string(str(self.pidfile_path)),
            "data_path": lua_string(str(self.storage_path)),
            "log_level": lua_string(self.log_level),
            "log_file": lua_string(str(self.log_path)),
            "bind": lua_string(self.bind),
            "c2s_port": str(int(self.ports.c2s)),
            "c2s_stanza_size_limit": str(int(self.c2s_stanza_size_limit)),
            "http_port": str(int(self.ports.http)),
            "https_port": str(int(self.ports.https)),
            "component_port": str(int(self.ports.component)),
            "cert": lua_string(str(self.certs.cert)),
            "key": lua_string(str(self.certs.key)),
            "domain": lua_string(self.domain),
            "extra_modules": modules,
            "plugin_dir": lua_string(str(self.template_path.parent)),
            "bosh_url": lua_string(self.bosh_url),
            "adhoc_accounts": "; ".join(lua_string(name) for name in self.adhoc_accounts),
            "component": component,
            "component_host": lua_string(component_host),
            # HTTPS picks its certificate by SNI, strictly: a client dialling BOSH by the advertised
            # name (https://xmpp:5281 in the compose demo) must find that name among the host's.
            "http_host": "".join(f"\thttp_host = {lua_string(h)}\n" for h in self._cert_hosts()),
        }

    def _cert_ips(self) -> list[str]:
        return cert_ips(self.connect_host)

    def _cert_hosts(self) -> list[str]:
        """The advertised name when it is a host name (an IP is among `_cert_ips`)."""
        return [self.advertise] if self.advertise and not cert_ips(self.advertise)[1:] else []

    # --- ports ----------------------------------------------------------------------------

    @property
    def _ports_file(self) -> Path:
        return self.data_dir / "ports.json"

    def _remembered_or_new_ports(self) -> ServerPorts:
        """Last run's ports when all are still free (stable URLs across runs), else new ones."""
        try:
            ports = ServerPorts(**json.loads(self._ports_file.read_text()))
            if self._busy_port(ports) is None:
                return ports
        except (OSError, ValueError, TypeError):
            pass  # missing or unreadable: choose afresh
        return self._new_ports()

    def _new_ports(self) -> ServerPorts:
        return ServerPorts.choose(self.bind)

    def _remember_ports(self) -> None:
        text = json.dumps(asdict(self.ports), indent=2) + "\n"
        with contextlib.suppress(OSError):
            if self._ports_file.read_text() == text:
                return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._ports_file.write_text(text)

    def _busy_port(self, ports: ServerPorts) -> tuple[str, int] | None:
        """The first (setting, port) that cannot be bound, or None."""
        seen: set[int] = set()
        for setting, port in ports.items():
            if port in seen or not port_is_free(self.bind, port):
                return setting, port
            seen.add(port)
        return None

    def _claim_ports(self, keep: bool = False) -> None:
        busy = self._busy_port(self.ports)
        if busy is None:
            return
        if not self._auto_ports or keep:
            raise PortInUse(busy[0], self.bind, busy[1])
        self.ports = self._new_ports()

    # --- process --------------------------------------------------------------------------

    def _find_binary(self) -> str:
        found = shutil.which(self.prosody_bin)
        if found is None:
            raise ProsodyMissing(
                f"the Prosody XMPP server ({self.prosody_bin!r}) was not found; "
                "install it with `apt-get install prosody` or name the executable with "
                "`gridpresence up --prosody /path/to/prosody`"
            )
        return found

    async def start(self, timeout: float = 15.0, keep_ports: bool = False) -> None:
        """Spawn Prosody and return once it serves XMPP on the c2s port. `keep_ports`: a restart
        under supervision, where clients know the ports already: a busy one raises PortInUse."""
        if self.running:
            return
        await self.stop()  # reap a previous child that died on its own
        binary = self._find_binary()
        self.refuse_if_running_elsewhere()
        self._claim_ports(keep_ports)
        self.render()
        try:
            await self._spawn(binary)
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise

    @property
    def supervisor_path(self) -> Path:
        return self.pidfile_path.with_name(self.pidfile_path.name + SUPERVISOR_SUFFIX)

    def _running_pid(self) -> str | None:
        """The pid in the pidfile while a Prosody holds its lock, else None."""
        try:
            handle = open(self.pidfile_path, "r+")
        except FileNotFoundError:
            return None
        with handle:  # closing drops our probe lock again
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return handle.read().strip() or "unknown"
        return None

    def _stale(self, pid: str) -> bool:
        """A Prosody of ours (it runs our config) whose supervising process is gone: left over
        from a crashed run (one started before Prosody died with its parent, or one stopped)."""
        try:
            cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
            supervisor = int(self.supervisor_path.read_text().strip())
        except (OSError, ValueError):
            return False  # not ours to judge, or no record of who runs it: refuse, as before
        return str(self.config_path).encode() in cmdline and not process_alive(supervisor)

    def refuse_if_running_elsewhere(self) -> None:
        """Fail fast when another Prosody already runs from this data_dir; stop one left over
        from a crashed run (its supervisor is dead) instead of leaving it to a person.

        Prosody 0.12 notices the locked pidfile itself but then cannot shut down that early
        in start-up: it lingers half-started (no c2s port) instead of exiting.
        """
        pid = self._running_pid()
        if pid is None:
            return
        if self._stale(pid):
            log.warning("a Prosody (pid %s) left over from a crashed run on %s: stopping it", pid, self.data_dir)
            self._stop_stale(int(pid))
            pid = self._running_pid()
            if pid is None:
                return
        raise ServerError(
            f"another Prosody (pid {pid}) is already running from {self.data_dir}; "
            "stop it or use another data_dir"
        )

    def _stop_stale(self, pid: int, timeout: float = 5.0) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not process_alive(pid) or self._running_pid() is None:
                    return
                time.sleep(0.05)

    async def _spawn(self, binary: str) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Prosody's file log sink and its stdout/stderr (early errors, Lua tracebacks) share one
        # append-only file, so one place explains any failure.
        with open(self.log_path, "ab") as log:
            spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
                binary, "--config", str(self.config_path), "-F",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # own process group: stop() reaches any child it spawns
                preexec_fn=die_with_parent(os.getpid()),
            ))
            try:
                self._process = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                # Cancelled (Ctrl-C) mid-spawn: the child may exist already; keep hold of it so
                # stop() ends it instead of leaving an orphan Prosody.
                with contextlib.suppress(Exception):
                    self._process = await spawn
                raise
            finally:
                if self._process is not None:
                    _live_groups.add(self._process.pid)
                    self.supervisor_path.write_text(f"{os.getpid()}\n")

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.returncode is not None:
                raise ServerError(
                    f"prosody exited with status {self._process.returncode} while starting; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            if await self._serves_xmpp():
                return
            await asyncio.sleep(0.05)
        raise ServerError(
            f"prosody did not serve XMPP on {self.connect_host}:{self.ports.c2s} within {timeout:g} s; "
            f"end of {self.log_path}:\n{self.log_tail()}"
        )

    async def _serves_xmpp(self, timeout: float = 2.0) -> bool:
        return await serves_xmpp(self.connect_host, self.ports.c2s, self.domain, timeout)

    async def answers(self, timeout: float = 3.0) -> bool:
        """Does the running Prosody still answer a stream header with its features, or else a
        request on its HTTP port? A hung one (SIGSTOP, a deadlock) keeps its process and its
        listening sockets, and says nothing on either. One whose XMPP port a firewall rule cut
        still answers HTTP from the same event loop: it is not hung, and restarting it would cure
        nothing."""
        if not self.running:
            return False
        return await self._serves_xmpp(timeout) or await serves_http(self.connect_host, self.ports.http, timeout)

    def kill(self) -> None:
        """SIGKILL the running Prosody's process group (a hung one cannot take a SIGTERM);
        `wait_exit` returns its status."""
        if self._process is not None and self._process.returncode is None:
            _signal_group(self._process.pid, signal.SIGKILL)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM Prosody's process group, SIGKILL it after `timeout`; safe to call repeatedly."""
        process = self._process
        if process is None:
            return
        try:
            if process.returncode is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout)
                except TimeoutError:
                    _signal_group(process.pid, signal.SIGKILL)
                    await process.wait()
        finally:
            _live_groups.discard(process.pid)
            self._process = None

    async def wait_exit(self) -> int | None:
        """Wait until the running Prosody exits; its status (None if none was running)."""
        process = self._process
        if process is None:
            return None
        return await process.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines Prosody logged since the latest start."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log empty)"

    async def __aenter__(self) -> ProsodyServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

