"""Connection.Blocked / Unblocked (RabbitMQ memory alarm) reach the clients."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pika

from tests.support.broker import Names, close_broker_connection, queue_counts, rabbitmqctl
from tests.support.pika_client import drain
from tests.support.proxy import ProxyProcess
from tests.support.targets import ProxyFactory, Target


def watched(target: Target, events: list[str]) -> pika.BlockingConnection:
    """A client connection whose Connection.Blocked and Unblocked are noted in `events`."""
    c = target.connect()
    c.add_on_connection_blocked_callback(lambda _c, _m: events.append("blocked"))
    c.add_on_connection_unblocked_callback(lambda _c, _m: events.append("unblocked"))
    return c


def test_blocked_and_unblocked_reach_pika_clients(
    proxy: Target, names: Names, restore_watermark: Callable[[], None]
) -> None:
    events: list[tuple[str, str, str]] = []

    def client(tag: str) -> pika.BlockingConnection:
        c = proxy.connect()
        c.add_on_connection_blocked_callback(
            lambda _c, m: events.append((tag, "blocked", m.method.reason))
        )
        c.add_on_connection_unblocked_callback(lambda _c, m: events.append((tag, "unblocked", "")))
        return c

    q = names.queue("blocked")
    a = client("a")
    ach = a.channel()
    ach.queue_declare(q)
    b = None
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0")
        ach.basic_publish("", q, b"published while blocked")
        drain(
            a,
            lambda: ("a", "blocked", "low on memory") in events,
            timeout=15,
            what="Connection.Blocked on client a",
        )
        # a second client on the same credentials learns it too (on join or on publish)
        b = client("b")
        bch = b.channel()
        bch.basic_publish("", q, b"second while blocked")
        drain(
            b,
            lambda: ("b", "blocked", "low on memory") in events,
            timeout=15,
            what="Connection.Blocked on client b",
        )
        assert queue_counts(q)[0] == 0  # nothing got through while blocked
    finally:
        restore_watermark()

    def both_unblocked() -> bool:
        a.process_data_events(time_limit=0.02)
        if b is not None:
            b.process_data_events(time_limit=0.02)
        return ("a", "unblocked", "") in events and ("b", "unblocked", "") in events

    deadline = time.monotonic() + 20
    while not both_unblocked():
        assert time.monotonic() < deadline, f"no Connection.Unblocked: {events}"
    assert [e for e in events if e[0] == "a"] == [
        ("a", "blocked", "low on memory"),
        ("a", "unblocked", ""),
    ]
    assert [e for e in events if e[0] == "b"] == [
        ("b", "blocked", "low on memory"),
        ("b", "unblocked", ""),
    ]
    deadline = time.monotonic() + 10
    while queue_counts(q)[0] != 2:
        assert time.monotonic() < deadline, "the held messages were not delivered"
        a.process_data_events(time_limit=0.05)
    got: list[Any] = []
    while True:
        m, _, body = ach.basic_get(q, auto_ack=True)
        if m is None:
            break
        got.append(body)
    assert sorted(got) == [b"published while blocked", b"second while blocked"]
    a.close()
    assert b is not None
    b.close()


def test_unblocked_reaches_a_client_that_closed_its_channel_meanwhile(
    proxy: Target, names: Names, restore_watermark: Callable[[], None]
) -> None:
    """Blocked and Unblocked are about the connection: a client told Blocked is told
    Unblocked, even if it has no channel left on the upstream connection by then."""
    events: list[str] = []
    q = names.queue("unblocked")
    publisher = proxy.connect()
    pch = publisher.channel()
    pch.queue_declare(q)
    c = watched(proxy, events)
    ch = c.channel()
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0")
        pch.basic_publish("", q, b"makes the broker block the connection")
        drain(c, lambda: events == ["blocked"], timeout=15, what="Connection.Blocked")
        ch.close()  # it published nothing: answered at once, and its channel is gone
    finally:
        restore_watermark()
    drain(c, lambda: events == ["blocked", "unblocked"], timeout=20, what="Unblocked")
    c.close()
    publisher.close()


def test_a_blocked_client_is_unblocked_when_its_upstream_connection_ends_meanwhile(
    proxy_factory: ProxyFactory, restore_watermark: Callable[[], None]
) -> None:
    """A client told Connection.Blocked closes its channel (close_policy local: at once); the
    upstream connection it was on then ends. The client, with nothing left there, carries
    on, and must not stay blocked: it hears Unblocked (and Blocked again from whichever
    connection it publishes on next, while the alarm lasts). (It stayed blocked for ever:
    only the connection that was gone could unblock it.)"""
    p = proxy_factory("--close-policy", "local", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    events: list[str] = []
    c = watched(p, events)
    ch = c.channel()
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0")
        ch.basic_publish("", "", b"while blocked")
        drain(c, lambda: "blocked" in events, timeout=15, what="Connection.Blocked")
        ch.close()
        (port,) = p.upstream_local_ports()
        close_broker_connection(port, "itest: the upstream connection ends")
        drain(c, lambda: "unblocked" in events, timeout=15, what="Connection.Unblocked")
    finally:
        restore_watermark()
    c.channel().basic_publish("", "", b"after the alarm")
    c.close()
