"""OpenPGP for XMPP from go-sendxmpp (`--ox`), a command-line client this project did not write:
it imports the operator's grid key, publishes it on PEP, fetches the device's key from the
device's PEP nodes, and sends `shed` signed and encrypted. The device acts on it. (go-sendxmpp's
send mode discards the device's answer, and a listening session gets no copy without carbons:
see README.)"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from conftest import Env
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState

pytestmark = pytest.mark.skipif(shutil.which("go-sendxmpp") is None,
                                reason="go-sendxmpp is not installed (Debian package `go-sendxmpp`)")

DEVICE = "ox-send"


async def go_sendxmpp(env: Env, home: Path, *args: str, stdin: bytes = b"") -> str:
    endpoint = env.grid.endpoint
    proc = await asyncio.create_subprocess_exec(
        "go-sendxmpp", "-u", env.fleet.jid("alice"), "-p", env.grid.secrets.password("alice"),
        "-j", f"{endpoint.host}:{endpoint.c2s_port}", *args,
        env={**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
             "SSL_CERT_FILE": str(endpoint.ca_file)},  # Go's TLS trusts the grid's private CA
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode == 0, f"go-sendxmpp {' '.join(args)} failed: {out.decode(errors='replace')}"
    return out.decode(errors="replace")


async def test_go_sendxmpp_sends_a_signed_encrypted_shed(env: Env, tmp_path: Path, alice: GridOperator) -> None:
    await go_sendxmpp(env, tmp_path, "--ox-import-privkey", str(env.grid.keys.secret_path("alice")))
    assert alice.devices[DEVICE].state is DeviceState.ON
    await go_sendxmpp(env, tmp_path, "--ox", env.fleet.jid(DEVICE), stdin=b"shed\n")
    await alice.wait_for(lambda d: d[DEVICE].state is DeviceState.OFF, timeout=10)
    await go_sendxmpp(env, tmp_path, "--ox", env.fleet.jid(DEVICE), stdin=b"restore\n")
    await alice.wait_for(lambda d: d[DEVICE].state is DeviceState.ON, timeout=10)
