"""Upstream connection pooling, counted both from the proxy's sockets and from RabbitMQ."""

from __future__ import annotations

import time

import pika

from tests.support.broker import Aux
from tests.support.pika_client import get_all
from tests.support.proxy import PROXY_CONNECTION_NAME, ProxyProcess
from tests.support.targets import ProxyFactory


def use_channel(ch: pika.adapters.blocking_connection.BlockingChannel, tag: str) -> None:
    """Make the channel really exist upstream: declare, publish, get back."""
    q = ch.queue_declare("", exclusive=True).method.queue
    body = f"pooled-{tag}".encode()
    ch.basic_publish("", q, body)
    got = []
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        got = get_all(ch, q)
    assert [b for _, _, b in got] == [body]
    ch.queue_delete(q)


def test_concurrent_clients_share_one_upstream(proxy_factory: ProxyFactory) -> None:
    p: ProxyProcess = proxy_factory("-t", "30", direct_ok=False)
    clients = [p.connect() for _ in range(6)]
    try:
        channels = [c.channel() for c in clients]
        for i, ch in enumerate(channels):
            use_channel(ch, str(i))
        rows = p.wait_upstream_count(1)
        row = rows[0]
        assert (row["user"], row["vhost"]) == ("guest", "/")
        assert row["client_properties"].get("connection_name") == PROXY_CONNECTION_NAME
        # all six clients are still usable at the same time
        for i, ch in enumerate(channels):
            use_channel(ch, f"again-{i}")
        assert p.wait_upstream_count(1)
    finally:
        for c in clients:
            c.close()


def test_max_upstream_channels_opens_more_connections(proxy_factory: ProxyFactory) -> None:
    """New clients go to a connection under the limit; a client's own further channels stay on
    its first channel's connection (where its exclusive queues are), even past the limit."""
    p: ProxyProcess = proxy_factory("-t", "30", "--max-upstream-channels", "2", direct_ok=False)
    conn = p.connect()
    other = p.connect()
    third = p.connect()
    try:
        channels = [conn.channel() for _ in range(3)] + [other.channel() for _ in range(2)]
        channels.append(third.channel())
        for i, ch in enumerate(channels):
            use_channel(ch, str(i))
        rows = p.wait_upstream_count(3)
        assert sorted(r["channels"] for r in rows) == [1, 2, 3]
        for i, ch in enumerate(channels):  # all five still work
            use_channel(ch, f"again-{i}")
    finally:
        conn.close()
        other.close()


def test_idle_upstream_connections_close_keep_one(proxy_factory: ProxyFactory) -> None:
    p: ProxyProcess = proxy_factory("-t", "1", "--max-upstream-channels", "1", direct_ok=False)
    clients = [p.connect() for _ in range(3)]
    for i, c in enumerate(clients):
        use_channel(c.channel(), str(i))
    p.wait_upstream_count(3)
    for c in clients:
        c.close()
    # idle timeout 1 s: two of the three close, one stays for the pool
    p.wait_upstream_count(1, timeout=6)
    time.sleep(2.5)  # well past the idle timeout: the last one must stay
    rows = p.wait_upstream_count(1, timeout=1)
    # the clients' channels declared queues: not reusable, so all were closed upstream
    assert rows[0]["channels"] == 0
    # and the kept connection serves the next client
    kept = p.upstream_local_ports()
    c = p.connect()
    use_channel(c.channel(), "after-idle")
    assert p.upstream_local_ports() == kept
    c.close()


def test_pools_are_per_user_and_vhost(proxy_factory: ProxyFactory, aux: Aux) -> None:
    p: ProxyProcess = proxy_factory("-t", "30", direct_ok=False)
    combos = [
        ("guest", "guest", "/"),
        ("guest", "guest", "/"),
        (aux.user, aux.password, "/"),
        ("guest", "guest", aux.vhost),
        (aux.user, aux.password, aux.vhost),
        (aux.user, aux.password, aux.vhost),
    ]
    clients = [p.connect(u, pw, v) for u, pw, v in combos]
    try:
        for i, c in enumerate(clients):
            use_channel(c.channel(), str(i))
        rows = p.wait_upstream_count(4)
        assert sorted((r["user"], r["vhost"], r["channels"]) for r in rows) == sorted(
            [
                ("guest", "/", 2),
                (aux.user, "/", 1),
                ("guest", aux.vhost, 1),
                (aux.user, aux.vhost, 2),
            ]
        )
    finally:
        for c in clients:
            c.close()
