"""Standard XMPP for device bots: XEP-0050 ad-hoc commands with XEP-0004 forms (the menus of
Gajim, Conversations and Dino), found through XEP-0030, plus XEP-0115 caps and XEP-0092 version.

The forms offer what chat offers — status, an action, acknowledging an alarm — and run it
through :meth:`DeviceAgent.accept`, the one command path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from xml.etree import ElementTree as ET

from slixmpp import JID, Iq, Presence
from slixmpp.exceptions import XMPPError
from slixmpp.plugins.xep_0030.stanza import DiscoInfo, DiscoItems
from slixmpp.xmlstream import StanzaBase

from gridpresence.device.alarms import AlarmDesk
from gridpresence.words import TITLES
from gridpresence.device.chat import ACTION_WORDS, unsigned_refusal
from gridpresence.words import REASONS, describe_outcome, describe_report
from gridpresence.protocol.models import Action, Command, PresenceReport, utcnow
from gridpresence.device.host import DeviceHost
from gridpresence.xmpp.outgoing import presence_stamp
from gridpresence.xmpp.slixfix.escape import escape as xml_escape


log = logging.getLogger(__name__)

ADHOC_TTL_S = 30.0
ALL_ALARMS = "all"
STATUS, RUN, ACK = "status", "run", "ack-alarm"
CAPS_NS = "http://jabber.org/protocol/caps"
CAPS_NODE = "urn:gridpresence:caps"
COMMANDS_NS = "http://jabber.org/protocol/commands"
# (node, name) -> the disco data of that command's node, one per process (AdhocCommands.add_command).
_COMMAND_NODES: dict[tuple[str, str], dict[str, Any]] = {}
_AVAILABLE = ("available", "chat", "away", "dnd", "xa")


@functools.cache
def _software_version() -> str:
    """Read once per process: the package metadata costs 3 ms a read, once per device bot."""
    try:
        return version("gridpresence")
    except PackageNotFoundError:
        return "0+unknown"


def enable_standard_features(agent: DeviceHost) -> None:
    """Register the standard plugins and the device's commands on its client."""
    client = agent.client
    client.register_plugin("xep_0004")
    client.register_plugin("xep_0050")
    client.register_plugin("xep_0092", {"software_name": "gridpresence device", "version": _software_version()})
    client.register_plugin("xep_0115", {"caps_node": CAPS_NODE})
    caps = client.plugin["xep_0115"]
    if caps.xmpp is not client:  # a hosted identity's, shared: its link sets it so (xmpp/component.py)
        return
    # Advertise our own caps, but do not query everyone else's: a thousand devices asking each
    # new operator's client for its features would be a storm, and devices have no use for them.
    client.remove_handler("Entity Capabilities")
    # The plugin stamps presence from an async filter, which slixmpp runs as a task with a
    # timeout for every outgoing stanza (a third more time per command); a sync filter does it.
    client.del_filter("out", caps._filter_add_caps)  # type: ignore[arg-type]


class AdhocCommands:
    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.forms = agent.client.plugin["xep_0004"]
        self.adhoc = agent.client.plugin["xep_0050"]
        # Commands are keyed by the full JID, which a new session may change: add them each time.
        agent.client.add_event_handler("session_start", self._add_commands)

    def _add_commands(self, _event: object) -> None:
        self.add_command(STATUS, "Status", self._status)
        if self.actions():
            self.add_command(RUN, "Run a command", self._run_form)
        self.add_command(ACK, "Acknowledge an alarm", self._ack_form)

    def add_command(self, node: str, name: str, handler: Any) -> None:
        """What xep_0050's add_command writes (the command, the commands node's identity and
        item, the feature), written straight into the plugins' tables: a host of thousands of
        identities saves a future and a task per call. The command node's own disco#info is
        the same at every device, so it is kept once per process (nothing changes it later)."""
        client = self.agent.client
        owner = client.boundjid.full
        static = client.plugin["xep_0030"].static
        listing = static.add_node(owner, COMMANDS_NS)
        listing["info"].add_identity("automation", "command-list", "Ad-Hoc commands")
        listing["items"].add_item(owner, node=node, name=name)
        shared = _COMMAND_NODES.get((node, name))
        if shared is None:
            shared = _COMMAND_NODES[(node, name)] = {"info": DiscoInfo(), "items": DiscoItems()}
            shared["info"]["node"] = shared["items"]["node"] = node
            shared["info"].add_identity("automation", "command-node", name)
        static.nodes[(owner, node, "")] = shared
        static.add_node(owner)["info"].add_feature(COMMANDS_NS)
        self.adhoc.commands[(owner, node)] = (name, handler, None, 0)  # no session time-out, as add_command's default

    def actions(self) -> list[Action]:
        return sorted(a for a in self.agent.sim.actions if a.value in ACTION_WORDS)


    def close(self) -> None:
        pass

    # -- helpers ------------------------------------------------------------------------

    def _authorise(self, sender: JID) -> str:
        who = JID(sender).bare
        if who not in self.agent.operators:
            log.warning("%s: ad-hoc command from %s refused: not authorised", self.agent.spec.name, who)
            raise XMPPError("forbidden", text=f"not authorised: only the utility's operators may use {self.agent.spec.name}")
        # Finished sessions are never removed by the plugin when no "complete" step follows.
        for sid in [s for s, sess in self.adhoc.sessions.items() if sess.get("next") is None]:
            del self.adhoc.sessions[sid]
        return who

    def _report_form(self, report: PresenceReport | None, title: str) -> Any:
        form = self.forms.make_form(ftype="result", title=title)
        if report is None:
            return form
        form.add_field(var="state", ftype="text-single", label="State", value=report.state.value)
        if report.restriction is not None:
            form.add_field(var="restriction", ftype="text-single", label="Restriction", value=report.status_text())
        for name, value in report.telemetry.model_dump(exclude_none=True, mode="json").items():
            form.add_field(var=name.replace("_", "-"), ftype="text-single", label=name.replace("_", " "),
                           value=str(value))
        return form

    @staticmethod
    def _finish(session: dict[str, Any], payload: Any, note: str, kind: str = "info") -> dict[str, Any]:
        session["payload"] = payload
        session["notes"] = [(kind, note)]
        session["next"] = None
        session["has_next"] = False
        return session

    @staticmethod
    def _submitted(payload: Any) -> dict[str, Any]:
        forms = payload if isinstance(payload, list) else [payload]
        for form in forms:
            if getattr(form, "plugin_attrib", "") == "form":
                return dict(form.get_values())
        return {}

    # -- status -------------------------------------------------------------------------

    def _status(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        self._authorise(iq["from"])
        report = self.agent.current_report()
        return self._finish(session, self._report_form(report, f"{self.agent.spec.label}"),
                            describe_report(self.agent.spec.name, report))

    # -- run an action ------------------------------------------------------------------

    def _run_form(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        self._authorise(iq["from"])
        form = self.forms.make_form(ftype="form", title=f"Command {self.agent.spec.label}")
        field = form.add_field(var="action", ftype="list-single", label="Action", required=True)
        for action in self.actions():
            field.add_option(label=action.value, value=action.value)
        session.update(payload=form, next=self._run_submit, has_next=False, allow_complete=True)
        return session

    async def _run_submit(self, payload: Any, session: dict[str, Any]) -> dict[str, Any]:
        who = self._authorise(session["from"])
        wanted = str(self._submitted(payload).get("action") or "")
        if wanted not in {a.value for a in self.actions()}:
            choices = ", ".join(a.value for a in self.actions())
            return self._finish(session, None, f"unknown action {wanted[:40]!r}; choose one of: {choices}", "error")
        if not self.agent.security.may_act(Action(wanted), signed=False):  # a form is never signed
            return self._finish(session, None, unsigned_refusal(wanted, form=True), "error")
        sid = "".join(c for c in session["id"] if c.isalnum())[-40:]
        cmd = Command.new(wanted, who, ttl_s=ADHOC_TTL_S).model_copy(update={"id": f"adhoc-{sid}"})
        outcome = await self.agent.accept(cmd, utcnow())  # slixmpp awaits a coroutine handler
        form = self._report_form(outcome.report, f"{self.agent.spec.label}: {wanted}")
        form.add_field(var="outcome", ftype="text-single", label="Outcome", value=outcome.status.value)
        if outcome.reason is not None:
            form.add_field(var="reason", ftype="text-single", label="Reason", value=REASONS[outcome.reason])
        text = describe_outcome(self.agent.spec.name, wanted, outcome)
        return self._finish(session, form, text, "info" if outcome.ok else "warn")

    # -- acknowledge an alarm -----------------------------------------------------------

    def _ack_form(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        self._authorise(iq["from"])
        open_alarms = [e.alarm for e in self.agent.desk(AlarmDesk).open.values()]
        if not open_alarms:
            return self._finish(session, None, f"{self.agent.spec.name} has no open alarms.")
        form = self.forms.make_form(ftype="form", title=f"Acknowledge an alarm of {self.agent.spec.label}")
        field = form.add_field(var="alarm", ftype="list-single", label="Alarm", required=True)
        for alarm in open_alarms:
            field.add_option(label=f"{alarm.id}: {TITLES[alarm.kind]} ({alarm.level.value})", value=alarm.id)
        field.add_option(label="all open alarms", value=ALL_ALARMS)
        session.update(payload=form, next=self._ack_submit, has_next=False, allow_complete=True)
        return session

    def _ack_submit(self, payload: Any, session: dict[str, Any]) -> dict[str, Any]:
        who = self._authorise(session["from"])
        wanted = str(self._submitted(payload).get("alarm") or "")
        if wanted != ALL_ALARMS and wanted not in self.agent.desk(AlarmDesk).open:
            return self._finish(session, None, f"no open alarm {wanted[:20]!r}", "error")
        done = self.agent.desk(AlarmDesk).acknowledge(None if wanted == ALL_ALARMS else wanted, who)
        text = "Acknowledged: " + "; ".join(f"alarm {a.id} ({TITLES[a.kind]})" for a in done) + "."
        return self._finish(session, None, text)


class AdhocDesk(AdhocCommands):
    """The device's standard features (forms, ad-hoc commands, version, caps) and its status,
    run and acknowledge commands."""

    def __init__(self, agent: DeviceHost) -> None:
        enable_standard_features(agent)
        super().__init__(agent)
        self._caps: ET.Element | None = None
        self._caps_jid: str | None = None  # the session (full JID) self._caps was computed for
        self._caps_of: tuple[object, tuple[ET.Element, ...]] | None = None  # the info hashed, and its children
        self._caps_text_of: tuple[ET.Element, str] | None = None  # self._caps, and its text
        agent.client.add_filter("out", self._stamp_caps)

    def _add_commands(self, event: object) -> None:
        super()._add_commands(event)
        jid = self.agent.client.boundjid.full
        told = self._caps.get("ver") if self._caps is not None and self._caps_jid == jid else None
        if self._update_caps() != told and told is not None:
            self.agent.publish(force=True)  # this session's presence went out with other caps: tell again

    def _update_caps(self) -> str | None:
        """Hash the session's features into the caps version (XEP-0115 §5) and keep the info
        where a disco#info of the caps node finds it: done here, at once, so the session's
        first presence carries the caps (no second broadcast just to add them). The same
        steps as the plugin's update_caps, without its round of futures. Asked again in the same
        session for the same info (the session's first presence, then its commands added, which
        leave the JID's own info as it was), the answer is the one already written: disco info
        is changed by adding and removing its elements, never in place, so the same elements
        are the same info."""
        try:
            client, jid = self.agent.client, self.agent.client.boundjid.full
            disco, caps = client.plugin["xep_0030"], client.plugin["xep_0115"]
            info = disco._fix_default_info(disco.static.get_info(jid, None, None, None))  # as disco#info answers
            hashed = (info, tuple(info.xml))
            if self._caps is not None and self._caps_jid == jid and self._caps_of is not None \
                    and self._caps_of[0] is info and self._caps_of[1] == hashed[1]:
                return self._caps.get("ver")
            ver: str = caps.generate_verstring(info, caps.hash)
            disco.static.set_info(jid, f"{caps.caps_node}#{ver}", None, info)
            caps.static.cache_caps(None, None, None, {"verstring": ver, "info": info})
            caps.static.assign_verstring(jid, None, None, {"verstring": ver})
            if self._caps is None or self._caps.get("ver") != ver:
                self._caps = ET.Element(f"{{{CAPS_NS}}}c", {"hash": "sha-1", "node": CAPS_NODE, "ver": ver})
            self._caps_jid, self._caps_of = jid, hashed
            return ver
        except Exception:  # caps are a courtesy to clients: never worth the device
            log.exception("%s: could not compute entity caps", self.agent.spec.name)
            return None

    def _session_caps(self) -> ET.Element | None:
        if self._caps_jid != self.agent.client.boundjid.full:  # a session's first presence
            self._update_caps()
        return self._caps

    @presence_stamp("_caps_text")
    def _stamp_caps(self, stanza: StanzaBase) -> StanzaBase:
        if not isinstance(stanza, Presence) or stanza["type"] not in _AVAILABLE:  # caps go on available presence only
            return stanza
        caps = self._session_caps()
        if caps is not None:
            stanza.xml.append(caps)  # one shared element: it is only ever serialised
        return stanza

    def _caps_text(self, ptype: str | None, _payload: str | None) -> str:
        """_stamp_caps's element as text, for a presence written without a stanza object (no
        type attribute: available; a show value is a child, not the type)."""
        caps = self._session_caps() if ptype is None else None
        if caps is None:
            return ""
        if self._caps_text_of is None or self._caps_text_of[0] is not caps:
            attrs = "".join(f' {k}="{xml_escape(v)}"' for k, v in caps.attrib.items())
            self._caps_text_of = (caps, f'<c xmlns="{CAPS_NS}"{attrs} />')
        return self._caps_text_of[1]
