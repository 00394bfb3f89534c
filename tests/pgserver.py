"""A throwaway PostgreSQL server for tests and benchmarks: initdb in a temporary directory, a free
port on 127.0.0.1, run as an unprivileged user (PostgreSQL refuses to run as root; as root we
use `nobody`), stopped and removed afterwards. Debian's `postgresql` package provides it."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bindir() -> Path | None:
    """Debian keeps the server's programs in /usr/lib/postgresql/N/bin (the newest N wins)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    ctl = shutil.which("pg_ctl")
    return Path(ctl).parent if ctl else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, durable: bool = False) -> None:
        self.durable = durable  # False: fsync off (tests need speed, not crash safety of the server)
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (Debian package postgresql)")
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="gp-pg-"))
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody")
            self._as = ["runuser", "-u", "nobody", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> PgServer:
        data = self.dir / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir}" + ("" if self.durable else " -c fsync=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w",
                  "-t", "30", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # never started: nothing to stop
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.dir, ignore_errors=True)
