"""What every bot with its own account and OpenPGP key does to come and go."""

from __future__ import annotations

from gridpresence.xmpp.session import Endpoint, GridClient, close_session, open_session
from gridpresence.security.pep_keyring import PepKeyring


class PartySession:
    """Log in, announce the key (XEP-0373) before anyone is told we are here, leave.

    Subclasses set ``client``, ``endpoint`` and ``keyring`` and extend :meth:`login` or
    :meth:`stop` with their own arrival and goodbye."""

    client: GridClient
    endpoint: Endpoint
    keyring: PepKeyring

    @property
    def jid(self) -> str:
        return str(self.client.boundjid.bare)

    async def start(self, timeout: float = 20.0) -> None:
        await self.login(timeout)
        await self.keyring.announced()

    async def login(self, timeout: float = 20.0) -> None:
        """Log in; the key is announced meanwhile (:meth:`start` waits for that too)."""
        await open_session(self.client, self.endpoint, timeout)

    async def stop(self) -> None:
        await close_session(self.client)
