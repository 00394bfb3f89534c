"""The fleet file as a person (or a fuzzer) writes it: every defect is a FleetError that names
the field and the party, never a traceback, and what passes validation is accepted by the
account provisioning that follows (no roster Prosody would refuse, no domain it cannot host)."""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from conftest import ROOT
from gridpresence.server.accounts import Secrets, plan_accounts
from gridpresence.config import FleetError, load_fleet, parse_fleet
from gridpresence.server.provision import provision

DEMO = ROOT / "bots" / "demo-fleet.toml"
OPS = [{"name": "olga"}]


def _load(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "kind": "load", "rated_kw": 10, **extra}


def _accepted_by_provisioning(fleet_dir: Path, fleet_path: Path) -> None:
    """What validation lets through must provision: rosters and JIDs Prosody takes."""
    fleet = load_fleet(fleet_path)
    accounts = plan_accounts(fleet, Secrets(fleet_dir / "secrets.json"))
    provision(fleet_dir / "prosody", fleet.domain, accounts, iterations=1)


def test_errors_name_the_device(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text(DEMO.read_text().replace("rated_kw = 40\nparent = \"branch-b\"", "rated_kw = 0\nparent = \"branch-b\""))
    with pytest.raises(FleetError) as caught:
        load_fleet(path)
    assert f"{path}: devices[8] (load-5).rated_kw: Input should be greater than 0" in str(caught.value)
    with pytest.raises(FleetError, match=r"devices\[1\] \('Bad!'\)\.name: must be lowercase"):
        parse_fleet({"operators": OPS, "devices": [_load("ok"), _load("Bad!")]})
    with pytest.raises(FleetError, match=r"devices\[1\] \(b\)\.parent: no device named 'nowhere'"):
        parse_fleet({"operators": OPS, "devices": [_load("a"), _load("b", parent="nowhere")]})
    # Only wrong devices: their own errors, not also "at least 1 item" (the file has one).
    with pytest.raises(FleetError) as caught:
        parse_fleet({"operators": OPS, "devices": [_load("d1", kind="lod", rated_kw=-1)]})
    assert str(caught.value).splitlines() == [
        "fleet: devices[0] (d1).kind: Input should be 'load', 'generator', 'meter', 'breaker' or 'master'",
        "fleet: devices[0] (d1).rated_kw: Input should be greater than 0"]
    with pytest.raises(FleetError, match=r"fleet: devices: .*at least 1 item"):  # an empty list still says so
        parse_fleet({"operators": OPS, "devices": []})


def test_unreadable_paths_are_fleet_errors(tmp_path: Path) -> None:
    (tmp_path / "latin1.toml").write_bytes('[[operators]]\nname = "j\xf6rg"\n'.encode("latin-1"))
    (tmp_path / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "bigint.json").write_text('{"presence_grace_s": ' + "9" * 5000 + "}")
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = {tmp_path: "cannot read the fleet file: Is a directory", tmp_path / "missing.toml": "no such fleet file",
             tmp_path / "latin1.toml": "not a text file in UTF-8", tmp_path / "deep.toml": "not valid TOML",
             tmp_path / "deep.json": "not valid JSON", tmp_path / "bigint.json": "not valid JSON",
             tmp_path / "list.json": "a table of settings"}
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.toml"
        locked.write_text(DEMO.read_text())
        locked.chmod(0)
        cases[locked] = "Permission denied"
    for path, message in cases.items():
        with pytest.raises(FleetError, match=re.escape(message)):
            load_fleet(path)


def test_a_deep_parent_chain_loads_and_a_cycle_is_named(tmp_path: Path) -> None:
    chain = [{"name": "top", "kind": "master", "rated_kw": 10}]
    chain += [{"name": f"m{i}", "kind": "meter", "rated_kw": 10, "parent": f"m{i - 1}" if i else "top"}
              for i in range(1100)]
    fleet = parse_fleet({"operators": OPS, "devices": chain})
    assert len(fleet.descendants("top")) == 1100 and fleet.descendants("m1098") == (fleet.device("m1099"),)
    started = time.monotonic()
    accounts = plan_accounts(fleet, Secrets(tmp_path / "secrets.json"))
    assert time.monotonic() - started < 5 and len(accounts) == 1101 + 1 + 3
    chain[0] = {**chain[0], "parent": "m1099"}
    with pytest.raises(FleetError, match=r"devices\[0\] \(top\)\.parent: parent cycle top -> m1099 -> m1098 -> \.\.\. -> m0 -> top \(1101 devices\)"):
        parse_fleet({"operators": OPS, "devices": chain})
    with pytest.raises(FleetError, match=r"parent cycle solo -> solo"):
        parse_fleet({"operators": OPS, "devices": [_load("solo", parent="solo")]})


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\n", "\x7f", "\x85", "\ud800", "\ufffe"])
def test_control_characters_in_names_a_person_reads_are_refused(char: str) -> None:
    text = f"Pump{char}house"
    for data, where in [
        ({"operators": OPS, "devices": [_load("pump", display_name=text)]}, r"devices\[0\] \(pump\)\.display_name"),
        ({"operators": [{"name": "olga", "display_name": text}], "devices": [_load("pump")]}, r"operators\[0\] \(olga\)\.display_name"),
        ({"operators": OPS, "billing": [{"name": "bill", "supplier": text}], "devices": [_load("pump")]},
         r"billing\[0\] \(bill\)\.supplier"),
    ]:
        # A lone surrogate pydantic refuses itself, as no valid string.
        with pytest.raises(FleetError, match=where + ": (must not contain control characters|.*valid string)"):
            parse_fleet(data)
    # Through a JSON fleet file too (JSON can spell a lone surrogate, TOML cannot).
    assert parse_fleet({"operators": OPS, "devices": [_load("pump", display_name="Pompe \u00e0 chaleur \u2603")]})


@pytest.mark.parametrize("domain", ["a..b", "-", ".grid", "grid.", "-grid.example", "grid-.example", "x" * 64 + ".example",
                                    "Grid.Example", "grid example", "grid_1", "", "a." * 127 + "a"])
def test_domain_must_be_a_host_name(domain: str) -> None:
    with pytest.raises(FleetError, match=r"domain: must be a host name"):
        parse_fleet({"operators": OPS, "domain": domain, "devices": [_load("pump")]})


@pytest.mark.parametrize("domain", ["localhost", "grid.example", "substation-1.grid.example", "x" * 63, "10.0.0.1"])
def test_good_domains_provision(tmp_path: Path, domain: str) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"operators": OPS, "domain": domain, "devices": [_load("pump")]}))
    _accepted_by_provisioning(tmp_path, path)


def test_serials_and_names_are_unique_across_the_fleet() -> None:
    with pytest.raises(FleetError, match=r"devices\[1\] \(b\)\.serial: serial 'SN-1' is used twice \(also devices\[0\] \(a\)\)"):
        parse_fleet({"operators": OPS, "devices": [_load("a", serial="SN-1"), _load("b", serial="SN-1")]})
    # A serial given by hand may not be another device's default one either.
    default = parse_fleet({"operators": OPS, "devices": [_load("a")]}).device("a").serial
    with pytest.raises(FleetError, match="serial .* is used twice"):
        parse_fleet({"operators": OPS, "devices": [_load("a"), _load("b", serial=default)]})
    with pytest.raises(FleetError, match=r"devices\[0\] \(olga\)\.name: name 'olga' is used twice \(also operators\[0\]"):
        parse_fleet({"operators": OPS, "devices": [_load("olga")]})


# -- fuzz ----------------------------------------------------------------------------------

FUZZ_SEED = 20240611
FUZZ_CASES = 300
FUZZ_BUDGET_S = 5.0
VALUES = ["0", "-1", "1e309", "nan", "inf", "true", "[]", "{}", '""', '"a..b"', '"-"', '"\\u0000"', '"\\u001b[31m"',
          '"x\\ty"', '"master"', '"load-1"', '"far-1"', '"SN-1"', '"on"', '"toaster"', "2024-01-01", "99999999999999999999",  # calendar: a TOML date as a value
          '"' + "z" * 300 + '"', '"\\ud7ff"', '"\\ufffd"', '"\\u0085"', '"Ünïcödé"', "{ a = 1 }", "[1, [2, [3]]]", "0x10"]


def _mutate(rng: random.Random, text: bytes) -> bytes:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0:  # flip a byte
            raw = bytearray(b"\n".join(lines))
            raw[rng.randrange(len(raw))] = rng.randrange(256)
            lines = bytes(raw).splitlines()
        elif op == 1 and lines:  # delete a line
            del lines[rng.randrange(len(lines))]
        elif op == 2 and lines:  # duplicate a line
            i = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif op == 3:  # a random value for a field
            fields = [i for i, line in enumerate(lines) if re.match(rb"^\w+ = ", line)]
            if fields:
                i = rng.choice(fields)
                lines[i] = lines[i].split(b" = ", 1)[0] + b" = " + rng.choice(VALUES).encode()
        else:  # a deep parent chain, sometimes closed into a cycle
            depth = 1100 if rng.random() < 0.05 else rng.choice([2, 30])  # deep ones are slow to parse: a few
            top = rng.choice(["master", "load-1", "chain-0", "nowhere"])
            for k in range(depth):
                parent = top if k == 0 else f"chain-{k - 1}"
                lines += [b"[[devices]]", f'name = "chain-{k}"'.encode(), b'kind = "meter"', b"rated_kw = 1",
                          f'parent = "{parent}"'.encode()]
    return b"\n".join(lines) + b"\n"


def test_fuzzed_fleet_files_load_or_raise_fleet_error(tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED)
    base = DEMO.read_bytes()
    started = time.monotonic()
    accepted = refused = 0
    for case in range(FUZZ_CASES):
        path = tmp_path / f"case-{case}.toml"
        path.write_bytes(_mutate(rng, base))
        try:
            _accepted_by_provisioning(tmp_path / f"data-{case}", path)
            accepted += 1
        except FleetError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            refused += 1
        except Exception as exc:  # anything else is the bug this test is for
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}\n{path.read_text(errors='replace')}") from exc
        if time.monotonic() - started > FUZZ_BUDGET_S:
            break
    print(f"fuzz: {case + 1} cases, {accepted} accepted, {refused} refused, {time.monotonic() - started:.1f} s")
    assert accepted >= 5 and refused >= 5, (accepted, refused)  # the mutations reach both sides
