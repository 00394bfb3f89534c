"""The one TLS trust every connection to the grid uses: the grid's own CA."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path


@functools.lru_cache(maxsize=8)
def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """One verifying TLS context per trust anchor, shared by every session in the process.

    slixmpp builds two contexts per client from the system store by default (~70 ms each
    time and megabytes of memory): a thousand device identities would spend a minute on that.
    With a CA file given, only that CA is trusted: the embedded server's, nobody else's.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else ssl.create_default_context()
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
