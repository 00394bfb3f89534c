"""Embedded XMPP server: a private Prosody with its own CA, ports and bulk-provisioned accounts
(``accounts``: a fleet's parties, passwords and rosters). Runs in the hosting process, never in
a bot. May import: protocol, words, security, rules, config, physics, transport, xmpp."""

from gridpresence.server.certs import CertPaths, ensure_certificates
from gridpresence.server.ports import free_port, free_ports, port_is_free
from gridpresence.server.prosody import (
    PortInUse,
    ProsodyMissing,
    ProsodyServer,
    ServerError,
    ServerPorts,
)
from gridpresence.server.provision import (
    AccountSpec,
    RosterEntry,
    provision,
    scram_sha1_credentials,
)

__all__ = [
    "AccountSpec",
    "CertPaths",
    "PortInUse",
    "ProsodyMissing",
    "ProsodyServer",
    "RosterEntry",
    "ServerError",
    "ServerPorts",
    "ensure_certificates",
    "free_port",
    "free_ports",
    "port_is_free",
    "provision",
    "scram_sha1_credentials",
]
