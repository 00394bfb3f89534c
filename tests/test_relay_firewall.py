"""A device behind a firewall that lets mail out and nothing else ([00116]): it runs in its own
network namespace whose nftables output policy drops everything but SMTP to the relay, and its
data still reaches the operators, through the relay, over XMPP."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Env
from test_relay import RelayProcess, commission_once, operator

from gridpresence.xmpp.session import ConnectionInfo
from gridpresence.server.ports import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"),
                                reason="needs root, nftables and iproute2 for a network namespace")


def sh(*cmd: str, ns: str | None = None, stdin: str | None = None) -> None:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    subprocess.run(full, check=True, input=stdin, text=True, capture_output=True)


@dataclass
class MailOnlyNetwork:
    ns: str
    host_ip: str  # the relay listens here, on the host's end of the veth pair
    device_ip: str


@pytest.fixture
def mail_only_net() -> Iterator[MailOnlyNetwork]:
    tag = os.urandom(2).hex()
    ns, host_if, dev_if = f"gp-mail-{tag}", f"gpmh{tag}", f"gpmd{tag}"
    octet = int(tag, 16) % 250 + 1
    net = MailOnlyNetwork(ns, f"10.231.{octet}.1", f"10.231.{octet}.2")
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if)
        sh("ip", "link", "set", dev_if, "netns", ns)
        sh("ip", "addr", "add", f"{net.host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "addr", "add", f"{net.device_ip}/30", "dev", dev_if, ns=ns)
        sh("ip", "link", "set", dev_if, "up", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        yield net
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def allow_only_smtp(net: MailOnlyNetwork, smtp_port: int) -> None:
    rules = f"""
table inet mailonly {{
    chain out {{
        type filter hook output priority 0; policy drop;
        oif "lo" accept
        ct state established,related accept
        ip daddr {net.host_ip} tcp dport {smtp_port} accept
    }}
}}
"""
    sh("nft", "-f", "-", ns=net.ns, stdin=rules)


async def connects_from_ns(net: MailOnlyNetwork, port: int) -> bool:
    probe = (f"import socket,sys\ntry:\n socket.create_connection(('{net.host_ip}',{port}),timeout=1).close()\n"
             "except OSError: sys.exit(1)")
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", net.ns, sys.executable, "-c", probe)
    return await proc.wait() == 0


async def test_mail_only_device_behind_firewall_reaches_operators(env: Env, tmp_path: Path,
                                                                  mail_only_net: MailOnlyNetwork) -> None:
    net = mail_only_net
    await commission_once(env, "mailer-1")  # on the grid's side, before it is behind the firewall
    data = tmp_path / "grid"
    data.mkdir()
    for name in ("connection.json", "secrets.json", "fleet.json"):
        shutil.copy(env.data / name, data / name)
    shutil.copytree(env.data / "keys", data / "keys")  # the device signs its mail; the relay checks it
    relay = RelayProcess(data, tmp_path / "queue.sqlite3", free_port(net.host_ip), bind=net.host_ip)
    # Something else listening on the device's side of the host: the firewall must keep it out.
    other = socket.create_server((net.host_ip, 0))
    other_port = other.getsockname()[1]
    await relay.start()
    try:
        assert await connects_from_ns(net, other_port)  # open network: both reachable
        allow_only_smtp(net, relay.port)
        assert not await connects_from_ns(net, other_port)  # now only mail gets out
        assert await connects_from_ns(net, relay.port)
        info = ConnectionInfo.load(data / "connection.json")
        assert info.relay is not None and info.relay.smtp_host == net.host_ip
        async with operator(data, "alice") as alice:
            exe = Path(sys.executable).with_name("gridpresence")
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", net.ns, str(exe), "mail-device", "mailer-1", "--data", str(data), "--count", "1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            assert b"mailer-1: mailed" in out
            await alice.wait_for(lambda d: d["mailer-1"].report is not None, timeout=5)
            assert "mail" in alice.devices["mailer-1"].health_reason
    finally:
        other.close()
        await relay.stop()
