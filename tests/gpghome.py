"""A throwaway GnuPG home for tests: the operator's side of OpenPGP for XMPP as GnuPG-based
clients (Profanity through gpgme) do it. Its gpg-agent is ended when the home is closed."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

HAVE_GPG = shutil.which("gpg") is not None and shutil.which("gpgconf") is not None


class GnuPG:
    def __init__(self, trust_all: bool = True) -> None:
        # Short path: gpg-agent's socket lives here when /run/user/UID does not exist.
        self.home = Path(tempfile.mkdtemp(prefix="gp-gnupg-"))
        self.home.chmod(0o700)
        if trust_all:  # else keys are valid only once certified, as in an operator's own home
            (self.home / "gpg.conf").write_text("trust-model always\n")
        self.env = {**os.environ, "GNUPGHOME": str(self.home)}

    async def run(self, *args: str, stdin: bytes = b"", check: bool = True) -> tuple[bytes, str]:
        """``gpg --batch ARGS``: stdout and the machine-readable status lines."""
        proc = await asyncio.create_subprocess_exec(
            "gpg", "--batch", "--yes", "--status-fd", "2", *args, env=self.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
        if check and proc.returncode:
            raise RuntimeError(f"gpg {' '.join(args)} failed ({proc.returncode}): {err.decode(errors='replace')}")
        return out, err.decode(errors="replace")

    async def import_key(self, armored: str | bytes) -> None:
        await self.run("--import", stdin=armored.encode() if isinstance(armored, str) else armored)

    async def trust_own_key(self, fingerprint: str) -> None:
        """Ultimate owner trust for one's own key: what makes keys it certifies valid."""
        await self.run("--import-ownertrust", stdin=f"{fingerprint}:6:\n".encode())

    async def close(self) -> None:
        proc = await asyncio.create_subprocess_exec("gpgconf", "--kill", "gpg-agent", env=self.env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.wait_for(proc.wait(), 10)
        shutil.rmtree(self.home, ignore_errors=True)

    async def __aenter__(self) -> GnuPG:
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        await self.close()
