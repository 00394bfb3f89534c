#!/usr/bin/env python3
"""Cost of a signature per command: what the issuer and the device add for signing.

Baseline, same run: the unsigned wire work per command (the issuer encodes the <command/>
and serialises it; the device parses it and builds the model). Signed: the issuer encodes,
signs (XEP-0373 <sign/> in an OpenPGP signed message, Ed25519) and serialises; the device
parses, opens the OpenPGP message and runs the whole gate (signature, role, serial, window).
Rounds alternate the two so drift hits both. For reference, the same signature made and checked
through pgpy's object model (the general path, used for shapes and key types the hot path in
security/fastsig.py does not read) is timed too.

    python bench/signing.py [--n 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from xml.etree import ElementTree as ET

from common import percentile, summary

from gridpresence.protocol.codec import command_from_xml, command_to_xml
from gridpresence.protocol.models import Action, Command
from gridpresence.security.gate import CommandGate, open_command
from gridpresence.security.keys import generate
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.protocol.openpgp import sign_to_bytes
from gridpresence.security.pgp import pgpy
from gridpresence.security.signed import sign_payload
from pgpy.constants import CompressionAlgorithm

ISSUER, DEVICE, SERIAL = "alice@localhost", "dev-0001@localhost", "SN-000000000001"


def unsigned_once(cmd: Command) -> float:
    t0 = time.perf_counter()
    wire = ET.tostring(command_to_xml(cmd))  # issuer
    command_from_xml(ET.fromstring(wire))  # device
    return time.perf_counter() - t0


def signed_once(cmd: Command, key: object, public: object, gate: CommandGate) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    wire = ET.tostring(sign_payload(command_to_xml(cmd), DEVICE, key, now=cmd.issued))  # issuer
    t1 = time.perf_counter()
    signed = open_command(ET.fromstring(wire))  # device: the issuer's key comes from its keyring
    gate.check(ISSUER, signed, public, dt.datetime.now(dt.timezone.utc))  # type: ignore[arg-type]
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0, t2 - t1


def pgpy_once(cmd: Command, key: object, public: object) -> float:
    t0 = time.perf_counter()
    data = sign_to_bytes(DEVICE, cmd.issued, command_to_xml(cmd))
    message = pgpy.PGPMessage.new(data, format="b", compression=CompressionAlgorithm.Uncompressed)
    message |= key.sign(message)  # type: ignore[attr-defined]
    blob = bytes(message)
    assert public.verify(pgpy.PGPMessage.from_blob(blob))  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="commands per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    key = generate(ISSUER)
    public = key.pubkey  # pgpy makes a new object per .pubkey; a keyring holds one
    gate = CommandGate(DEVICE, SERIAL, SecuritySettings(), {ISSUER: Role.OPERATOR}, frozenset())
    base: list[float] = []
    signed: list[float] = []
    sign: list[float] = []
    verify: list[float] = []
    ratios: list[float] = []
    reference: list[float] = []
    for _ in range(args.rounds):
        cmds = [Command.new(Action.SHED, ISSUER, serial=SERIAL) for _ in range(args.n)]
        b = [unsigned_once(c) for c in cmds]
        s = [signed_once(c, key, public, gate) for c in cmds]
        reference += [pgpy_once(c, key, public) for c in cmds[: args.n // 4]]
        base += b
        signed += [x[0] for x in s]
        sign += [x[1] for x in s]
        verify += [x[2] for x in s]
        ratios.append(statistics.median(x[0] for x in s) / statistics.median(b))
    print(f"per command, {args.rounds} rounds of {args.n}:")
    results = {
        "unsigned_encode_decode": summary("unsigned: encode + decode", base),
        "signed_total": summary("signed: encode + sign + open + verify + gate", signed),
        "sign": summary("  of which issuer: encode + sign", sign),
        "verify": summary("  of which device: open + verify + gate", verify),
        "pgpy_sign_verify": summary("reference: pgpy sign + verify (no gate)", reference),
    }
    added = statistics.median(signed) - statistics.median(base)
    print(f"  signature adds {added * 1e6:.0f} us per command (median); ratio signed/unsigned median "
          f"{statistics.median(ratios):.1f}x (worst round {percentile(ratios, 100):.1f}x)")
    results["added_us_median"] = added * 1e6  # type: ignore[assignment]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
