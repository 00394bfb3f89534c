"""Which desks each kind of device has: the one table the device builds its features from.

Order matters: a desk may look up, when it is built, the desks listed before it (the alarm desk
reads the branch fold and the price feed; the verdict desk joins the chat and alarm desks).
"""

from __future__ import annotations

from collections.abc import Mapping

from gridpresence.device.adhoc import AdhocDesk
from gridpresence.device.alarms import AlarmDesk
from gridpresence.device.branch import BranchAdvisor
from gridpresence.device.chat import ChatDesk
from gridpresence.device.firmware import FirmwareDesk
from gridpresence.device.folding import BranchFold
from gridpresence.device.host import Desk
from gridpresence.device.ox_chat import OxDesk
from gridpresence.device.price_feed import PriceFeed
from gridpresence.device.reports import BillingReporter
from gridpresence.device.verdicts import VerdictDesk
from gridpresence.protocol.models import DeviceKind

# Every device: folding under a branch in fault, the billing party's price, alarms and their
# rules, chat (plain and OX), ad-hoc commands, verdicts on alarms, firmware upgrades.
COMMON: tuple[type[Desk], ...] = (BranchFold, PriceFeed, AlarmDesk, ChatDesk, OxDesk, AdhocDesk, VerdictDesk,
                                  FirmwareDesk)

DESKS: Mapping[DeviceKind, tuple[type[Desk], ...]] = {
    DeviceKind.LOAD: COMMON,
    DeviceKind.GENERATOR: COMMON,
    DeviceKind.BREAKER: COMMON,
    DeviceKind.METER: (*COMMON, BillingReporter),  # energy registers: billing reports ([0085])
    DeviceKind.MASTER: (*COMMON, BillingReporter, BranchAdvisor),  # and the branch watch ([00146])
}
