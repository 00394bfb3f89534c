"""What every party's XMPP session needs, whatever side of the wire it is on.

``session``: connection details (``ConnectionInfo``, ``Endpoint``) and one way to log in and
out; ``party``: log in, announce the OpenPGP key, leave; ``slixfix``: every patch we apply to
slixmpp, in one place. May import: protocol, security, config, transport.
"""
