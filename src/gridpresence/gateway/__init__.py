"""The field gateway: real IEDs (Modbus, DNP3) read on the secure side and turned into grid presence.

``driver`` is the one interface every protocol implements; ``modbus`` and ``dnp3`` are the two
protocols; ``points`` and ``site`` are the point maps and the site file; ``report`` turns one
poll's readings into a validated :class:`~gridpresence.protocol.PresenceReport`;
``field_device`` polls an IED and stands for it where a device bot has its simulated physics;
``fleet`` makes a site's IEDs devices of the fleet (their accounts). The process hosting them
is ``host/gateway.py``. It runs on the gateway computer next to the IEDs. May import: every
layer below it.
"""
