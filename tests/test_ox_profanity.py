"""OpenPGP for XMPP from a chat client this project did not write: Profanity's /ox (gpgme and
GnuPG underneath), driven through tmux. The operator's GnuPG home holds her grid key; she
announces her public key on PEP, discovers and imports the device's from its PEP node,
certifies it, starts OX with the device and types `shed`. The device acts on the signed
command and Profanity shows its answer, decrypted; the same words in plain chat change nothing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from conftest import Env
from gpghome import HAVE_GPG, GnuPG
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState
from gridpresence.security.keys import fingerprint
from gridpresence.security.policy import SecuritySettings
from terminal import HAVE_PROFANITY, NO_PROFANITY, log_in, run_profanity

pytestmark = [
    pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY),
    pytest.mark.skipif(not HAVE_GPG, reason="gpg is not installed (Debian package `gnupg`)"),
]

DEVICE = "ox-load"


async def test_operator_in_profanity_sends_a_signed_encrypted_shed(env: Env, tmp_path: Path, alice: GridOperator,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert env.grid.bots is not None
    # The production default for this device (the test fleet lets plain chat act, a lab setting).
    monkeypatch.setattr(env.grid.bots.devices[DEVICE], "security", SecuritySettings())
    device = env.fleet.jid(DEVICE)
    device_fpr = fingerprint(env.grid.keys.secret(DEVICE))
    async with GnuPG(trust_all=False) as gpg:
        # The operator's setup, once (README): her grid key into GnuPG, trusted as her own,
        # and her public key exported for PEP.
        await gpg.import_key(env.grid.keys.secret_path("alice").read_text())
        await gpg.trust_own_key(fingerprint(env.grid.keys.secret("alice")))
        public, _ = await gpg.run("--export", "--export-options", "export-minimal", "xmpp:alice@localhost")
        (tmp_path / "alice.pub").write_bytes(public)

        async with run_profanity(tmp_path, {"GNUPGHOME": str(gpg.home)}) as term:
            await log_in(term, env, "alice")
            await term.type(f"/ox announce {tmp_path / 'alice.pub'}")
            await term.wait_for("Announce OpenPGP Key for OX")
            # The device's key, from the device's own PEP nodes.
            await term.type(f"/ox discover {device}")
            # Presence lines of other devices may land between the two lines Profanity prints.
            await term.wait_for(rf"Discovering Public Key for {re.escape(device)}(?:.*\n)+?\S+ - {device_fpr}")
            await term.type(f"/ox request {device} {device_fpr}")
            await term.wait_for("Public Key imported")
            await gpg.run("--quick-lsign-key", device_fpr)  # she checked the fingerprint: valid now

            await term.type(f"/ox start {device}")
            await term.wait_for(rf"{DEVICE} \[\w+\] \[OX\]")  # the chat window's title: OX is on
            await term.type("shed")
            await term.wait_for(rf"Done: load shed\. Now: {DEVICE} \(load\) is off, 0\.0 kW of 90 kW")
            await alice.wait_for(lambda d: d[DEVICE].state is DeviceState.OFF, timeout=5)

            # The same words in plain chat (an account password is not the operator's key): refused.
            await term.type("/ox end")
            await term.wait_for("OX encryption disabled.")
            await term.type("restore")
            await term.wait_for(r"Refused restore: an unsigned chat line may not change the device's state")
            await asyncio.sleep(0.5)
            assert alice.devices[DEVICE].state is DeviceState.OFF

            await term.type("/ox start")
            await term.wait_for(rf"{DEVICE} \[\w+\] \[OX\]")
            await term.type("restore")
            await term.wait_for(r"Done: load restored\.")
            await alice.wait_for(lambda d: d[DEVICE].state is DeviceState.ON, timeout=5)
