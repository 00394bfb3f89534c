"""OpenPGP for the grid: every party's key, pinned keys of others, signed commands and
per-party encrypted data (XEP-0373/0374 framing)."""
