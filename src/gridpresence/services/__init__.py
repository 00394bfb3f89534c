"""The service bots other than devices: billing, watchdog, manufacturer, the fleet console and
the e-mail store-and-forward relay (``relay``). Each is a party with its own account and key.
May import: every layer below, the device and operator packages included.
"""
