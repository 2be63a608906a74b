"""Small utilities with no AMQP in them: the repository's root, unique names, free ports,
polling until a condition holds."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"itest-{prefix}-{uuid.uuid4().hex[:10]}"


#: Ports free_port gave out: the kernel may offer a port again once its socket is closed,
#: and a test that asks for two (an HTTP port and a TLS port) must get two.
_handed_out: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``what`` and the last value (or exception) on timeout.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except AssertionError as exc:  # a predicate may assert; keep polling
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)
