"""Programs the harness found differing, kept (shrunk, as printed) as ordinary tests.

Each is written out step by step rather than kept as a seed, so that a change to the
generator does not change what it tests. (What the harness found only with programs running
at the same time, such as a channel handed over before it was clean, is a race that no
single program repeats: those defects have their own deterministic tests in
tests/integration, see docs/testing.md.)
"""

from __future__ import annotations

from .program import Burst, Call, Connect, OpenChannel, Program, Publish, Step

REGRESSIONS: dict[str, list[Step]] = {
    # A message whose properties RabbitMQ cannot read (a NaN header), to a missing exchange:
    # RabbitMQ looks the exchange up first and closes the channel (404); the proxy refused the
    # message itself with the connection's 541 (seed 21; commit 2985606).
    "unreadable properties, missing exchange": [
        Connect(1),
        OpenChannel(1, 1),
        Publish(1, 1, "nx", "k", headers="NaN"),
    ],
    # The same to an existing exchange: the connection's 541, as directly (seed 12).
    "unreadable properties, existing exchange": [
        Connect(3, frame_max=4096),
        OpenChannel(3, 1),
        Publish(3, 1, "x0", "q1", headers="NaN"),
    ],
    # A Basic.Get and its channel's close in one write: the reply settled the close, which
    # let go of the client before the reply was passed on; the proxy's own error closed the
    # shared upstream connection, and client 1 with it (seed 4; commit 108aaa1).
    "a reply before the close it settles": [
        Connect(2),
        OpenChannel(2, 1),
        Connect(1),
        OpenChannel(1, 1),
        Call(1, 1, "queue.declare", ("q1", False, False, False, "ttl")),
        Burst(2, "get-close", 1, 6, "q1"),
    ],
}


def regression_programs() -> dict[str, Program]:
    return {name: Program(-1, list(steps)) for name, steps in REGRESSIONS.items()}
