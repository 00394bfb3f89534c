"""Per-party encryption without a server: a report's parts open only for their own audience,
and every way a part can be wrong is refused with its reason."""

from __future__ import annotations

import datetime as dt
from xml.etree import ElementTree as ET

import pytest

from gridpresence.security.reports import ReportAudience, ReportReader, reader_keys, seal_report
from gridpresence.config import FleetError, parse_fleet
from gridpresence.physics.metering import MeterRegisters, PeakHours
from gridpresence.protocol.billing_report import (
    BillingData,
    BillingReport,
    PartName,
    QualityData,
    SealedPart,
    billing_report_from_xml,
    billing_report_to_xml,
    part_data_to_xml,
)
from gridpresence.protocol.codec import PayloadError
from gridpresence.protocol.models import utcnow
from gridpresence.protocol.openpgp import openpgp_from_xml
from gridpresence.security.keyring import KeyUnavailable, StaticKeys
from gridpresence.security.parts import BadPart, NotForYou, PartProblem, seal, unseal
from gridpresence.security.pgp import pgpy
from timebase import NOW, key_for

METER, BILLING, CUSTOMER, ALICE, BOB, RELAY = (f"{n}@localhost" for n in
                                               ("meter-1", "billing", "acme", "alice", "bob", "relay"))
KEYS = {jid: key_for(jid) for jid in (METER, BILLING, CUSTOMER, ALICE, BOB, RELAY)}
KEYRING = StaticKeys(KEYS)  # pure crypto: no server to fetch keys from
AUDIENCE = ReportAudience(billing_parties=(BILLING,), quality=(ALICE, BOB), customer=CUSTOMER)
T0 = (NOW - dt.timedelta(days=1)).replace(hour=5, minute=0, second=0)  # two hours across the 06:00 start of the peak window


def reader(jid: str, part: PartName) -> ReportReader:
    return ReportReader(jid, KEYS[jid], KEYRING, part)


def one_period() -> tuple[BillingData, QualityData]:
    """Two hours at 40 kW across the 06:00 start of the peak window."""
    import random

    regs = MeterRegisters(T0, random.Random(1), PeakHours(6, 18))
    for minute in range(1, 121):
        regs.sample(40.0, 50.0, 60.0, T0 + dt.timedelta(minutes=minute))
    return regs.close("r1", METER, CUSTOMER, T0 + dt.timedelta(hours=2), 50.0)


def test_registers_split_energy_at_the_tariff_hours() -> None:
    billing, quality = one_period()
    assert billing.period_kwh == pytest.approx(80.0)
    assert billing.off_peak_kwh == pytest.approx(40.0, abs=0.7) and billing.peak_kwh == pytest.approx(40.0, abs=0.7)
    assert billing.max_demand_kw == 40.0 and billing.customer == CUSTOMER
    assert 215 < quality.voltage_v < 230 and 49.8 <= quality.frequency_hz <= 50.2 and quality.load_pct == 50.0


async def test_each_party_reads_its_own_part_and_nothing_else() -> None:
    billing, quality = one_period()
    report = seal_report(billing, quality, KEYS[METER], await reader_keys(AUDIENCE, KEYRING))
    wire = billing_report_from_xml(ET.fromstring(ET.tostring(billing_report_to_xml(report))))
    assert wire == report
    assert await reader(BILLING, PartName.BILLING).read(wire) == billing
    assert await reader(CUSTOMER, PartName.BILLING).read(wire) == billing
    assert await reader(ALICE, PartName.POWER_QUALITY).read(wire) == quality
    assert await reader(BOB, PartName.POWER_QUALITY).read(wire) == quality
    # The wrong party: the operator cannot read billing, billing and customer cannot read quality,
    # and the relay that carries the report reads neither.
    for jid, part in ((ALICE, PartName.BILLING), (BILLING, PartName.POWER_QUALITY),
                      (CUSTOMER, PartName.POWER_QUALITY), (RELAY, PartName.BILLING), (RELAY, PartName.POWER_QUALITY)):
        with pytest.raises(NotForYou, match="cannot decrypt"):
            await reader(jid, part).read(wire)
    # Nothing of the cleartext is visible in the envelope.
    text = ET.tostring(billing_report_to_xml(report), encoding="unicode")
    for value in (billing.register_kwh, billing.peak_kwh, quality.voltage_v, quality.thd_pct):
        assert repr(value) not in text


def test_unseal_refuses_forged_unsigned_tampered_and_stale_parts() -> None:
    payload = part_data_to_xml(one_period()[0])
    meter, billing = KEYS[METER], KEYS[BILLING]
    good = seal(payload, meter, {BILLING: billing.pubkey})
    assert unseal(good, BILLING, billing, METER, meter.pubkey).payload.get("period-kwh")
    # Signed by another party's key while claiming to be the meter.
    forged = seal(payload, KEYS[BOB], {BILLING: billing.pubkey})
    with pytest.raises(BadPart) as err:
        unseal(forged, BILLING, billing, METER, meter.pubkey)
    assert err.value.problem is PartProblem.WRONG_SIGNER
    # Encrypted but not signed.
    unsigned = bytes(billing.pubkey.encrypt(pgpy.PGPMessage.new(b"<x/>")))
    with pytest.raises(BadPart) as err:
        unseal(unsigned, BILLING, billing, METER, meter.pubkey)
    assert err.value.problem is PartProblem.UNSIGNED
    # Signed cleartext, not encrypted.
    clear = pgpy.PGPMessage.new(b"<x/>")
    clear |= meter.sign(clear)
    with pytest.raises(BadPart) as err:
        unseal(bytes(clear), BILLING, billing, METER, meter.pubkey)
    assert err.value.problem is PartProblem.NOT_ENCRYPTED
    # Bytes changed on the way.
    flipped = bytearray(good)
    flipped[-20] ^= 0xFF
    with pytest.raises(BadPart) as err:
        unseal(bytes(flipped), BILLING, billing, METER, meter.pubkey)
    assert err.value.problem is PartProblem.CORRUPT
    with pytest.raises(BadPart) as err:
        unseal(b"garbage", BILLING, billing, METER, meter.pubkey)
    assert err.value.problem is PartProblem.NOT_OPENPGP
    # An old part replayed.
    old = seal(payload, meter, {BILLING: billing.pubkey}, now=utcnow() - dt.timedelta(days=3))
    with pytest.raises(BadPart) as err:
        unseal(old, BILLING, billing, METER, meter.pubkey)
    assert err.value.problem is PartProblem.STALE
    # Encrypted to our key but signed for someone else: passed on, not meant for us.
    to_bob = seal(payload, meter, {BOB: KEYS[BOB].pubkey, BILLING: billing.pubkey})
    assert unseal(to_bob, BILLING, billing, METER, meter.pubkey)  # both named: fine
    only_bob = seal(payload, meter, {BOB: KEYS[BOB].pubkey})
    with pytest.raises(NotForYou):
        unseal(only_bob, BILLING, billing, METER, meter.pubkey)


async def test_a_part_moved_into_another_report_is_refused() -> None:
    billing, quality = one_period()
    first = seal_report(billing, quality, KEYS[METER], await reader_keys(AUDIENCE, KEYRING))
    other = BillingReport(id="r2", device=METER, issued=first.issued, parts=first.parts)
    with pytest.raises(BadPart, match="belongs to report r1"):
        await reader(BILLING, PartName.BILLING).read(other)
    # The billing part put where the power-quality part belongs is not quality data.
    swapped = BillingReport(id="r1", device=METER, issued=first.issued,
                            parts=(SealedPart(name=PartName.POWER_QUALITY, data=first.parts[0].data),))
    with pytest.raises(NotForYou):
        await reader(ALICE, PartName.POWER_QUALITY).read(swapped)


def test_envelope_errors_are_payload_errors() -> None:
    bad = ET.fromstring("<billing-report xmlns='urn:gridpresence:0' id='r1' device='meter-1@localhost' "
                        f"issued='{NOW.isoformat()}'><part name='billing'>"
                        "<openpgp xmlns='urn:xmpp:openpgp:0'>not base64!</openpgp></part></billing-report>")
    with pytest.raises(PayloadError, match="base64"):
        billing_report_from_xml(bad)
    with pytest.raises(PayloadError, match="openpgp"):
        openpgp_from_xml(ET.fromstring("<openpgp/>"))
    empty = ET.fromstring("<billing-report xmlns='urn:gridpresence:0' id='r1' device='meter-1@localhost' "
                          f"issued='{NOW.isoformat()}'/>")
    with pytest.raises(PayloadError, match="parts"):
        billing_report_from_xml(empty)


def test_fleet_names_customers_of_metering_devices_only() -> None:
    base = {"operators": [{"name": "alice"}], "customers": [{"name": "acme"}]}
    fleet = parse_fleet({**base, "devices": [{"name": "m", "kind": "meter", "rated_kw": 5, "customer": "acme"}]})
    assert fleet.report_audience(fleet.device("m")).billing == ("acme@localhost",)
    with pytest.raises(FleetError, match=r"devices\[0\] \(m\)\.customer: no customer named 'acme2'"):
        parse_fleet({**base, "devices": [{"name": "m", "kind": "meter", "rated_kw": 5, "customer": "acme2"}]})
    with pytest.raises(FleetError, match="only a meter or a master IED has a customer"):
        parse_fleet({**base, "devices": [{"name": "l", "kind": "load", "rated_kw": 5, "customer": "acme"}]})



async def test_a_reader_without_a_published_key_is_left_out_not_the_report() -> None:
    billing, quality = one_period()
    unknown = "carol@localhost"  # an operator who never announced a key
    audience = ReportAudience(billing_parties=(BILLING,), quality=(ALICE, unknown))
    report = seal_report(billing, quality, KEYS[METER], await reader_keys(audience, KEYRING))
    assert await reader(ALICE, PartName.POWER_QUALITY).read(report) == quality
    nobody = ReportAudience(billing_parties=(BILLING,), quality=(unknown,))
    with pytest.raises(KeyUnavailable, match="carol@localhost"):
        await reader_keys(nobody, KEYRING)
