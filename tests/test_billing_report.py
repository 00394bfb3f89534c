"""Billing reports on the running grid ([0085]): a meter sends one report with two encrypted
parts; the billing party and the meter's customer read the billing part, operators the
power-quality part, and nobody reads the other's."""

from __future__ import annotations

import asyncio
import json
import os
from xml.etree import ElementTree as ET

import pytest
from conftest import Env, run_cli
from slixmpp import Message

from gridpresence.operator.library import GridOperator
from gridpresence.operator.reports import ReportInbox, request_report
from gridpresence.security.reports import ReportReader
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.protocol.billing_report import (
    BillingData,
    BillingReport,
    PartName,
    QualityData,
    billing_report_from_xml,
    billing_report_to_xml,
)
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.security.parts import NotForYou
from gridpresence.device.reports import BillingReporter
from timebase import NOW


async def test_billing_and_operator_each_read_their_part_only(env: Env, alice: GridOperator) -> None:
    bots = env.grid.bots
    assert bots is not None
    billing = bots.billing["billing"]
    assert billing.inbox is not None and alice.reports is not None
    # The customer, acme, logs in like an OX-capable chat client would: it announces its key over
    # PEP (XEP-0373), so the meter can encrypt to it, and finds the meter's key there.
    acme_jid = env.fleet.jid("acme")
    acme = make_client(f"{acme_jid}/t", env.grid.secrets.password("acme"), env.grid.endpoint, plugins=("xep_0060",))
    keyring = PepKeyring(acme, PartyKeys.in_data_dir(env.data, "acme"))
    acme_inbox = ReportInbox(acme, ReportReader(acme_jid, env.grid.keys.secret("acme"), keyring, PartName.BILLING))
    wire: list[BillingReport] = []
    acme.add_event_handler("message", lambda m: m.xml.find("{urn:gridpresence:0}billing-report") is not None
                           and wire.append(billing_report_from_xml(m["grid_billing_report"].xml)))
    await open_session(acme, env.grid.endpoint)
    assert await keyring.announced()
    acme.send_presence()
    try:
        meter = env.fleet.jid("meter-1")
        alice.request_report("meter-1")
        bill = await billing.inbox.wait(lambda d: d.device == meter, timeout=10)
        quality = await alice.reports.wait(lambda d: d.device == meter, timeout=10)
        mine = await acme_inbox.wait(lambda d: d.device == meter, timeout=10)
        assert isinstance(bill, BillingData) and isinstance(quality, QualityData)
        assert mine == bill and bill.customer == acme_jid
        assert bill.report == quality.report  # one report, two parts
        assert bill.register_kwh > 0 and bill.period_kwh >= 0 and 200 < quality.voltage_v < 240
        assert billing.reports[-1] == bill and alice.quality[-1] == quality
        # The same report, as it arrived, opened with the wrong party's key.
        report = wire[-1]
        assert report.id == bill.report and {p.name for p in report.parts} == set(PartName)
        with pytest.raises(NotForYou):
            await ReportReader(alice.jid, env.grid.keys.secret("alice"), keyring, PartName.BILLING).read(report)
        with pytest.raises(NotForYou):
            await ReportReader(billing.client.boundjid.bare, env.grid.keys.secret("billing"), keyring,
                               PartName.POWER_QUALITY).read(report)
        with pytest.raises(NotForYou):
            await ReportReader(acme_jid, env.grid.keys.secret("acme"), keyring, PartName.POWER_QUALITY).read(report)
        # A branch meter that has no customer: the billing part goes to the billing party only.
        branch = env.fleet.jid("branch-a")
        billing.request_report(branch)
        assert (await billing.inbox.wait(lambda d: d.device == branch, timeout=10)).customer is None
        # A master IED meters its whole tree the same way.
        alice.request_report("master")
        tree = await alice.reports.wait(lambda d: d.device == env.fleet.jid("master"), timeout=10)
        assert isinstance(tree, QualityData) and tree.load_pct >= 0
    finally:
        await close_session(acme)


async def test_forged_report_is_refused_with_a_reason(env: Env) -> None:
    """A party that sends a report in a meter's name (its own key signs it) is told why it is
    refused, and the billing party keeps nothing from it."""
    bots = env.grid.bots
    assert bots is not None
    billing = bots.billing["billing"]
    assert billing.inbox is not None
    before = len(billing.reports)
    # bob takes a genuine report of meter-1 and sends it as his own: the sender is not the meter.
    reporter = bots.devices["meter-1"].desk(BillingReporter)
    real = reporter.sent[-1] if reporter.sent else await reporter.send_report()
    bob = GridOperator.from_connection(env.grid.connection, operator="bob", resource=f"f-{os.urandom(3).hex()}")
    await bob.connect()
    errors: asyncio.Queue[Message] = asyncio.Queue()
    bob.client.add_event_handler("message_error", errors.put_nowait)
    try:
        msg = bob.client.make_message(mto=billing.client.boundjid.bare, mtype="normal")
        msg.append(billing_report_to_xml(real))
        msg.send()
        err = await asyncio.wait_for(errors.get(), 10)
        assert err["error"]["condition"] == "not-acceptable"
        assert "report of meter-1@localhost sent by bob@localhost" in err["error"]["text"]
        # Garbage in the envelope: refused with a reason too, and the agent keeps running.
        bad = bob.client.make_message(mto=billing.client.boundjid.bare, mtype="normal")
        bad.append(ET.fromstring("<billing-report xmlns='urn:gridpresence:0' id='x' device='bob@localhost' "
                                 f"issued='{NOW.isoformat()}'><part name='billing'>"
                                 "<openpgp xmlns='urn:xmpp:openpgp:0'>!!</openpgp></part></billing-report>"))
        bad.send()
        err = await asyncio.wait_for(errors.get(), 10)
        assert "base64" in err["error"]["text"]
        assert len(billing.reports) == before
        # Someone outside the audience may not ask a meter for its report.
        outsider = bots.devices["hot-load"].client
        refused: asyncio.Queue[Message] = asyncio.Queue()
        outsider.add_event_handler("message_error", refused.put_nowait)
        try:
            request_report(outsider, env.fleet.jid("meter-1"))
            err = await asyncio.wait_for(refused.get(), 10)
            assert err["error"]["condition"] == "forbidden" and "operators may ask" in err["error"]["text"]
        finally:
            outsider.del_event_handler("message_error", refused.put_nowait)
    finally:
        await bob.close()


async def test_quality_cli_shows_the_operators_part(env: Env) -> None:
    conn = ["--connection", str(env.grid.connection_file)]
    code, out, err = await run_cli("quality", "meter-1", "branch-b", "--json", *conn)
    assert code == 0, err
    parts = [json.loads(line) for line in out.splitlines()]
    assert [p["device"] for p in parts] == ["meter-1@localhost", "branch-b@localhost"]
    assert all(45 < p["frequency_hz"] < 55 and "register_kwh" not in p for p in parts)
    code, out, err = await run_cli("quality", "meter-1", *conn)
    assert code == 0 and out.startswith("meter-1: ") and " Hz, PF " in out, err
    code, _, err = await run_cli("quality", "hot-load", *conn)
    assert code == 2 and "only meters and master IEDs send billing reports" in err
