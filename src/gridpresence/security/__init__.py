"""OpenPGP for the grid: every party's key, pinned keys of others, signed commands and
per-party encrypted data (XEP-0373/0374 framing), and the verbs both sides of the wire share
(sealing and reading billing reports, checking the billing party's signed tariff, signing
firmware offers). pgpy stays behind these modules. May import: protocol, words."""
