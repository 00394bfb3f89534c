"""OpenPGP for XMPP from a chat client this project did not write: Profanity's /ox (gpgme and
GnuPG underneath), driven through tmux. The operator's GnuPG home holds her grid key; she
announces her public key on PEP, discovers and imports the device's from its PEP node,
certifies it, starts OX with the device and types `shed`. The device acts on the signed
command and Profanity shows its answer, decrypted; the same words in plain chat change nothing
(the steps: terminal.py's ox_signed_shed_and_restore, which tests/test_hosting_parity.py runs
against a hosted identity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Env
from gpghome import HAVE_GPG
from gridpresence.operator.library import GridOperator
from gridpresence.security.policy import SecuritySettings
from terminal import HAVE_PROFANITY, NO_PROFANITY, ox_signed_shed_and_restore

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
    await ox_signed_shed_and_restore(env, tmp_path, DEVICE, alice)
