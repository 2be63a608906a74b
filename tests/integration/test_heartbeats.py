"""Heartbeats are per hop: a busy publisher and an idle consumer both stay connected with a
2 s heartbeat on both sides of the proxy."""

from __future__ import annotations

import time
from typing import Any

import pika

from tests.support.broker import Names, queue_counts
from tests.support.pika_client import drain, get_all
from tests.support.proxy import ProxyProcess
from tests.support.targets import ProxyFactory


def hb_proxy(proxy_factory: Any) -> Any:
    return proxy_factory("--client-heartbeat", "2", "--upstream-heartbeat", "2", "-t", "60")


def test_steady_publisher_with_heartbeat_2_stays_connected(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = hb_proxy(proxy_factory)
    q = names.queue("hbpub")
    conn = p.connect(heartbeat=2)
    ch = conn.channel()
    ch.queue_declare(q)
    sent = 0
    end = time.monotonic() + 10
    while time.monotonic() < end:
        ch.basic_publish("", q, f"hb{sent}".encode())
        sent += 1
        conn.process_data_events(time_limit=0.05)
    assert conn.is_open
    if isinstance(p, ProxyProcess):
        rows = p.wait_upstream_count(1)
        assert rows[0]["user"] == "guest"
    ch.queue_declare(q, passive=True)
    assert queue_counts(q) == (sent, 0)
    bodies = [b for _, _, b in get_all(ch, q)]
    assert bodies == [f"hb{i}".encode() for i in range(sent)]
    conn.close()


def test_idle_consumer_with_heartbeat_2_stays_connected(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = hb_proxy(proxy_factory)
    q = names.queue("hbidle")
    conn = p.connect(heartbeat=2)
    ch = conn.channel()
    ch.queue_declare(q)
    got: list[bytes] = []
    ch.basic_consume(q, lambda _c, _m, _p, b: got.append(b), auto_ack=True)
    upstream_before = p.upstream_local_ports() if isinstance(p, ProxyProcess) else None
    end = time.monotonic() + 15
    while time.monotonic() < end:  # idle: only heartbeats flow
        conn.process_data_events(time_limit=0.25)
    assert conn.is_open and not got
    if isinstance(p, ProxyProcess):
        # the upstream connection survived too (not silently replaced)
        assert p.upstream_local_ports() == upstream_before
    other = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    other.channel().basic_publish("", q, b"wake up")
    other.close()
    drain(conn, lambda: got == [b"wake up"], what="delivery after 15 s idle")
    conn.close()
