"""A web-only gate: ``python -m gridpresence.transport.forward --listen ADDR:PORT --to HOST:PORT``.

The compose demo's field network has no route to the grid: its one way out is this gate, which
passes TCP to a single upstream port, the XMPP server's HTTPS (BOSH) port, and nothing else, as
a site firewall that lets only web traffic out does. A device there finds the XMPP port closed
and falls back to BOSH (transport/policy.py); TLS is end to end (the gate only copies bytes), so
the device still checks the server's certificate against the grid's CA.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

log = logging.getLogger(__name__)

CHUNK = 65536


def address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (argparse type): a clear error for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port of 1-65535, not {text!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> asyncio.Server:
    """Accept on `listen`; copy each connection both ways to `upstream` (dialled per connection,
    so an upstream that restarts, or changes address, is found again)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*upstream), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("gate: %s:%d unreachable (%s)", *upstream, exc)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return await asyncio.start_server(handle, *listen)


async def _main(args: argparse.Namespace) -> None:
    server = await serve(args.listen, args.to)
    print(f"gate: {args.listen[0]}:{args.listen[1]} -> {args.to[0]}:{args.to[1]}, nothing else", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridpresence.transport.forward", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=address, required=True, help="ADDR:PORT to accept on")
    parser.add_argument("--to", type=address, required=True, help="HOST:PORT to pass connections to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the listening port taken or not ours
        print(f"error: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
