"""Programs the harness found differing, kept (shrunk, as printed) as ordinary tests.

Each is written out step by step rather than kept as a seed, so that a change to the
generator does not change what it tests. (What the harness found only with programs running
at the same time, such as a channel handed over before it was clean, is a race that no
single program repeats: those defects have their own deterministic tests in
tests/integration, see docs/testing.md.)
"""

from __future__ import annotations

from .program import Burst, Call, Connect, Disconnect, OpenChannel, Program, Publish, Step

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
    # A Queue.Bind of another client's exclusive queue to a missing exchange: RabbitMQ looks
    # at the exchange first (404); the proxy refused the locked queue itself (405) (seed
    # 102314, 30-minute run).
    "binding another client's exclusive queue to a missing exchange": [
        Connect(4),
        OpenChannel(4, 1),
        Call(4, 1, "queue.declare", ("e1", False, True, False, "every type")),
        Connect(0, "AMQPLAIN", frame_max=4096),
        OpenChannel(0, 1),
        Call(0, 1, "queue.bind", ("e1", "x1", "k", "none")),
    ],
    # A client closed with 541 for unreadable properties while the broker's answer that
    # decided it was being handled: its channel was parked twice, and the next two clients
    # were given the same upstream channel; one got the other's replies (seed 102552, found
    # through state an earlier program left in a long run; written out here).
    "a channel given back during the reply that settles it is parked once": [
        Connect(0),
        OpenChannel(0, 1),
        Publish(0, 1, "amq.direct", "q1", headers="NaN"),
        Connect(1),
        OpenChannel(1, 1),
        Connect(2),
        OpenChannel(2, 1),
        Call(1, 1, "queue.declare", ("q1", False, False, False, "none")),
        Call(2, 1, "queue.declare", ("q2", False, False, False, "none")),
    ],
    # A client closed by a connection error (504, a method on a channel the broker had just
    # closed) while it owned an exclusive queue; another client asked for the queue at once:
    # 404 from RabbitMQ, which deletes the queue as it closes the connection; 405 through two
    # workers, where the proxy told the client before its delete was done (seed 101912,
    # 30-minute run; about one run in two).
    "a client's exclusive queue is gone when its connection error arrives": [
        Connect(1),
        OpenChannel(1, 1),
        Call(1, 1, "queue.declare", ("e1", False, True, False, "max-length")),
        Connect(2),
        OpenChannel(2, 1),
        Publish(1, 1, "nx", "k", body="split"),
        Call(1, 1, "sync"),
        Call(2, 1, "basic.get", ("e1", True)),
    ],
    # Tx.Select on a parked channel the proxy had put in confirm mode (its last client
    # published), after a Basic.Cancel of an unknown tag: the cancel pinned the channel to its
    # upstream one, where RabbitMQ refuses tx (406); it leaves no state, and the channel now
    # moves (seed 242, issue 13).
    "tx.select on a reused confirm-mode channel after a cancel": [
        Connect(1),
        OpenChannel(1, 1),
        Publish(1, 1, "", "q1"),
        Disconnect(1),
        Connect(2),
        OpenChannel(2, 1),
        Call(2, 1, "basic.cancel", (2,)),
        Call(2, 1, "tx.select"),
        Publish(2, 1, "", "q1"),
        Call(2, 1, "tx.commit"),
    ],
}


def regression_programs() -> dict[str, Program]:
    return {name: Program(-1, list(steps)) for name, steps in REGRESSIONS.items()}
