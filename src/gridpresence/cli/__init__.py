"""``gridpresence``: run the grid network on the embedded server and operate it.

    gridpresence up [--fleet FILE] [--data DIR] [--without NAME...] [--log-level L]
                                                      server + accounts + bots, until Ctrl-C
    gridpresence demo [--once]                        up, then a narrated load-shed scenario
    gridpresence status [--json]                      every device's state and telemetry
    gridpresence watch [--json]                       presence changes, live
    gridpresence shed|restore|start|stop|open|close|read DEVICE... [--json]
    gridpresence set-time DEVICE... [--time ISO]
    gridpresence bots --data DIR --only NAME...       run some bots apart (e.g. to kill one)
    gridpresence relay --data DIR                     the email store-and-forward relay alone
    gridpresence dashboard --data DIR [--port 8443]   the operators' web dashboard alone
    gridpresence scenario --data DIR [--queue-for DEVICE]
                                                      the demo against a running grid (or its relay step)
    gridpresence mail-device NAME --data DIR          a device that reaches the grid by SMTP only
    gridpresence alert DEVICE [--timeout S]           wait until a device is available
    gridpresence ack DEVICE [ID]                      acknowledge an alarm (all open ones without ID)
    gridpresence judge DEVICE ID fault|not-a-fault    a verdict on an alarm (thresholds learn from it)
    gridpresence rules replay TRACE.csv [--json]      alarms and threshold changes of a rule set over a trace
    gridpresence gateway SITE.toml [--data DIR]       a site's Modbus/DNP3 IEDs as device identities
    gridpresence history DEVICE... [--from T] [--to T] [--every 1m] --csv|--xlsx|--json [--out FILE]
                                                      the historian's data, self-describing

Every command finds ``connection.json`` (written by ``up``) the same way
(:func:`gridpresence.xmpp.session.connection_path`): --connection, else DATA/connection.json
for a command given --data, else $GRIDPRESENCE_CONNECTION, else .gridpresence/connection.json.

A package of sub-commands: ``up`` (up, demo, bots), ``operate`` (the operator's commands),
``relay`` (relay, mail-device), ``rules``, ``keys``, ``gateway``, ``history``; ``common`` is what they share. May import:
every layer below; nothing but ``gridpresence.__main__`` imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
from collections.abc import Sequence

from gridpresence.cli import gateway, history, keys, operate, relay, rules, up
from gridpresence.cli.common import EXIT_ERROR, EXIT_FAILED_OUTCOME, EXIT_OK, CliError, Interrupted
from gridpresence.config import FleetError
from gridpresence.operator.library import UnknownDevice
from gridpresence.rules.model import RuleSetError
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.keys import KeyFileError
from gridpresence.security.ox import OxRefused
from gridpresence.server import ServerError
from gridpresence.xmpp.session import SessionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridpresence", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up.register(sub)
    operate.register(sub)
    relay.register(sub)
    rules.register(sub)
    keys.register(sub)
    gateway.register(sub)
    history.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "action", None) == "set-time" and not args.time:
        args.time = dt.datetime.now(dt.timezone.utc).isoformat()
    try:
        return asyncio.run(args.run(args))
    except (CliError, FleetError, KeyFileError, KeyUnavailable, OxRefused, RuleSetError, ServerError, SessionError,
            UnknownDevice) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Interrupted) as exc:
        # Ending a command that runs until stopped (watch, alarms) is what Ctrl-C is for.
        if getattr(args, "until_stopped", False):
            return EXIT_OK
        # Commands sent still without an outcome go on without us: say so, and where they are.
        if isinstance(exc, Interrupted) and exc.waiting:
            print(f"gridpresence {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`status | head`): as the Python docs advise for SIGPIPE, point
        # stdout at devnull so the flush at exit cannot fail again, and leave quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_OUTCOME


if __name__ == "__main__":
    sys.exit(main())
