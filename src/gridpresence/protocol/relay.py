"""The store-and-forward relay's timing, which its issuers count on too (PROTOCOL.md, "The relay")."""

from __future__ import annotations

# How long after its expiry a command already sent to a device waits for the device's verdict
# before the relay answers "expired" for it.
ANSWER_MARGIN_S = 2.0
# How long after a queued command's expiry its issuer waits for the relay's final word.
FINAL_MARGIN_S = ANSWER_MARGIN_S + 1.0
