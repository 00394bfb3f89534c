"""Firmware upgrade by instant message to a group of devices, on a real Prosody: available
devices apply and confirm, a restricted one refuses and gets it once its presence says it is
available, a device restricted past the time-out is reported failed, bad images are refused,
and no image is applied without the manufacturer's signed offer for that device."""

from __future__ import annotations

import asyncio
import base64
import os

from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from chatpeer import chat_peer
from conftest import Env
from gridpresence.operator.firmware import FirmwareCampaign, upgrade_firmware
from gridpresence.security.firmware import sign_offer
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState, RejectReason
from gridpresence.protocol.codec import q
from gridpresence.protocol.firmware import (
    MAX_IMAGE_BYTES,
    FirmwareImage,
    FirmwareReason,
    FirmwareStatus,
    firmware_to_xml,
    result_from_xml,
)


def offers(env: Env, alice: GridOperator, image: FirmwareImage, names: list[str], signer: str = "maker",
           ttl_s: float = 600.0) -> dict:  # type: ignore[type-arg]
    """The signed offer of `image` for each device (by the manufacturer, or `signer`'s key to test
    refusals), carried by the operator."""
    def serial(n: str) -> str:
        return alice.serial_of(alice.devices[n]) or ""

    if signer == "maker":
        maker = env.grid.bots.manufacturers["maker"]  # type: ignore[union-attr]
        return {n: maker.offer(image, alice.devices[n].jid, serial(n), ttl_s=ttl_s) for n in names}
    return {n: sign_offer(image, alice.devices[n].jid, serial(n), env.fleet.jid(signer), env.grid.keys.secret(signer),
                          ttl_s=ttl_s) for n in names}


async def test_group_upgrade_restricted_device_gets_it_once_available(env: Env, alice: GridOperator) -> None:
    refused = await alice.command("fw-crit", "shed")  # a critical load refuses and is restricted for 3 s
    assert refused.reason is RejectReason.CRITICAL and alice.devices["fw-crit"].state is DeviceState.RESTRICTED
    image = FirmwareImage.new(os.urandom(20_000), "2.0.0")
    names = ["fw-1", "fw-2", "fw-crit"]
    campaign = FirmwareCampaign(alice, names, image, offers(env, alice, image, names))
    results = await campaign.run(timeout_s=15)
    assert {n: r.status for n, r in results.items()} == {n: FirmwareStatus.APPLIED for n in ("fw-1", "fw-2", "fw-crit")}
    assert results["fw-1"].detail == "firmware 1.0.0 -> 2.0.0" and results["fw-1"].version == "2.0.0"
    first = [r for r in campaign.history if r.device == env.fleet.jid("fw-crit")]
    assert first[0].status is FirmwareStatus.REJECTED and first[0].reason is FirmwareReason.RESTRICTED
    assert "critical process running" in first[0].detail and first[-1].status is FirmwareStatus.APPLIED
    asker = await chat_peer(env, "bob", "fw-version")
    try:
        asker.client.register_plugin("xep_0092")
        version = await asker.client.plugin["xep_0092"].get_version(alice.devices["fw-2"].full_jid, timeout=5)
        assert version["software_version"]["version"] == "2.0.0"  # what any client's "version" shows
    finally:
        await asker.close()
    assert env.grid.bots.devices["fw-crit"].firmware.version == "2.0.0"  # type: ignore[union-attr]


async def test_timeout_reports_failure(env: Env, alice: GridOperator) -> None:
    await alice.command("fw-stuck", "shed")  # restricted for two minutes
    image = FirmwareImage.new(b"\x00firmware 3", "3.0.0")
    results = await upgrade_firmware(alice, ["fw-stuck", "fw-1"], image, offers(env, alice, image, ["fw-stuck", "fw-1"]),
                                     timeout_s=1.5)
    assert results["fw-1"].status is FirmwareStatus.APPLIED
    stuck = results["fw-stuck"]
    assert stuck.status is FirmwareStatus.FAILED and stuck.reason is FirmwareReason.TIMEOUT
    assert stuck.detail.startswith("not applied within 1.5 s: restricted (not now: critical process running")
    assert env.grid.bots.devices["fw-stuck"].firmware.version == "1.0.0"  # type: ignore[union-attr]


async def test_bad_images_and_strangers_are_refused(env: Env, alice: GridOperator) -> None:
    target = alice.devices["fw-2"].full_jid
    assert target is not None
    bob = await chat_peer(env, "bob", "fw")
    stranger = await chat_peer(env, "billing", "fw")
    answers: asyncio.Queue = asyncio.Queue()
    for peer in (bob, stranger):  # results carry no body: match the payload, not the "message" event
        peer.client.register_handler(Callback("fw result", StanzaPath("message/grid_firmware_result"),
                                              lambda m: answers.put_nowait(result_from_xml(m.xml.find(q("firmware-result"))))))

    good = FirmwareImage.new(b"firmware 4", "4.0.0")
    offer = offers(env, alice, good, ["fw-2"])["fw-2"]

    def send(peer, el, with_offer=offer) -> None:  # type: ignore[no-untyped-def]
        msg = peer.client.make_message(mto=target, mtype="normal")
        msg.append(el)
        if with_offer is not None:
            msg.append(with_offer)
        msg.send()

    try:
        tampered = firmware_to_xml(good)
        tampered.text = base64.b64encode(b"firmware 5").decode()
        send(bob, tampered)
        r = await asyncio.wait_for(answers.get(), 5)
        assert r.status is FirmwareStatus.FAILED and r.reason is FirmwareReason.BAD_IMAGE
        assert "sha256" in r.detail or "bytes" in r.detail
        garbage = firmware_to_xml(good)
        garbage.text = "not base64 at all!!"
        send(bob, garbage)
        r = await asyncio.wait_for(answers.get(), 5)
        assert r.reason is FirmwareReason.BAD_IMAGE and "base64" in r.detail
        big = firmware_to_xml(good)
        big.set("size", str(MAX_IMAGE_BYTES + 1))
        send(bob, big)
        r = await asyncio.wait_for(answers.get(), 5)
        assert r.reason is FirmwareReason.BAD_IMAGE and "size" in r.detail
        send(stranger, firmware_to_xml(good))
        r = await asyncio.wait_for(answers.get(), 5)
        assert r.status is FirmwareStatus.REJECTED and r.reason is FirmwareReason.NOT_AUTHORISED
        assert env.grid.bots.devices["fw-2"].firmware.version != "4.0.0"  # type: ignore[union-attr]
        assert (await bob.ask(env.fleet.jid("fw-2"), "status")).startswith("fw-2 (load) is on")  # still alive
    finally:
        await bob.close()
        await stranger.close()


async def test_no_image_without_the_manufacturers_offer(env: Env, alice: GridOperator) -> None:
    """An operator alone cannot upgrade: no offer, an offer signed by an operator (wrong role),
    by the manufacturer for another image or another device, or an offer used up — refused."""
    target = alice.devices["fw-1"].full_jid
    assert target is not None
    bob = await chat_peer(env, "bob", "fw-offer")
    answers: asyncio.Queue = asyncio.Queue()
    bob.client.register_handler(Callback("fw result", StanzaPath("message/grid_firmware_result"),
                                         lambda m: answers.put_nowait(result_from_xml(m.xml.find(q("firmware-result"))))))
    image = FirmwareImage.new(b"firmware 6", "6.0.0")
    other = FirmwareImage.new(b"firmware 7", "7.0.0")
    cases = [
        (None, "unsigned"),
        (offers(env, alice, image, ["fw-1"], signer="bob")["fw-1"], "may not firmware_upgrade"),
        (offers(env, alice, other, ["fw-1"])["fw-1"], "another image"),
        (offers(env, alice, image, ["fw-2"])["fw-2"], "wrong-recipient"),
    ]
    try:
        for offer, why in cases:
            msg = bob.client.make_message(mto=target, mtype="normal")
            msg.append(firmware_to_xml(image))
            if offer is not None:
                msg.append(offer)
            msg.send()
            r = await asyncio.wait_for(answers.get(), 5)
            assert r.status is FirmwareStatus.REJECTED and r.reason is FirmwareReason.NOT_AUTHORISED, (why, r)
            assert why in r.detail, (why, r.detail)
        device = env.grid.bots.devices["fw-1"]  # type: ignore[union-attr]
        assert device.firmware.version != "6.0.0"
        # The right offer works once; the same offer with the image again is not applied twice.
        good = offers(env, alice, image, ["fw-1"])["fw-1"]
        for _ in range(2):
            msg = bob.client.make_message(mto=target, mtype="normal")
            msg.append(firmware_to_xml(image))
            msg.append(good)
            msg.send()
        first, second = await asyncio.wait_for(answers.get(), 5), await asyncio.wait_for(answers.get(), 5)
        assert first.status is FirmwareStatus.APPLIED and first.detail.endswith("-> 6.0.0")
        assert second.status is FirmwareStatus.APPLIED and "already applied" in second.detail
        assert device.firmware.version == "6.0.0"
    finally:
        await bob.close()
