"""Bulk account provisioning by writing Prosody's internal storage files directly.

``prosodyctl adduser`` costs ~50 ms per account (a whole Lua start-up each time), far too slow
for thousands of simulated devices. Prosody's ``internal`` storage is one Lua file per user and
store, so we write exactly what these Prosody 0.12 modules would write:

* ``util/datamanager.lua``: path ``<data_path>/<enc host>/<store>/<enc user>.dat`` holding
  ``return <table>;`` where names are encoded by replacing each non-alphanumeric byte by ``%xx``;
* ``modules/mod_auth_internal_hashed.lua``: SCRAM-SHA-1 ``stored_key``/``server_key`` (hex),
  ``salt`` (a UUID string) and ``iteration_count``;
* ``core/rostermanager.lua``: ``[false] = { version, pending = {} }`` plus one item per contact.

Files are replaced atomically, so a running Prosody reads either the old or the new account.
A running Prosody caches rosters of loaded users, so provision rosters before starting it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import string
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from slixmpp import JID
from slixmpp.jid import InvalidJID
from slixmpp.util.sasl.client import saslprep

SUBSCRIPTIONS = frozenset({"none", "to", "from", "both"})
_ALNUM = frozenset((string.ascii_letters + string.digits).encode())  # Lua's %w in the C locale


@dataclass(frozen=True)
class RosterEntry:
    """One contact in a user's roster; `subscription` is the RFC 6121 state as Prosody stores it."""

    jid: str
    name: str
    groups: tuple[str, ...] = ()
    subscription: str = "both"


@dataclass(frozen=True)
class AccountSpec:
    """An account to create (or overwrite): its password and its complete roster."""

    username: str
    password: str
    roster: tuple[RosterEntry, ...] = ()


def scram_sha1_credentials(password: str, salt: str, iterations: int) -> dict[str, object]:
    """The account record mod_auth_internal_hashed stores for `password` (RFC 5802 keys)."""
    prepared = saslprep(password)
    salted = hashlib.pbkdf2_hmac("sha1", prepared.encode("utf-8"), salt.encode("utf-8"), iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha1")
    return {
        "stored_key": hashlib.sha1(client_key).hexdigest(),
        "server_key": hmac.digest(salted, b"Server Key", "sha1").hex(),
        "salt": salt,
        "iteration_count": iterations,
    }


def provision(data_path: Path, domain: str, accounts: Iterable[AccountSpec], iterations: int = 4096) -> None:
    """Create or overwrite `accounts` (credentials and whole roster) under Prosody's `data_path`.

    Accounts not mentioned are left alone. Every spec is validated before anything is written.
    """
    prepared = _validated(domain, accounts)
    host_dir = Path(data_path) / encode_name(domain)
    account_dir, roster_dir = host_dir / "accounts", host_dir / "roster"
    for directory in (account_dir, roster_dir):
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)

    # A fresh roster version per run makes clients holding a cached roster (XEP-0237) refetch it.
    version = time.time_ns() // 1_000_000

    def credentials(account: _Account) -> dict[str, object]:
        return scram_sha1_credentials(account.spec.password, str(uuid.uuid4()), iterations)

    # hashlib's PBKDF2 releases the GIL, so threads spread the dominant cost over all cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for account, record in zip(prepared, pool.map(credentials, prepared)):
            filename = encode_name(account.node) + ".dat"
            _write_store(account_dir / filename, record)
            metadata = {"version": version, "pending": {}}
            _write_store(roster_dir / filename, {False: metadata, **account.roster})


# --- validation ---------------------------------------------------------------------------


class _Account(NamedTuple):
    node: str  # the username as Prosody stores it
    spec: AccountSpec
    roster: dict[str, object]  # Prosody roster items by bare JID


def _validated(domain: str, accounts: Iterable[AccountSpec]) -> list[_Account]:
    """Normalised accounts; ValueError on the first bad one."""
    out: list[_Account] = []
    seen: set[str] = set()
    for spec in accounts:
        node = _nodeprep(spec.username, domain)
        if node in seen:
            raise ValueError(f"account {spec.username!r} is listed twice")
        seen.add(node)
        saslprep(spec.password)  # raises on prohibited characters, before any file is written
        out.append(_Account(node, spec, _roster_items(f"{node}@{domain}", spec.roster)))
    return out


def _nodeprep(username: str, domain: str) -> str:
    """The username as Prosody stores it (nodeprep: case-folded, validated)."""
    if not username or "@" in username or "/" in username:
        raise ValueError(f"invalid username {username!r}")
    try:
        return str(JID(f"{username}@{domain}").user)
    except InvalidJID as exc:
        raise ValueError(f"invalid username {username!r}: {exc}") from exc


def _roster_items(owner: str, entries: Iterable[RosterEntry]) -> dict[str, object]:
    owner = JID(owner).bare
    items: dict[str, object] = {}
    for entry in entries:
        try:
            contact = JID(entry.jid).bare
        except InvalidJID as exc:
            raise ValueError(f"invalid roster jid {entry.jid!r}: {exc}") from exc
        if not contact:
            raise ValueError(f"invalid roster jid {entry.jid!r}")
        if entry.subscription not in SUBSCRIPTIONS:
            raise ValueError(
                f"roster entry {entry.jid!r}: subscription {entry.subscription!r} is not one of "
                f"{sorted(SUBSCRIPTIONS)}"
            )
        if contact == owner:
            continue  # Prosody deletes self-contacts on load anyway
        # rostermanager iterates item.groups unconditionally: always write the table.
        item: dict[str, object] = {
            "subscription": entry.subscription,
            "groups": dict.fromkeys(entry.groups, True),
        }
        if entry.name:
            item["name"] = entry.name
        items[contact] = item
    return items


# --- Prosody storage format -----------------------------------------------------------------


def encode_name(name: str) -> str:
    """util/datamanager.lua `encode`: each byte other than [A-Za-z0-9] becomes %xx (lowercase hex)."""
    return "".join(chr(b) if b in _ALNUM else f"%{b:02x}" for b in name.encode("utf-8"))


def lua_string(text: str) -> str:
    """A double-quoted Lua string literal for any text.

    Backslash and quote are escaped, control bytes become decimal escapes (three digits, so a
    following digit is never swallowed); other UTF-8 passes through, Lua strings being bytes.
    """
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03d}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def lua_literal(value: object, indent: int = 0) -> str:
    """`value` (str, int, bool, or a mapping of those) as a Lua expression, Prosody-style layout."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        pad = "\t" * (indent + 1)
        lines = [f"{pad}[{lua_literal(k)}] = {lua_literal(v, indent + 1)};" for k, v in value.items()]
        return "{\n" + "\n".join(lines) + "\n" + "\t" * indent + "}"
    raise TypeError(f"cannot write {type(value).__name__} to Prosody storage")


def _write_store(path: Path, table: Mapping[Any, object]) -> None:
    """Atomically replace `path` with `return <table>;` (what datamanager.store writes).

    No fsync: atomicity here protects a running Prosody from half-written files; durability
    across power loss is not worth 2000 fsyncs per 1000 accounts for test and bench data.
    """
    data = ("return " + lua_literal(table) + ";\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not *.dat, so Prosody never lists it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
