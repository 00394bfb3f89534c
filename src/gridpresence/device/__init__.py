"""The device bot: one simulated IED as an XMPP client, and the desks inside it.

``agent.DeviceAgent`` is the device; every feature it has (chat, ad-hoc commands, alarms,
verdicts, firmware, OX chat, folding under a branch in fault, the price feed, billing reports,
the master IED's branch watch) is a desk: built by the device from one table keyed by device
kind (``desks.DESKS``), given the device only through the ``desks.DeviceHost`` protocol, and
registering its own stanza handlers when built. May import: protocol, words, security, rules,
config, physics, transport, xmpp, server (never the operator library).
"""
