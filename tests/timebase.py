"""Instants for tests that need fixed times, taken from one clock reading when the suite loads.

Never a calendar date: a signature made on a fixed day by a key generated today is older than
its key, which GnuPG refuses ("Time conflict"), and a date in the past ages out of every replay
and freshness window. Every instant a test names is an offset from NOW, and the keys such tests
sign with are made a day before it, so the suite holds on any day.
"""

from __future__ import annotations

import datetime as dt

from gridpresence.protocol.models import utcnow
from gridpresence.security.keys import generate
from gridpresence.security.pgp import pgpy

NOW = utcnow().replace(microsecond=0)  # OpenPGP keeps whole seconds
KEY_BIRTH = NOW - dt.timedelta(days=1)


def key_for(jid: str) -> pgpy.PGPKey:
    """A secret key made before NOW, so a signature at NOW or a little before it is valid."""
    return generate(jid, created=KEY_BIRTH)
