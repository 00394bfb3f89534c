"""Network namespaces and nftables rules for firewall tests and the BOSH benchmark.

Topology (addresses exist only inside these namespaces and their veth pairs)::

    [secure-1 ns] 10.213.77.2 --veth-- 10.213.77.1 [root ns: Prosody, operator]
    [secure-2 ns] 10.213.77.6 --veth-- 10.213.77.5 --(local delivery)--^

Prosody listens on 10.213.77.1. A secure namespace's web-only rules allow outbound HTTP(S)
only: unsolicited inbound traffic and the XMPP port are dropped. A test file that may run beside
another one passes :func:`namespaces` its own prefix and addresses (test_gateway_firewall.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gridpresence.operator.library import GridOperator
from gridpresence.config import Fleet
from gridpresence.host.grid import Grid

ROOT = Path(__file__).resolve().parents[1]


class NetlabUnavailable(RuntimeError):
    """The kernel or the tools refuse namespaces or nftables here; the message says which."""


PUBLIC = "10.213.77.1"
SECURE = {"sec1": ("10.213.77.1", "10.213.77.2"), "sec2": ("10.213.77.5", "10.213.77.6")}
EXE = str(Path(sys.executable).with_name("gridpresence"))

def _run(*cmd: str, stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")


def web_only_rules(http: int, https: int) -> str:
    """Outbound HTTP(S) only; inbound only what answers our own connections."""
    return f"""
table inet gpfw {{
    chain input {{
        type filter hook input priority 0; policy drop;
        iif lo accept
        ct state established,related accept
    }}
    chain output {{
        type filter hook output priority 0; policy drop;
        oif lo accept
        tcp dport {{ {http}, {https} }} accept
    }}
}}
"""


BLOCK_ALL = """
table inet gpfw {
    chain input { type filter hook input priority 0; policy drop; iif lo accept; }
    chain output { type filter hook output priority 0; policy drop; oif lo accept; }
}
"""


@dataclass
class Lab:
    names: dict[str, str]  # role (sec1, sec2) -> namespace name
    grid: Grid
    fleet: Fleet
    data: Path
    public: str = PUBLIC  # the server's address, as the namespaces reach it

    def firewall(self, role: str, rules: str | None) -> None:
        """Replace a namespace's rules (None: no firewall at all)."""
        ns = self.names[role]
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "gpfw"],
                       capture_output=True, timeout=10)
        if rules is not None:
            _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)

    def web_only(self, role: str) -> None:
        ports = self.grid.server.ports
        self.firewall(role, web_only_rules(ports.http, ports.https))

    def operator(self, name: str = "alice") -> GridOperator:
        return GridOperator.from_connection(self.grid.connection, operator=name, resource=f"fw-{os.urandom(2).hex()}")

    async def start_bot(self, role: str, device: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.names[role], EXE, "bots", "--data", str(self.data), "--only", device,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, start_new_session=True)

    async def cli(self, role: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.names[role], EXE, *args, "--connection", str(self.grid.connection_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode or 0, out.decode(), err.decode()

    async def can_reach(self, role: str, port: int) -> bool:
        code = (f"import socket,sys\ntry: socket.create_connection(({self.public!r},{port}),2)\n"
                "except OSError: sys.exit(1)")
        proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", self.names[role], sys.executable, "-c", code)
        return await proc.wait() == 0


async def stop_bot(proc: asyncio.subprocess.Process, graceful: bool = False) -> None:
    """Kill a bot process (graceful: SIGTERM first, so it says goodbye)."""
    if proc.returncode is None and graceful:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            pass
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@contextlib.contextmanager
def namespaces(prefix: str = "gp", secure: dict[str, tuple[str, str]] | None = None) -> Iterator[dict[str, str]]:
    """Create the secure namespaces (role -> namespace name; ``secure``: role -> (outer, inner)
    address, default :data:`SECURE`); always removes them again. ``prefix`` starts every
    namespace and veth name, so two test files' labs never meet."""
    secure = SECURE if secure is None else secure
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        raise NetlabUnavailable("needs root with `ip` and `nft` (apt-get install iproute2 nftables)")
    tag = f"{os.getpid() % 100000}"
    names = {role: f"{prefix}{role}-{tag}" for role in secure}
    created: list[str] = []
    try:
        for i, (role, (outer, inner)) in enumerate(secure.items()):
            ns, host_if, ns_if = names[role], f"{prefix}v{i}h{tag}", f"{prefix}v{i}n{tag}"
            try:
                _run("ip", "netns", "add", ns)
            except RuntimeError as exc:
                raise NetlabUnavailable(f"the kernel refused a network namespace: {exc}") from None
            created.append(ns)
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
            _run("ip", "addr", "add", f"{outer}/30", "dev", host_if)
            _run("ip", "link", "set", host_if, "up")
            _run("ip", "-n", ns, "addr", "add", f"{inner}/30", "dev", ns_if)
            _run("ip", "-n", ns, "link", "set", ns_if, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", outer)
        try:
            _run("ip", "netns", "exec", created[0], "nft", "list", "ruleset")
        except RuntimeError as exc:
            raise NetlabUnavailable(f"nftables is not usable in a namespace: {exc}") from None
        yield names
    finally:
        for ns in created:  # deleting a namespace removes its veth pair and its rules
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=20)
