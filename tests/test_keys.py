"""Every party's OpenPGP key: made at provisioning, kept across restarts, usable by GnuPG;
pins on first use refuse a changed key."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from gridpresence.server.accounts import RELAY, WATCHDOG
from gridpresence.security import keys
from gridpresence.security.pgp import pgpy
from gridpresence.security.pins import PinStore, PinVerdict

from conftest import Env


def test_every_provisioned_party_has_its_own_secret_key(env: Env) -> None:
    names = [o.name for o in env.fleet.operators] + [b.name for b in env.fleet.billing]
    names += [d.name for d in env.fleet.devices] + [WATCHDOG, RELAY]
    fingerprints = set()
    for name in names:
        path = env.grid.keys.secret_path(name)
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
        key = env.grid.keys.secret(name)
        assert keys.jid_of(key) == env.fleet.jid(name)  # XEP-0373 user id: xmpp:JID
        fingerprints.add(keys.fingerprint(key))
    assert len(fingerprints) == len(names)
    ops = {a.name: a for a in env.grid.connection.operators}
    assert ops["alice"].key_file == str(env.grid.keys.secret_path("alice"))


def test_keys_survive_a_second_provisioning(tmp_path: Path) -> None:
    store = keys.KeyStore(tmp_path / "keys")
    first = keys.fingerprint(keys.load_secret(store.ensure("meter-1", "meter-1@grid.test")))
    again = keys.fingerprint(keys.load_secret(store.ensure("meter-1", "meter-1@grid.test")))
    assert first == again


def test_gnupg_imports_the_key_and_verifies_its_signature(tmp_path: Path) -> None:
    key = keys.generate("alice@grid.test")
    (tmp_path / "alice.asc").write_text(str(key.pubkey))
    data = b"<command action='shed'/>"
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "data.sig").write_text(str(key.sign(data)))
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--no-autostart"]  # no agent left behind
    subprocess.run([*gpg, "--import", str(tmp_path / "alice.asc")], check=True, capture_output=True)
    listed = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True, capture_output=True, text=True).stdout
    assert "xmpp\\x3aalice@grid.test" in listed  # the user id, colon escaped by --with-colons
    assert keys.fingerprint(key) in listed  # fingerprints agree (the cached one is right)
    ok = subprocess.run([*gpg, "--verify", str(tmp_path / "data.sig"), str(tmp_path / "data")], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "data").write_bytes(data.replace(b"shed", b"stop"))
    tampered = subprocess.run([*gpg, "--verify", str(tmp_path / "data.sig"), str(tmp_path / "data")], capture_output=True)
    assert tampered.returncode != 0


def test_cached_fingerprint_matches_a_fresh_parse() -> None:
    key = keys.generate("billing@grid.test")
    reparsed, _ = pgpy.PGPKey.from_blob(str(key.pubkey))
    assert keys.fingerprint(reparsed) == keys.fingerprint(key)
    assert keys.fingerprint(keys.generate("billing@grid.test")) != keys.fingerprint(key)


def test_bad_key_files_give_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sec.asc"
    with pytest.raises(keys.KeyFileError, match="cannot read key file"):
        keys.load_secret(missing)
    garbage = tmp_path / "garbage.sec.asc"
    garbage.write_text("not a key")
    with pytest.raises(keys.KeyFileError, match="not an OpenPGP key"):
        keys.load_secret(garbage)
    public = tmp_path / "public.sec.asc"
    public.write_text(str(keys.generate("x@grid.test").pubkey))
    with pytest.raises(keys.KeyFileError, match="public key"):
        keys.load_secret(public)


def test_pins_on_first_use_and_refuses_a_changed_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pins.json"
    pins = PinStore(path)
    assert pins.check("alice@grid.test", "aa" * 20) is PinVerdict.NEW
    assert pins.check("alice@grid.test", "AA" * 20) is PinVerdict.SAME
    with caplog.at_level(logging.WARNING):
        assert PinStore(path).check("alice@grid.test", "BB" * 20) is PinVerdict.CHANGED  # survives a restart
    assert "CHANGED" in caplog.text and "AA" * 20 in caplog.text and "BB" * 20 in caplog.text
    assert PinStore(path).pinned("alice@grid.test") == "AA" * 20  # the pinned key stays
    pins.repin("alice@grid.test", "bb" * 20)
    assert PinStore(path).check("alice@grid.test", "BB" * 20) is PinVerdict.SAME
    assert path.stat().st_mode & 0o077 == 0
