"""gridpresence: a power grid's devices as an instant-messaging network on XMPP."""

__version__ = "0.1.0"
