"""Clients an upstream connection stopped reading (the broker was not reading it) are read
again when it reads again or ends, whether or not they still have a channel on it, and a
client told Blocked is told Unblocked likewise. (Before, only clients with a channel there at
that moment were released: one whose channel had gone meanwhile was never read again, and,
being "held", never timed out either.)"""

from __future__ import annotations

import asyncio
from typing import Any

from amqproxy_mp.config import Upstream
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.login import Login, UpstreamSettings
from amqproxy_mp.proxy.nodes import Nodes
from amqproxy_mp.proxy.upstream import State, UpstreamConnection


class Client:
    def __init__(self) -> None:
        self.holds: set[Any] = set()
        self.unblocked = 0
        self.closed_with: tuple[int, str] | None = None

    def hold_reading(self, holder: object) -> None:
        self.holds.add(holder)

    def release_reading(self, holder: object) -> None:
        self.holds.discard(holder)

    def upstream_unblocked(self, upstream: object) -> None:
        self.unblocked += 1

    def close_with(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        self.closed_with = (code, text)


def connection() -> UpstreamConnection:
    loop = asyncio.new_event_loop()
    stats = Stats()
    nodes = Nodes(Upstream("amqp", "127.0.0.1", 5672), "spread", 2.0, None, stats)
    settings = UpstreamSettings(1.0, 0)
    return UpstreamConnection(loop, settings, nodes.nodes[0], nodes, stats, Login("u", "p"), None)


def test_held_clients_are_released_when_the_broker_reads_again() -> None:
    conn = connection()
    client = Client()
    conn.hold(client)  # type: ignore[arg-type]
    assert client.holds == {conn}
    # (its channel on this connection is gone by now: conn.channels is empty)
    conn.resume_writing()
    assert client.holds == set()


def test_held_clients_are_released_when_the_connection_ends() -> None:
    conn = connection()
    client = Client()
    conn.hold(client)  # type: ignore[arg-type]
    conn._close_clients(320, "CONNECTION_FORCED - upstream connection lost", 0, 0)
    assert client.holds == set()


def test_a_client_told_blocked_is_told_unblocked_without_a_channel_here() -> None:
    conn = connection()
    client = Client()
    conn.blocked_clients.add(client)  # type: ignore[arg-type]
    conn.state = State.OPEN
    conn._connection_method(memoryview(b"\x00\x0a\x00\x3d"))  # Connection.Unblocked
    assert client.unblocked == 1
    assert conn.blocked_clients == set()
