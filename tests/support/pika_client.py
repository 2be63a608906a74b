"""Helpers for tests that drive pika: the reply code and text of a pika close exception, running
pika's I/O loop until a condition holds, basic.get of a whole queue, and a bystander client
that proves another client's misdeeds cost it nothing."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from .broker import Names
from .targets import Target

CLOSE_RE = re.compile(r"\((\d{3})\) ['\"](.*)['\"]\s*$", re.S)


def close_reason(exc: BaseException) -> tuple[int, str]:
    """(reply_code, reply_text) of a pika close exception.

    pika raises ConnectionClosedByBroker / ChannelClosedByBroker with (code, text) once the
    connection is open, but wraps a close during connection set-up into
    ProbableAuthenticationError / ProbableAccessDeniedError / AMQPConnectionError whose only
    argument is the repr of the original ConnectionClosedByBroker. Both are handled.
    """
    if isinstance(
        exc, pika.exceptions.ConnectionClosedByBroker | pika.exceptions.ChannelClosedByBroker
    ):
        return int(exc.reply_code), str(exc.reply_text)
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, BaseException):
            with contextlib.suppress(ValueError):
                return close_reason(arg)
        m = CLOSE_RE.search(str(arg))
        if m and "ClosedByBroker" in str(arg):
            return int(m.group(1)), m.group(2)
    raise ValueError(f"no broker close reason in {exc!r}")


def drain(
    conn: pika.BlockingConnection,
    until: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> None:
    """Run pika's I/O loop until ``until()`` holds (or fail after timeout)."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        conn.process_data_events(time_limit=0.05)


def get_all(ch: Any, queue: str, limit: int = 100000) -> list[tuple[Any, Any, bytes]]:
    """basic.get (auto-ack) until the queue is empty."""
    out = []
    while len(out) < limit:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((method, props, body))
    return out


class Bystander:
    """A pika client with its own queue that it publishes to and consumes from: proof that
    what another client did on the same upstream connection cost it nothing."""

    def __init__(
        self, target: Target, names: Names, user: str = "guest", password: str = "guest",
        vhost: str = "/",
    ) -> None:  # fmt: skip
        self.conn = target.connect(user, password, vhost)
        self.ch = self.conn.channel()
        self.queue = names.queue("bystander", vhost)
        self.ch.queue_declare(self.queue)
        self.got: list[bytes] = []
        self.sent: list[bytes] = []
        self.ch.basic_consume(
            self.queue, lambda _c, _m, _p, body: self.got.append(body), auto_ack=True
        )

    def roundtrip(self, n: int = 3, timeout: float = 10.0) -> None:
        """Publish n messages and wait until exactly everything sent so far came back."""
        for _ in range(n):
            body = f"bystander-{len(self.sent)}".encode()
            self.ch.basic_publish("", self.queue, body)
            self.sent.append(body)
        drain(self.conn, lambda: len(self.got) >= len(self.sent), timeout, "bystander messages")
        assert self.got == self.sent

    def close(self) -> None:
        self.conn.close()
