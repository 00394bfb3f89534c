"""A cut network path to one TCP port, as a firewall makes it: an nftables table of the calling
test's own (never another test's or Docker's), dropping every packet to or from the port both
ways, so established sessions stall and new ones get no answer. Root and `nft` only."""

from __future__ import annotations

import os
import shutil
import subprocess


def can_drop_ports() -> bool:
    return os.geteuid() == 0 and shutil.which("nft") is not None


def drop_port(table: str, port: int) -> None:
    rules = (f"table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n"
             f"  tcp dport {port} drop\n  tcp sport {port} drop\n }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, capture_output=True, timeout=10, check=True)


def undrop_port(table: str) -> None:
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=10)
