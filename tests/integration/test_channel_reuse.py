"""Upstream channels a client leaves behind (possibly parked and handed to the next client
with the same credentials) carry nothing of the previous client: no stray basic.return,
no confirm or tx mode, no consumers, no unacked messages."""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions

from tests.support.broker import Names, queue_counts
from tests.support.pika_client import drain, get_all
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for


def publish_and_get_own(conn: pika.BlockingConnection, q: str, body: bytes) -> list[Any]:
    """Publish (mandatory) and get back one message; return the basic.returns seen."""
    ch = conn.channel()
    returns: list[Any] = []
    ch.add_on_return_callback(lambda _c, m, _p, b: returns.append((m.reply_code, b)))
    ch.basic_publish("", q, body, mandatory=True)
    got: list[Any] = []

    def arrived() -> bool:
        got.extend(get_all(ch, q))
        return bool(got)

    drain(conn, arrived, what="own message")
    conn.process_data_events(time_limit=0.05)
    assert [b for _, _, b in got] == [body]
    conn.close()
    return returns


def test_no_stray_basic_return_for_the_next_client(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue("reuse")
    b = p.connect()
    b.channel().queue_declare(q)
    b.close()
    for i in range(10):
        a = p.connect()
        ach = a.channel()
        for j in range(5):  # unroutable: the broker returns them, maybe after a's close
            ach.basic_publish("", f"itest-nowhere-{i}-{j}", b"returned", mandatory=True)
        a.close()
        returns = publish_and_get_own(p.connect(), q, f"mine-{i}".encode())
        assert returns == [], f"round {i}: got another client's basic.return: {returns}"


def test_confirm_mode_is_not_inherited(proxy_factory: ProxyFactory, names: Names) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue("reuse-confirm")
    for i in range(5):
        a = p.connect()
        ach = a.channel()
        ach.queue_declare(q)
        ach.confirm_delivery()
        ach.basic_publish("", q, f"confirmed-{i}".encode())
        a.close()
        nxt = p.connect()
        ch = nxt.channel()
        ch.tx_select()  # 406 if this channel were still in confirm mode
        ch.basic_publish("", q, f"tx-{i}".encode())
        ch.tx_commit()
        nxt.close()
    assert queue_counts(q) == (10, 0)


def test_tx_mode_is_not_inherited(proxy_factory: ProxyFactory, names: Names) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue("reuse-tx")
    for i in range(5):
        a = p.connect()
        ach = a.channel()
        ach.queue_declare(q)
        ach.tx_select()
        ach.basic_publish("", q, f"tx-{i}".encode())
        ach.tx_commit()
        ach.basic_publish("", q, b"uncommitted")  # discarded when a leaves
        a.close()
        nxt = p.connect()
        ch = nxt.channel()
        ch.confirm_delivery()  # 406 if this channel were still in tx mode
        ch.basic_publish("", q, f"confirmed-{i}".encode())
        nxt.close()
    got = [body for _, _, body in get_all(p.connect().channel(), q)]
    assert sorted(got) == sorted(
        [f"tx-{i}".encode() for i in range(5)] + [f"confirmed-{i}".encode() for i in range(5)]
    )


def test_publish_only_clients_in_a_row(proxy_factory: ProxyFactory, names: Names) -> None:
    """The PHP pattern with pika: every message arrives once, in order, with its own
    properties (nothing of the previous client's publish leaks into the next)."""
    p = proxy_factory("-t", "30")
    q = names.queue("reuse-pub")
    b = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    b.channel().queue_declare(q)
    for i in range(50):
        c = p.connect()
        props = pika.BasicProperties(message_id=f"m{i}", headers={"i": i} if i % 2 else None)
        c.channel().basic_publish("", q, f"body-{i}".encode() * (i + 1), props)
        c.close()
    wait_for(lambda: queue_counts(q)[0] == 50, what="50 messages enqueued")
    got = get_all(b.channel(), q)
    b.close()
    assert [body for _, _, body in got] == [f"body-{i}".encode() * (i + 1) for i in range(50)]
    assert [(pr.message_id, pr.headers) for _, pr, _ in got] == [
        (f"m{i}", {"i": i} if i % 2 else None) for i in range(50)
    ]


def test_consumer_and_unacked_not_inherited(proxy_factory: ProxyFactory, names: Names) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue("reuse-consume")
    b = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    bch = b.channel()
    bch.queue_declare(q)
    for i in range(3):
        bch.basic_publish("", q, f"u{i}".encode())
    a = p.connect()
    ach = a.channel()
    got: list[bytes] = []
    ach.basic_consume(q, lambda _c, _m, _p, body: got.append(body))
    drain(a, lambda: len(got) == 3, what="a's deliveries")
    a.close()
    nxt = p.connect()
    ch = nxt.channel()
    stray: list[bytes] = []
    ch.basic_consume(q, lambda _c, _m, _p, body: stray.append(body), auto_ack=True)
    # the three come back to the new consumer, redelivered, and only once each
    drain(nxt, lambda: len(stray) >= 3, what="redeliveries to the next client")
    nxt.process_data_events(time_limit=0.3)
    assert sorted(stray) == [b"u0", b"u1", b"u2"]
    nxt.close()
    b.close()
