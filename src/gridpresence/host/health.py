"""Health checks of a grid's containers: ``python -m gridpresence.host.health server|bots|dashboard``.

They read ``DATA/connection.json`` with the standard library alone and exit 0 (healthy) or 1:
``server`` when the XMPP server on this machine offers STARTTLS for the grid's domain,
``bots`` when this machine holds at least one XMPP session to the grid's server (on its XMPP
port, or on its BOSH port for a party behind a web-only firewall),
``dashboard`` when the dashboard on this machine (``--port``) serves its page over HTTPS with a
certificate from the grid's CA,
``gate`` when the web gate on this machine (``--port``) leads to the server's BOSH port: a TLS
handshake through it meets the server's certificate for the BOSH URL's host name,
``field`` when a field IED (the field simulator's Modbus server) accepts connections on ``--port``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from pathlib import Path

from gridpresence.transport.probe import established_to

# asyncio, ssl and urllib.request are imported by the checks that need them: the bots' check runs
# in every container every few seconds, and those imports would be most of its CPU time.


DASHBOARD_PORT = 8443  # `gridpresence dashboard`'s default


def check(what: str, data: Path, port: int = DASHBOARD_PORT) -> tuple[bool, str]:
    try:
        server = json.loads((data / "connection.json").read_text(encoding="utf-8"))["server"]
        c2s, domain = int(server["c2s_port"]), str(server["domain"])
        bosh_url = urllib.parse.urlsplit(str(server.get("bosh_url") or ""))
        bosh, bosh_host = bosh_url.port, bosh_url.hostname
        ca = str(server.get("ca_file") or data / "certs" / "ca.pem")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        return False, f"{data / 'connection.json'}: not readable ({exc}); has the grid been provisioned?"
    if what == "server":
        import asyncio

        from gridpresence.transport.probe import serves_xmpp

        ok = asyncio.run(serves_xmpp("127.0.0.1", c2s, domain))
        return ok, "XMPP server answers" if ok else f"no XMPP server answers on port {c2s}"
    if what == "dashboard":
        return _dashboard(port, ca)
    if what == "gate":
        return _gate(port, ca, bosh_host or domain)
    if what == "field":
        return _field(port)
    n = established_to(c2s)
    if n > 0:
        return True, f"{n} XMPP session(s) to port {c2s}"
    n = established_to(bosh) if bosh else 0
    return n > 0, f"no XMPP session to port {c2s}, {n} to the BOSH port {bosh}"


def _gate(port: int, ca: str, host: str) -> tuple[bool, str]:
    import socket
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=ca)
        with socket.create_connection(("127.0.0.1", port), timeout=4) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return True, f"port {port} leads to the server's HTTPS port ({host}, TLS verified)"
    except (OSError, ssl.SSLError, ValueError) as exc:
        return False, f"port {port}: no TLS to {host} through it ({exc})"


def _field(port: int) -> tuple[bool, str]:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=4):
            return True, f"a field IED answers on port {port}"
    except OSError as exc:
        return False, f"no field IED answers on port {port} ({exc})"


def _dashboard(port: int, ca: str) -> tuple[bool, str]:
    import ssl
    import urllib.request

    url = f"https://127.0.0.1:{port}/"
    try:
        ctx = ssl.create_default_context(cafile=ca)  # its certificate names 127.0.0.1
        with urllib.request.urlopen(url, context=ctx, timeout=4) as resp:
            return resp.status == 200, f"{url}: HTTP {resp.status}"
    except (OSError, ssl.SSLError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridpresence.host.health", description=__doc__)
    parser.add_argument("what", choices=["server", "bots", "dashboard", "gate", "field"])
    parser.add_argument("--data", type=Path, default=Path("/data"))
    parser.add_argument("--port", type=int, default=DASHBOARD_PORT, help="the dashboard's, the gate's or the field IED's port")
    args = parser.parse_args(argv)
    ok, why = check(args.what, args.data, args.port)
    print(why, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
