"""Is a party up? Probes cheap enough for a container's health check: standard library only
(importing the rest of the package would take seconds on a loaded machine)."""

from __future__ import annotations

import contextlib
from pathlib import Path


async def serves_xmpp(host: str, port: int, domain: str, timeout: float = 2.0) -> bool:
    """True once `host:port` accepts TCP and offers STARTTLS for `domain`.

    The kernel accepts TCP as soon as Prosody binds, before its event loop and the
    VirtualHost are up; asking for stream features proves the host really serves.
    """
    # Here, not above: the bots' check (established_to), run every few seconds, needs none of it
    # (xml.sax.saxutils alone pulls in urllib.request and http.client).
    import asyncio
    from xml.sax.saxutils import quoteattr

    header = (
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to={quoteattr(domain)} version='1.0'>"
    )
    try:  # the connect too is bounded: a firewall that drops the SYN would hold it for minutes
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(header.encode())
        received = b""
        async with asyncio.timeout(timeout):
            while b"</stream:features>" not in received and b"stream:error" not in received:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                received += chunk
        return b"starttls" in received
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()  # leave no half-open probe for Prosody to wait on


async def serves_http(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when `host:port` answers an HTTP request with a status line, whatever the status."""
    import asyncio

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            return (await reader.readline()).startswith(b"HTTP/")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def established_to(port: int, tables: tuple[Path, ...] = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))) -> int:
    """How many TCP connections of this network namespace (a container) are established to a
    remote `port`: a bot container holds its bots' XMPP sessions to the c2s port."""
    count = 0
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6, or not Linux
        for line in lines:
            fields = line.split()  # sl local remote state ...; addresses as HEXIP:HEXPORT
            if len(fields) > 3 and fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1  # state 01: ESTABLISHED
    return count
