"""Host names that tests make resolve as they need, through /etc/hosts (they run as root)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

HOSTS = Path("/etc/hosts")
MARKER = "# amqproxy-mp test"


@contextlib.contextmanager
def name_in_hosts(name: str, addresses: list[str]) -> Iterator[str]:
    """`name` (or several, space-separated) resolves to `addresses` while this lasts
    (lines added to /etc/hosts and removed after; host.conf's "multi on", Debian's default,
    makes every line count). `remove_name` takes it away earlier."""
    kept = [line for line in HOSTS.read_text().splitlines() if MARKER not in line]
    HOSTS.write_text("\n".join(kept + [f"{a} {name} {MARKER}" for a in addresses]) + "\n")
    try:
        yield name
    finally:
        remove_name()


def remove_name() -> None:
    """Every name the tests added is gone from /etc/hosts."""
    kept = [line for line in HOSTS.read_text().splitlines() if MARKER not in line]
    HOSTS.write_text("\n".join(kept) + "\n")
