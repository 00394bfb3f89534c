"""CPU of a device opening and checking one signed command, without a server: the gate's path
(open the <openpgp/>, read the signed content, parse the command, the issuer's pin, verify and
check) as a device host runs it, against the same path with the signed content read by the XML
parser (what it was before the template reader, protocol/openpgp.py), alternated in one run.

    ../.venv/bin/python verify.py [--commands 1000] [--rounds 21]

Prints median and p99 per command of each (CPU seconds: process_time), and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import percentile

from gridpresence.protocol import openpgp
from gridpresence.protocol.codec import command_to_text
from gridpresence.protocol.models import Action, Command, utcnow
from gridpresence.security.gate import CommandGate, open_command
from gridpresence.security.keys import fingerprint, generate
from gridpresence.security.pins import PinStore
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.signed import sign_payload

ISSUER, SERIAL = "alice@localhost", "SN-1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    key = generate(ISSUER)
    now = utcnow()
    devices = [f"load-{i}@devices.localhost" for i in range(args.commands)]
    wires = [sign_payload(command_to_text(Command.new(Action.SHED, ISSUER, now=now, serial=SERIAL)), d, key, now=now)
             for d in devices]
    gates = [CommandGate(d, SERIAL, SecuritySettings(), {ISSUER: Role.OPERATOR}, frozenset()) for d in devices]
    with tempfile.TemporaryDirectory() as tmp:
        pins = [PinStore(Path(tmp) / f"{i}.json") for i in range(args.commands)]
        for store in pins:
            store.provision({ISSUER: fingerprint(key)})
        public = key.pubkey

        def shed() -> None:
            for wire, gate, store in zip(wires, gates, pins):
                signed = open_command(wire)
                gate.may_issue(signed)
                assert store.pinned(signed.command.issuer) is not None
                gate.check(ISSUER, signed, public, utcnow())

        template = openpgp._signed_command

        def through_parser() -> None:
            openpgp._signed_command = lambda data: None  # type: ignore[assignment]
            try:
                shed()
            finally:
                openpgp._signed_command = template

        samples: dict[str, list[float]] = {"as a device host does": [], "signed content by the parser": []}
        runs: dict[str, Callable[[], None]] = {"as a device host does": shed, "signed content by the parser": through_parser}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.process_time()
                run()
                samples[name].append((time.process_time() - t0) / args.commands)
    print(f"open and check one signed command ({args.commands} devices, {args.rounds} rounds, CPU):")
    for name, values in samples.items():
        values.sort()
        print(f"  {name:<32} median {values[len(values) // 2] * 1e6:7.1f} us   p99 {percentile(values, 99) * 1e6:7.1f} us")
    mine, base = (sorted(v)[len(v) // 2] for v in samples.values())
    print(f"  ratio to the parser's path: {mine / base:.2f}x")


if __name__ == "__main__":
    main()
