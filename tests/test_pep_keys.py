"""Public keys over PEP (XEP-0373 §4), pinned on first use, against the real Prosody.

The account that misbehaves (an attacker holding its password, garbage in its nodes) is
``remote-1``: it is not run by the session grid, and its real key is re-announced at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from gridpresence.device.agent import DeviceAgent
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.security.keyring import KeyChanged, KeyUnavailable
from gridpresence.security.keys import fingerprint, generate
from gridpresence.protocol.ox_xml import (
    PUBLIC_KEYS_NODE,
    KeyAnnouncement,
    key_node,
    metadata_to_xml,
    ox,
    pubkey_to_xml,
)
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.transport.policy import GridClient
from conftest import Env, run_cli

VICTIM = "remote-1"


def _fpr(env: Env, name: str) -> str:
    return fingerprint(env.grid.keys.secret(name))


async def _login(env: Env, name: str, resource: str, keys: PartyKeys | None = None,
                 endpoint: Any = None) -> tuple[GridClient, PepKeyring]:
    endpoint = endpoint or env.grid.endpoint
    client = make_client(f"{env.fleet.jid(name)}/{resource}", env.grid.secrets.password(name), endpoint)
    ring = PepKeyring(client, keys)
    await open_session(client, endpoint)
    client.send_presence()  # available: notifications to the bare JID reach this session
    await ring.announced()
    return client, ring


@pytest.fixture
async def observer(env: Env, tmp_path: Path) -> AsyncIterator[PepKeyring]:
    """A party with no cache and its own pins file: bob, on a resource of his own."""
    client, ring = await _login(env, "bob", f"observer-{tmp_path.name[-6:]}", PartyKeys(None, tmp_path / "bob.json"))
    try:
        yield ring
    finally:
        await close_session(client)


@pytest.fixture
async def victim(env: Env) -> AsyncIterator[tuple[GridClient, PepKeyring]]:
    """remote-1 logged in with its real key announced; announced again afterwards, whatever the test left."""
    keys = PartyKeys.in_data_dir(env.data, VICTIM)
    client, ring = await _login(env, VICTIM, "real", keys)
    try:
        yield client, ring
    finally:
        assert ring.secret_key is not None
        await ring.publish(ring.secret_key)
        await close_session(client)


async def _publish_raw(client: GridClient, node: str, payload: ET.Element, item_id: str | None = None) -> None:
    """What any client holding the account's password can put in its PEP nodes."""
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#publish-options")
    form.add_field(var="pubsub#access_model", value="open")
    await client.plugin["xep_0060"].publish(client.boundjid.bare, node, id=item_id, payload=payload, options=form)


async def _announce_raw(client: GridClient, data: ET.Element, fpr: str) -> None:
    await _publish_raw(client, key_node(fpr), data, f"{_created():%Y-%m-%dT%H:%M:%SZ}")
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    await _publish_raw(client, PUBLIC_KEYS_NODE, metadata_to_xml([KeyAnnouncement(fpr, now)]))


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


# -- parties find each other's keys -------------------------------------------------------


async def test_parties_see_each_others_keys_over_pep(env: Env, alice: GridOperator) -> None:
    bots = env.grid.bots
    assert bots is not None
    master = bots.devices["master"]
    key = await alice.keyring.key_for(env.fleet.jid("master"))  # operator <- device
    assert fingerprint(key) == _fpr(env, "master") and key.is_public
    key = await master.keyring.key_for(env.fleet.jid("alice"))  # device <- operator
    assert fingerprint(key) == _fpr(env, "alice")
    key = await master.keyring.key_for(env.fleet.jid("billing"))  # not in each other's roster
    assert fingerprint(key) == _fpr(env, "billing")
    for service in ("watchdog", "console"):  # the relay is not run by the session grid
        assert fingerprint(await alice.keyring.key_for(env.fleet.jid(service))) == _fpr(env, service)
    assert master.keyring.cached(env.fleet.jid("alice")) is not None  # the hot path needs no round trip
    pins = json.loads((env.data / "pins" / "master.json").read_text())
    assert pins[env.fleet.jid("alice")] == _fpr(env, "alice")
    assert pins[env.fleet.jid("billing")] == _fpr(env, "billing")


async def test_announcement_is_xep_0373_and_open_to_anyone(env: Env, observer: PepKeyring) -> None:
    """What an OX chat client reads: metadata lists the fingerprint, the data node the Base64 key."""
    pubsub = observer.client.plugin["xep_0060"]
    jid = env.fleet.jid("billing")  # bob has billing in his roster, but the nodes are open anyway
    meta = await pubsub.get_items(jid, PUBLIC_KEYS_NODE, max_items=1)
    listing = list(meta["pubsub"]["items"])[0]["payload"]
    entries = listing.findall(ox("pubkey-metadata"))
    assert [e.get("v4-fingerprint") for e in entries] == [_fpr(env, "billing")]
    assert entries[0].get("date", "").endswith("Z")
    data = await pubsub.get_items(jid, key_node(_fpr(env, "billing")), max_items=1)
    item = list(data["pubsub"]["items"])[0]
    blob = base64.b64decode(item["payload"].find(ox("data")).text)
    assert blob == bytes(env.grid.keys.secret("billing").pubkey)
    assert item["id"] == entries[0].get("date")  # the key's creation time (XEP-0082)


async def test_concurrent_lookups_share_one_fetch(env: Env, observer: PepKeyring) -> None:
    sent: list[str] = []
    observer.client.add_filter("out", lambda stanza: sent.append(stanza.name) or stanza)
    keys = await asyncio.gather(*(observer.key_for(env.fleet.jid("gen-1")) for _ in range(20)))
    assert len({fingerprint(k) for k in keys}) == 1
    assert sent.count("iq") <= 3  # metadata, key, subscription: not 20 of each


# -- trust on first use -----------------------------------------------------------------


async def test_changed_key_is_refused_loudly_and_the_pinned_one_stays(
        env: Env, observer: PepKeyring, victim: tuple[GridClient, PepKeyring], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    jid, real = env.fleet.jid(VICTIM), _fpr(env, VICTIM)
    assert fingerprint(await observer.key_for(jid)) == real  # pinned on first use
    # Someone with remote-1's password (not its key file) announces a key of their own.
    attacker_client, attacker = await _login(env, VICTIM, "attacker")
    forged = generate(jid)
    try:
        with caplog.at_level(logging.WARNING):
            assert await attacker.publish(forged)
            # The observer follows remote-1's announcements: the change is seen without asking.
            await _eventually(lambda: bool(observer.warnings))
    finally:
        await close_session(attacker_client)
    change = observer.warnings[0]
    assert (change.jid, change.pinned, change.offered) == (jid, real, fingerprint(forged))
    assert any("CHANGED" in r.message and real in r.message and fingerprint(forged) in r.message
               for r in caplog.records if r.levelno == logging.WARNING)
    cached = observer.cached(jid)
    assert cached is not None and fingerprint(cached) == real  # the pinned key stays in force
    assert fingerprint(await observer.key_for(jid)) == real
    # A party that restarts with the same pins file fetches afresh and refuses the new key.
    client, restarted = await _login(env, "bob", "restarted", PartyKeys(None, observer.pins.path))
    try:
        with pytest.raises(KeyChanged) as refused:
            await restarted.key_for(jid)
        assert real in str(refused.value) and fingerprint(forged) in str(refused.value)
        assert restarted.cached(jid) is None
    finally:
        await close_session(client)
    # The warning is on disk for `gridpresence keys`.
    assert observer.pins.path is not None
    changes = json.loads(observer.pins.path.with_name("bob.changes.json").read_text())
    assert changes == {jid: fingerprint(forged)}


async def test_a_party_announces_again_over_a_key_that_replaced_its_own(
        env: Env, victim: tuple[GridClient, PepKeyring]) -> None:
    client, ring = victim
    attacker_client, attacker = await _login(env, VICTIM, "attacker2")
    await attacker.publish(generate(env.fleet.jid(VICTIM)))
    await close_session(attacker_client)
    assert ring.secret_key is not None
    assert await ring.publish(ring.secret_key)  # not skipped: the metadata no longer lists it
    assert not await ring.publish(ring.secret_key)  # now skipped: two IQs saved at every login


# -- bad or missing keys -------------------------------------------------------------------


def _pubkey_with(data: str) -> ET.Element:
    el = ET.Element(ox("pubkey"))
    ET.SubElement(el, ox("data")).text = data
    return el


def _created() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


@pytest.mark.parametrize("case", ["garbage-base64", "not-a-key", "other-jids-uid", "fingerprint-mismatch",
                                  "no-pubkey-element", "bad-metadata"])
async def test_bad_announcements_leave_no_key_and_a_reason(
        env: Env, observer: PepKeyring, victim: tuple[GridClient, PepKeyring], case: str) -> None:
    client, _ring = victim
    jid = env.fleet.jid(VICTIM)
    other = generate(env.fleet.jid("alice"))
    own = generate(jid)
    fpr, expect = fingerprint(own), ""
    if case == "garbage-base64":
        await _announce_raw(client, _pubkey_with("!!! not base64 !!!"), fpr)
        expect = "not Base64"
    elif case == "not-a-key":
        await _announce_raw(client, _pubkey_with(base64.b64encode(b"hello, grid").decode()), fpr)
        expect = "not an OpenPGP key"
    elif case == "other-jids-uid":
        fpr = fingerprint(other)
        await _announce_raw(client, pubkey_to_xml(bytes(other.pubkey), _created()), fpr)
        expect = f"not for {jid}"
    elif case == "fingerprint-mismatch":
        await _announce_raw(client, pubkey_to_xml(bytes(generate(jid).pubkey), _created()), fpr)
        expect = "fingerprint mismatch"
    elif case == "no-pubkey-element":
        await _announce_raw(client, ET.Element("{urn:example}junk"), fpr)
        expect = "no <pubkey"
    else:
        await _publish_raw(client, PUBLIC_KEYS_NODE, ET.Element(ox("public-keys-list")))
        meta = ET.Element(ox("public-keys-list"))
        ET.SubElement(meta, ox("pubkey-metadata"), {"v4-fingerprint": "XYZ", "date": f"{_created():%Y-%m-%dT%H:%M:%SZ}"})
        await _publish_raw(client, PUBLIC_KEYS_NODE, meta)
        expect = "not 40 hex digits"
    with pytest.raises(KeyUnavailable) as err:
        await observer.key_for(jid)
    assert not isinstance(err.value, KeyChanged)
    assert expect in err.value.reason
    assert observer.cached(jid) is None and observer.pins.pinned(jid) is None  # nothing pinned
    # A device bot asking the same gets the same answer and keeps running.
    bots = env.grid.bots
    assert bots is not None
    device = bots.devices["meter-1"]
    with pytest.raises(KeyUnavailable):
        await device.keyring.key_for(jid)
    assert device.client.is_connected()
    assert fingerprint(await device.keyring.key_for(env.fleet.jid("alice"))) == _fpr(env, "alice")


async def test_nothing_published_and_unknown_parties(
        env: Env, observer: PepKeyring, victim: tuple[GridClient, PepKeyring]) -> None:
    client, _ring = victim
    for node in (PUBLIC_KEYS_NODE,):
        await client.plugin["xep_0060"].delete_node(client.boundjid.bare, node)
    with pytest.raises(KeyUnavailable, match="no key published"):
        await observer.key_for(env.fleet.jid(VICTIM))
    with pytest.raises(KeyUnavailable, match="forbidden"):  # Prosody's answer for a user that does not exist
        await observer.key_for("nobody@localhost")


async def test_unreadable_node_says_forbidden(env: Env, observer: PepKeyring,
                                              victim: tuple[GridClient, PepKeyring]) -> None:
    client, _ring = victim
    pubsub = client.plugin["xep_0060"]
    await pubsub.delete_node(client.boundjid.bare, PUBLIC_KEYS_NODE)
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#publish-options")
    form.add_field(var="pubsub#access_model", value="whitelist")
    other = fingerprint(generate(env.fleet.jid(VICTIM)))
    await pubsub.publish(client.boundjid.bare, PUBLIC_KEYS_NODE,
                         payload=metadata_to_xml([KeyAnnouncement(other, _created())]), options=form)
    with pytest.raises(KeyUnavailable, match="forbidden|item-not-found"):
        await observer.key_for(env.fleet.jid(VICTIM))
    # The victim's own announcement heals the node: it is reconfigured to open, its key listed.
    assert _ring.secret_key is not None
    assert await _ring.publish(_ring.secret_key)
    assert fingerprint(await observer.key_for(env.fleet.jid(VICTIM))) == _fpr(env, VICTIM)


async def test_silent_party_times_out_with_a_reason(env: Env, observer: PepKeyring) -> None:
    with pytest.raises(KeyUnavailable, match="no answer"):
        await observer.key_for(env.fleet.jid("gen-2"), timeout=0.000001)


# -- restarts, BOSH, the command line ---------------------------------------------------------


async def test_restarted_party_keeps_its_key_and_pins(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    name = "victim-2"
    keys = PartyKeys.in_data_dir(env.data, name)
    operators = [env.fleet.jid(o.name) for o in env.fleet.operators]

    def device() -> DeviceAgent:
        return DeviceAgent(env.fleet.device(name), env.fleet.jid(name), env.grid.secrets.password(name),
                           env.grid.endpoint, operators, keys=keys)

    first = device()
    await first.start()
    try:
        await first.keyring.key_for(env.fleet.jid("alice"))
    finally:
        await first.stop()
    assert keys.pins_file is not None
    pins_before = keys.pins_file.read_text()
    second = device()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gridpresence.security"):
        await second.start()
        try:
            key = await second.keyring.key_for(env.fleet.jid("alice"))
        finally:
            await second.stop()
    assert fingerprint(key) == _fpr(env, "alice")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("announced OpenPGP key" in m for m in messages)  # still announced: nothing re-published
    assert not any("pinned" in m for m in messages)  # still pinned: no new trust decision
    assert keys.pins_file.read_text() == pins_before


async def test_bosh_party_announces_and_is_found(env: Env, observer: PepKeyring) -> None:
    # Nothing listens on this port: the XMPP port "refuses", only HTTPS gets through.
    from gridpresence.server import free_port

    blocked = env.grid.endpoint.model_copy(update={"c2s_port": free_port()})
    name = "victim-1"
    keys = PartyKeys.in_data_dir(env.data, name)
    client, ring = await _login(env, name, "bosh", keys, endpoint=blocked)
    try:
        assert client.transport_name == "bosh"
        assert await ring.announced()
        assert fingerprint(await observer.key_for(env.fleet.jid(name))) == _fpr(env, name)
        assert fingerprint(await ring.key_for(env.fleet.jid("alice"))) == _fpr(env, "alice")  # and looks up over BOSH
    finally:
        await close_session(client)


async def test_keys_command_lists_parties_pins_and_changes(env: Env, alice: GridOperator) -> None:
    await alice.keyring.key_for(env.fleet.jid("master"))
    code, out, err = await run_cli("keys", "--data", str(env.data), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["parties"]["master"]["fingerprint"] == _fpr(env, "master")
    assert data["parties"]["master"]["jid"] == env.fleet.jid("master")
    assert data["pins"]["alice"][env.fleet.jid("master")] == _fpr(env, "master")
    code, out, err = await run_cli("keys", "--data", str(env.data))
    assert code == 0, err
    assert _fpr(env, "master") in out and "alice" in out
    code, out, err = await run_cli("keys", "--data", str(env.data / "nowhere"))
    assert code != 0 and "error:" in err and "Traceback" not in err


async def test_keys_repin_accepts_a_rotated_key(env: Env, victim: tuple[GridClient, PepKeyring]) -> None:
    jid, real = env.fleet.jid(VICTIM), _fpr(env, VICTIM)
    bots = env.grid.bots
    assert bots is not None
    watcher = bots.devices["pulse-meter"]
    assert fingerprint(await watcher.keyring.key_for(jid)) == real
    rotated_client, rotated = await _login(env, VICTIM, "rotated")
    new = generate(jid)
    try:
        await rotated.publish(new)
        await _eventually(lambda: any(w.jid == jid for w in watcher.keyring.warnings))
        code, out, err = await run_cli("keys", "--data", str(env.data))
        assert code == 0 and "CHANGED" in out and fingerprint(new) in out
        code, out, err = await run_cli("keys", "repin", "--data", str(env.data), "--as", "pulse-meter", jid)
        assert code == 0, err
        assert real in out and fingerprint(new) in out
        # The running bot takes the new pin from the file: its next lookup gives the rotated key.
        assert fingerprint(await watcher.keyring.key_for(jid)) == fingerprint(new)
    finally:
        await close_session(rotated_client)
    for bad in (["--as", "no-such-party", jid], ["--as", "pulse-meter", "nobody@localhost"],
                ["--as", "pulse-meter", "not a jid"]):
        code, out, err = await run_cli("keys", "repin", "--data", str(env.data), *bad)
        assert code != 0 and "error:" in err and "Traceback" not in err, (bad, err)


async def test_operator_without_its_key_file_works_read_only(env: Env, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    info = env.grid.connection
    acc = info.operator("bob").model_copy(update={"key_file": str(tmp_path / "missing.sec.asc")})
    op = GridOperator.from_connection(info.model_copy(update={"operators": (acc,)}), resource="no-key")
    with caplog.at_level(logging.WARNING):
        await op.connect(settle_s=0.1)
    try:
        assert op.keyring.secret_key is None
        assert any("cannot sign" in r.getMessage() for r in caplog.records)
        assert fingerprint(await op.keyring.key_for(env.fleet.jid("master"))) == _fpr(env, "master")
        assert op.devices["master"].present  # the rest of the operator works as before
    finally:
        await op.close()
    assert (tmp_path / "bob.pins.json").exists()  # pins beside the (missing) key file


async def test_key_change_announced_without_payload_is_noticed(
        env: Env, observer: PepKeyring, victim: tuple[GridClient, PepKeyring]) -> None:
    """XEP-0373 §4.5: notifications may carry only the item id; the keyring reads the node then."""
    client, _ring = victim
    jid = env.fleet.jid(VICTIM)
    assert fingerprint(await observer.key_for(jid)) == _fpr(env, VICTIM)
    form = client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#node_config")
    form.add_field(var="pubsub#deliver_payloads", value="0")
    await client.plugin["xep_0060"].set_node_config(client.boundjid.bare, PUBLIC_KEYS_NODE, form)
    seen: list[bool] = []
    observer.client.add_event_handler(
        "ox_public_keys_publish",
        lambda msg: seen.append(len(msg["pubsub_event"]["items"].xml.find("{*}item") or []) == 0))
    attacker_client, attacker = await _login(env, VICTIM, "attacker3")
    forged = generate(jid)
    try:
        await attacker.publish(forged)
        await _eventually(lambda: any(w.offered == fingerprint(forged) for w in observer.warnings))
    finally:
        await close_session(attacker_client)
    assert seen and all(seen)  # the notifications really came without the list


# -- keys handed over at provisioning ------------------------------------------------------


def _pubsub_requests(sent: list[str]) -> list[str]:
    return [s for s in sent if "http://jabber.org/protocol/pubsub" in s and "<items" in s]


async def test_a_device_verifies_a_vouched_issuer_without_asking_its_pep_node(env: Env, tmp_path: Path) -> None:
    """`up` hands every device the issuers' public keys with their pins (pins/vouched/): a
    device commanded for the first time has the key at once, even from an operator who is not
    online to answer; no items request goes out (only the subscription that follows the
    issuer's announcements)."""
    alice = env.fleet.jid("alice")
    keys = PartyKeys.in_data_dir(env.data, "gen-1")
    assert keys.vouched_dir is not None and (keys.vouched_dir / f"{alice}.pub").is_file()
    # A device's pins (a copy) and the grid's vouched keys, on bob's account: the device's own
    # account would put a second resource beside the running bot.
    assert keys.pins_file is not None
    (tmp_path / "pins.json").write_bytes(keys.pins_file.read_bytes())
    client, ring = await _login(env, "bob", "vouched", PartyKeys(None, tmp_path / "pins.json", keys.vouched_dir))
    try:
        sent: list[str] = []
        client.add_filter("out", lambda stanza: sent.append(str(stanza)) or stanza)
        key = await ring.key_for(alice)
        assert fingerprint(key) == _fpr(env, "alice")
        assert ring.cached(alice) is key
        await asyncio.sleep(0.3)
        assert _pubsub_requests(sent) == [], sent
    finally:
        await close_session(client)


async def test_following_vouched_issuers_goes_at_a_pace_and_verifying_does_not_wait_for_it(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first shed to thousands of hosted devices made each follow the issuer's announcements
    at once (10,000 subscriptions in front of the commands at the server): they go at most
    WATCH_IN_FLIGHT at a time per process, in the background; every key verifies at once."""
    import weakref

    from gridpresence.security import pep_keyring
    from gridpresence.security.pep_keyring import vouch
    from gridpresence.security.pins import PinStore
    from timebase import key_for

    monkeypatch.setattr(pep_keyring, "WATCH_IN_FLIGHT", 2)
    monkeypatch.setattr(pep_keyring, "_WATCH_SLOTS", weakref.WeakKeyDictionary())
    issuers = [f"issuer-{i}@localhost" for i in range(8)]
    issuer_keys = {jid: key_for(jid) for jid in issuers}
    PinStore(tmp_path / "pins.json").provision({jid: fingerprint(k) for jid, k in issuer_keys.items()})
    for jid, key in issuer_keys.items():
        vouch(tmp_path / "vouched", jid, key)
    client, ring = await _login(env, "bob", "paced", PartyKeys(None, tmp_path / "pins.json", tmp_path / "vouched"))
    try:
        in_flight, most, asked = 0, 0, []
        subscribe = ring._pubsub.subscribe

        async def counted(jid: Any, node: str, **kwargs: Any) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            asked.append(str(jid))
            try:
                await asyncio.sleep(0.05)  # as a busy server's answer: the next ones queue
                return await subscribe(jid, node, **kwargs)
            finally:
                in_flight -= 1

        monkeypatch.setattr(ring._pubsub, "subscribe", counted)
        for jid in issuers:  # all verified at once, none waiting for its subscription
            key = await asyncio.wait_for(ring.key_for(jid), 0.5)
            assert fingerprint(key) == fingerprint(issuer_keys[jid])
        for _ in range(100):
            if len(asked) == len(issuers) and in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert sorted(asked) == sorted(issuers)  # each followed once (the server's answer is its own)
        assert most == 2
    finally:
        await close_session(client)


@pytest.mark.parametrize("vouched", ["another key", "garbage"])
async def test_a_vouched_key_that_is_not_the_pinned_one_is_not_used(env: Env, tmp_path: Path,
                                                                     vouched: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A vouched file that holds another key than the pin (or no key at all) is passed over:
    the key comes from the party's PEP node and is checked against the pin as always."""
    from gridpresence.security.pep_keyring import vouch
    from gridpresence.security.pins import PinStore
    from timebase import key_for

    issuer = env.fleet.jid("billing")  # online: its key is announced
    PinStore(tmp_path / "pins.json").provision({issuer: _fpr(env, "billing")})
    if vouched == "another key":
        vouch(tmp_path / "vouched", issuer, key_for(issuer))
    else:
        (tmp_path / "vouched").mkdir()
        (tmp_path / "vouched" / f"{issuer}.pub").write_bytes(b"\x99 not a key")
    client, ring = await _login(env, "bob", f"vouched-{vouched[0]}", PartyKeys(None, tmp_path / "pins.json",
                                                                               tmp_path / "vouched"))
    try:
        sent: list[str] = []
        client.add_filter("out", lambda stanza: sent.append(str(stanza)) or stanza)
        key = await ring.key_for(issuer)
        assert fingerprint(key) == _fpr(env, "billing")
        assert _pubsub_requests(sent), "fetched from the PEP node instead"
        if vouched == "garbage":
            assert any("unusable" in r.getMessage() and "vouched key" in r.getMessage() for r in caplog.records)
    finally:
        await close_session(client)
