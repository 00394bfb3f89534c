"""Health checks of a grid's containers: ``python -m gridpresence.host.health server|bots``.

They read ``DATA/connection.json`` with the standard library alone and exit 0 (healthy) or 1:
``server`` when the XMPP server on this machine offers STARTTLS for the grid's domain,
``bots`` when this machine holds at least one XMPP session to the grid's server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gridpresence.transport.probe import established_to, serves_xmpp


def check(what: str, data: Path) -> tuple[bool, str]:
    try:
        server = json.loads((data / "connection.json").read_text(encoding="utf-8"))["server"]
        port, domain = int(server["c2s_port"]), str(server["domain"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"{data / 'connection.json'}: not readable ({exc}); has the grid been provisioned?"
    if what == "server":
        ok = asyncio.run(serves_xmpp("127.0.0.1", port, domain))
        return ok, "XMPP server answers" if ok else f"no XMPP server answers on port {port}"
    n = established_to(port)
    return n > 0, f"{n} XMPP session(s) to port {port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridpresence.host.health", description=__doc__)
    parser.add_argument("what", choices=["server", "bots"])
    parser.add_argument("--data", type=Path, default=Path("/data"))
    args = parser.parse_args(argv)
    ok, why = check(args.what, args.data)
    print(why, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
