"""TCP port helpers for the embedded server: pick free ports, and check them before binding."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@contextlib.contextmanager
def _bound(host: str, port: int) -> Iterator[socket.socket]:
    """A listening socket on (host, port), bound the way Prosody binds (SO_REUSEADDR).

    SO_REUSEADDR makes ports left in TIME_WAIT by a previous server count as free, exactly
    as they are for Prosody; a port with a live listener still fails to bind.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)
        yield sock
    finally:
        sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free on `host` right now (bind port 0, read it back)."""
    with _bound(host, 0) as sock:
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: the sockets are held open together so none repeats."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(_bound(host, 0)) for _ in range(count)]
        return [int(s.getsockname()[1]) for s in socks]


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind (host, port) now."""
    try:
        with _bound(host, port):
            return True
    except OSError:
        return False
