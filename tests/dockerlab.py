"""A Docker engine for tests/test_compose.py, started by hand (no systemd here) and left as found.

The engine is started with ``--iptables=false --ip-forward=false --bridge=none``: it never
touches the host firewall, the forwarding sysctl or a default bridge, so the network-namespace
tests (tests/netlab.py) run beside it unchanged. Compose's own bridge networks still join the
containers, and published ports still reach them from the host through docker-proxy; builds run
with ``--network host`` (there is no NAT to the outside).

No image registry is reachable from this machine: when ``debian:bookworm-slim`` cannot be
pulled, it is made with debootstrap from the mirror apt uses and imported under that name
(cached in the engine's own data root, so only the first run pays for it). Package registries
are reached through a TLS-intercepting proxy: the host's CA bundle goes to the build as a
BuildKit secret, never into an image.

Run as a script to prepare the engine and the image ahead of time (CI's warm-up step):
``python tests/dockerlab.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "gpdocker"  # every name this harness creates on the host starts with it
STATE = Path("/var/lib") / f"{PREFIX}-engine"  # data root: images and build cache survive runs
RUN = Path("/run") / PREFIX
SOCKET = RUN / "docker.sock"
BASE_IMAGE = "debian:bookworm-slim"
IMAGE = "gridpresence:latest"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The official docker client: /usr/local/bin may hold a newer one without buildx, whose
# `docker build` cannot take --secret.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


class EngineUnavailable(RuntimeError):
    """No Docker engine can run here; the message says why (the test skips with it)."""


@dataclass
class Engine:
    env: dict[str, str]
    pid: int | None  # ours to stop; None when an engine was already running

    def run(self, *args: str, timeout: float = 600, check: bool = True, input: str | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(args), env=self.env, cwd=cwd, text=True, capture_output=True, timeout=timeout,
                              input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def docker(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(DOCKER, *args, **kw)  # type: ignore[arg-type]


def _mirror() -> str:
    """The Debian mirror apt uses on this host (reachable through the package proxy)."""
    for source in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            text = source.read_text()
            m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(r"^deb\s+(\S+/debian)\s", text, re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def _answers(env: dict[str, str]) -> bool:
    return subprocess.run([DOCKER, "version"], env=env, capture_output=True, timeout=20).returncode == 0


def start_engine(timeout: float = 60) -> Engine:
    """An engine to talk to: $DOCKER_HOST's if it answers, else one started here."""
    # BuildKit for every build (the Dockerfile's secret mount needs it), whoever runs the engine.
    env = {**os.environ, "DOCKER_BUILDKIT": "1", "COMPOSE_DOCKER_CLI_BUILD": "1"}
    if shutil.which(DOCKER) is None:
        raise EngineUnavailable("no docker client (apt-get install docker.io)")
    if os.environ.get("DOCKER_HOST") and _answers(env):
        return Engine(env, None)
    if shutil.which("dockerd") is None:
        raise EngineUnavailable("no dockerd (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise EngineUnavailable("dockerd must be started as root here (no systemd, no rootless setup)")
    env["DOCKER_HOST"] = f"unix://{SOCKET}"
    if _answers(env):  # left by an earlier run that was killed: reuse it, stop it at the end
        pid = int((RUN / "dockerd.pid").read_text())
        return Engine(env, pid)
    RUN.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    log = open(RUN / "dockerd.log", "ab")
    proc = subprocess.Popen(
        ["dockerd", f"--host=unix://{SOCKET}", f"--pidfile={RUN / 'dockerd.pid'}", f"--data-root={STATE}",
         f"--exec-root={RUN / 'exec'}", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
         "--bridge=none", "--storage-driver=overlay2"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (RUN / "dockerd.log").read_text(errors="replace")[-2000:]
            raise EngineUnavailable(f"dockerd exited with status {proc.returncode}: {tail}")
        if SOCKET.exists() and _answers(env):
            return Engine(env, proc.pid)
        time.sleep(0.3)
    stop_engine(Engine(env, proc.pid))
    raise EngineUnavailable(f"dockerd did not answer on {SOCKET} within {timeout:g} s")


def stop_engine(engine: Engine, timeout: float = 30) -> None:
    """Stop the engine we started (by its PID) and its containerd with it, then undo the mounts
    it leaves behind under its exec root (the bind mount of its default network namespace)."""
    if engine.pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(engine.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(engine.pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(engine.pid, os.WNOHANG)
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.pid, signal.SIGKILL)
    for point in sorted(mounts_left(), reverse=True):  # the deepest first
        subprocess.run(["umount", point], capture_output=True, timeout=30)


def mounts_left() -> list[str]:
    """Mount points under the engine's run directory (none once it is stopped and cleaned up)."""
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].startswith(f"{RUN}/"):
                points.append(fields[1])
    return points


def host_network_state() -> dict[str, str]:
    """What the engine must leave as it found it: forwarding, and no firewall table of Docker's
    in this (the host's) network namespace."""
    state = {"ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
    if shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30).stdout
        state["docker nft tables"] = " ".join(sorted(t for t in tables.split() if "docker" in t.lower()))
    return state


def ensure_base_image(engine: Engine) -> str:
    """`debian:bookworm-slim`: already there, pulled, or made here with debootstrap."""
    if engine.docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return "cached"
    if engine.docker("pull", BASE_IMAGE, check=False, timeout=60).returncode == 0:
        return "pulled"
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable(f"{BASE_IMAGE} cannot be pulled and debootstrap is missing (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-rootfs-") as root:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", root, _mirror()], check=True,
                       capture_output=True, timeout=900)
        # As the official slim image: no apt lists, docs or caches in the base layer.
        for junk in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man", "usr/share/locale"):
            shutil.rmtree(Path(root, junk), ignore_errors=True)
        Path(root, "var/lib/apt/lists/partial").mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([DOCKER, "import", "-", BASE_IMAGE], stdin=tar.stdout, env=engine.env, check=True,
                       capture_output=True, timeout=300)
        tar.wait()
    return "debootstrapped"


def build_image(engine: Engine, cold: bool = False) -> float:
    """Build the grid's image as `docker compose build` would, with the host's CA as a build
    secret (for the TLS-intercepting proxy); seconds taken. `cold`: no layer from the cache
    (the base image is still the local one)."""
    started = time.monotonic()
    args = ["build", "--network", "host", "-t", IMAGE, *(["--no-cache"] if cold else [])]
    if CA_BUNDLE.exists():
        args += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
    for var in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        if os.environ.get(var):
            args += ["--build-arg", f"{var}={os.environ[var]}"]
    engine.docker(*args, ".", timeout=1200)
    took = time.monotonic() - started
    engine.docker("image", "prune", "-f", check=False)  # the images this tag replaced: the cache keeps its layers
    return took


@contextlib.contextmanager
def engine() -> Iterator[Engine]:
    eng = start_engine()
    try:
        yield eng
    finally:
        stop_engine(eng)


if __name__ == "__main__":
    # --cold: also time a build without the layer cache, then a warm one after a source change.
    cold = "--cold" in sys.argv[1:]
    with engine() as eng:
        t0 = time.monotonic()
        how = ensure_base_image(eng)
        print(f"{BASE_IMAGE}: {how} in {time.monotonic() - t0:.1f} s", flush=True)
        if cold:
            print(f"{IMAGE}: cold build (no cache) in {build_image(eng, cold=True):.1f} s", flush=True)
            marker = REPO / "src" / "gridpresence" / "_build_probe.py"  # a source edit, as a developer makes
            marker.write_text(f"# {time.time()}\n")
            try:
                print(f"{IMAGE}: warm build after a source change in {build_image(eng):.1f} s", flush=True)
            finally:
                marker.unlink()
        print(f"{IMAGE}: built in {build_image(eng):.1f} s", flush=True)
        print(eng.docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout, flush=True)
    sys.exit(0)
