"""Faults under a branch in fault are folded into the branch's alarm (second document, hierarchy
suppression), live on the network.

Why on the devices, through presence: every device already sees its parent's and its children's
presence (their rosters), and an alarm leaves a device as a chat message that any client shows.
So each device carries its active faults in its presence. A child whose parent is in fault (or
is itself under a branch in fault: ``under-fault``) holds its own alarms back (they are folded);
the parent, seeing its children's faults in their presence, names them in its alarm and in its
own presence, so the highest branch in fault names them all, as central folding does. When that
fault clears, the child sends what still holds on its own. No central party has to be
up for it, nothing extra is sent, and third-party chat clients see the folded view too. (Operator
side folding could not stop the child's message reaching a plain chat client.)
"""

from __future__ import annotations

from collections.abc import Callable
import logging

from slixmpp import JID, Presence

from gridpresence.protocol.codec import PayloadError, q, report_from_xml
from gridpresence.xmpp.dispatch import declare_presence
from gridpresence.protocol.models import MAX_FAULTS, FaultRef, PresenceReport
from gridpresence.device.host import DeviceHost


log = logging.getLogger(__name__)


class BranchFold:
    """One device's place in the folding: is its parent in fault, and what faults are below it."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        parent = agent.setup.parent
        self.parent = JID(parent).bare if parent else None
        self.parent_in_fault = False  # the parent, or a branch above it, is in fault: fold
        self._below: dict[str, tuple[FaultRef, ...]] = {}  # child bare JID -> the faults its presence names
        # Called when the parent's fault clears (the alarm desk sends what it held back).
        self.on_release: list[Callable[[], None]] = []
        if self.parent is not None:
            agent.client.add_event_handler("presence", self._on_parent_presence)
            declare_presence(agent.client, self._on_parent_presence)  # the parent's only: never taken

    # -- the parent above ----------------------------------------------------------------

    def _on_parent_presence(self, pres: Presence) -> None:
        if pres["from"].bare != self.parent:
            return
        in_fault = False
        if pres["type"] != "unavailable" and pres.xml.find(q("device")) is not None:
            try:
                in_fault = report_from_xml(pres.xml.find(q("device"))).folds_below
            except PayloadError as exc:
                log.warning("%s: ignored invalid presence from %s: %s", self.agent.spec.name, self.parent, exc)
                return
        if in_fault == self.parent_in_fault:
            return
        self.parent_in_fault = in_fault
        log.info("%s: parent %s %s", self.agent.spec.name, self.parent, "in fault: folding my alarms into its"
                 if in_fault else "out of fault: my alarms go out on their own again")
        try:
            if not in_fault:
                for release in self.on_release:
                    release()
            self.agent.publish(force=False)  # the devices below learn whether they fold
        except Exception:  # folding is a help; a failure must not end the device
            log.exception("%s: folding change failed", self.agent.spec.name)

    # -- the children below --------------------------------------------------------------

    def child(self, jid: str, report: PresenceReport | None) -> bool:
        """A child's latest presence (None: gone); True if the faults below changed."""
        faults = report.faults if report is not None else ()
        if self._below.get(jid, ()) == faults:
            return False
        if faults:
            self._below[jid] = faults
        else:
            self._below.pop(jid, None)
        return True

    def below(self) -> tuple[FaultRef, ...]:
        """Every fault below this device, each with the device it is on."""
        out = [FaultRef(kind=f.kind, device=f.device or child) for child, faults in sorted(self._below.items())
               for f in faults]
        return tuple(out)

    def presence_faults(self, own_kinds: list[str]) -> tuple[FaultRef, ...]:
        """What this device's presence says: its own faults and, only while it or a branch above is
        in fault, those folded into them (else they are not folded: each device below tells its own)."""
        if not own_kinds and not self.parent_in_fault:
            return ()  # (every device, every tick: the healthy case builds nothing)
        own = [FaultRef(kind=k) for k in own_kinds]
        return tuple([*own, *self.below()] if own or self.parent_in_fault else own)[:MAX_FAULTS]

    def close(self) -> None:
        pass
