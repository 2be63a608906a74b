"""Channel operations through the proxy with pika (BlockingConnection)."""

from __future__ import annotations

import datetime
import decimal
import time
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import body as pbody
from pamqp import commands, frame, header

from tests.support.broker import Names, queue_counts
from tests.support.pika_client import drain, get_all
from tests.support.raw_client import RawClient
from tests.support.targets import Target
from tests.support.util import wait_for

BODY = bytes(range(256)) * 4 + b"\r\n\x00\xce\xff end"

HEADERS: dict[str, Any] = {
    "str": "text \u00e9\u4e2d",
    "int": 42,
    "neg": -7,
    "big": 2**40,
    "true": True,
    "false": False,
    "none": None,
    "bytes": b"\x00\x01\xce\xff",
    "decimal": decimal.Decimal("3.14"),
    "ts": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "list": [1, "two", [3, "four"], {"five": 5}],
    "nested": {"a": 1, "b": {"c": "deep", "d": [True, None]}, "e": ""},
}


def full_props(user_id: str = "guest") -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/x-itest",
        content_encoding="identity",
        headers=HEADERS,
        delivery_mode=2,
        priority=5,
        correlation_id="corr-\u00fc-1",
        reply_to="reply-queue-1",
        expiration="600000",
        message_id="msg-id-1",
        timestamp=1700000000,
        type="itest.event",
        user_id=user_id,
        app_id="itest-app",
    )


PROP_NAMES = [
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
]


def props_dict(p: pika.BasicProperties) -> dict[str, Any]:
    return {n: getattr(p, n) for n in PROP_NAMES}


def get_one(ch: Any, queue: str, timeout: float = 5.0) -> tuple[Any, Any, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=True)
        if m is not None:
            return m, p, b
        if time.monotonic() > deadline:
            raise AssertionError(f"no message in {queue} after {timeout}s")
        time.sleep(0.02)


# --------------------------------------------------------------------------- topology


def test_declare_bind_unbind_purge_delete(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    returned: list[Any] = []
    ch.add_on_return_callback(lambda _c, m, p, b: returned.append((m, b)))
    topic, direct, q = names.exchange("topic"), names.exchange("direct"), names.queue()

    ch.exchange_declare(topic, "topic", auto_delete=False)
    ch.exchange_declare(direct, "direct")
    ch.exchange_declare(direct, "direct", passive=True)
    ok = ch.queue_declare(q, arguments={"x-max-length": 1000, "x-queue-type": "classic"})
    assert (ok.method.queue, ok.method.message_count, ok.method.consumer_count) == (q, 0, 0)
    ch.queue_bind(q, direct, routing_key="a.b")
    ch.exchange_bind(destination=direct, source=topic, routing_key="a.#")

    ch.basic_publish(topic, "a.b", b"one", mandatory=True)
    ch.basic_publish(direct, "a.b", b"two", mandatory=True)
    ch.basic_publish(topic, "a.c", b"lost", mandatory=True)  # reaches direct, no queue for a.c
    drain(conn, lambda: len(returned) == 1, what="basic.return of the unroutable message")
    assert returned[0][1] == b"lost"
    assert returned[0][0].reply_code == 312
    ok = ch.queue_declare(q, passive=True)
    assert ok.method.message_count == 2

    assert ch.queue_purge(q).method.message_count == 2
    ch.exchange_unbind(destination=direct, source=topic, routing_key="a.#")
    ch.basic_publish(topic, "a.b", b"after-e2e-unbind", mandatory=True)
    drain(conn, lambda: len(returned) == 2, what="return after exchange unbind")
    assert returned[1][1] == b"after-e2e-unbind"
    ch.queue_unbind(q, direct, routing_key="a.b")
    ch.basic_publish(direct, "a.b", b"after-unbind", mandatory=True)
    drain(conn, lambda: len(returned) == 3, what="return after queue unbind")
    ch.queue_bind(q, direct, routing_key="a.b")
    ch.basic_publish(direct, "a.b", b"three")
    ch.basic_publish(direct, "a.b", b"four")
    assert [b for _, _, b in [get_one(ch, q)]] == [b"three"]
    assert ch.queue_delete(q).method.message_count == 1
    ch.exchange_delete(direct)
    ch.exchange_delete(topic)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.exchange_declare(direct, "direct", passive=True)
    assert (info.value.reply_code, info.value.reply_text) == (
        404,
        f"NOT_FOUND - no exchange '{direct}' in vhost '/'",
    )
    conn.close()


def test_passive_declare_missing_queue_404_connection_stays_usable(
    proxy: Target, names: Names
) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    missing = names.queue("missing")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.queue_declare(missing, passive=True)
    assert (info.value.reply_code, info.value.reply_text) == (
        404,
        f"NOT_FOUND - no queue '{missing}' in vhost '/'",
    )
    assert ch.is_closed
    assert conn.is_open
    ch2 = conn.channel()
    q = names.queue()
    ch2.queue_declare(q)
    ch2.basic_publish("", q, b"still works")
    assert get_one(ch2, q)[2] == b"still works"
    # and it happens again the same way on the new channel
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch2.queue_declare(missing, passive=True)
    assert info.value.reply_code == 404
    conn.channel().queue_delete(q)
    conn.close()


def test_redeclare_with_arguments_declared_directly(
    proxy: Target, broker: pika.BlockingConnection, names: Names
) -> None:
    """Arguments declared on the broker directly are equivalent when redeclared through the
    proxy (the proxy must forward declare arguments as the original bytes)."""
    q = names.queue()
    args = {
        "x-message-ttl": 60000,
        "x-max-length": 7,
        "x-overflow": "reject-publish",
        "x-queue-mode": "default",
    }
    broker.channel().queue_declare(q, durable=True, arguments=args)
    conn = proxy.connect()
    ch = conn.channel()
    ok = ch.queue_declare(q, durable=True, arguments=args)
    assert ok.method.queue == q
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.queue_declare(q, durable=False, arguments=args)
    assert (info.value.reply_code, info.value.reply_text) == (
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': "
        "received 'false' but current is 'true'",
    )
    conn.close()


# --------------------------------------------------------------------------- messages


def test_publish_get_body_and_all_properties_exact(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    sent = full_props()
    ch.basic_publish("", q, BODY, sent)
    ch.basic_publish("", q, b"", pika.BasicProperties())  # empty body, no properties
    m, got, body = get_one(ch, q)
    assert body == BODY
    assert props_dict(got) == props_dict(sent)
    assert (m.exchange, m.routing_key, m.redelivered, m.message_count) == ("", q, False, 1)
    m, got, body = get_one(ch, q)
    assert body == b""
    assert props_dict(got) == props_dict(pika.BasicProperties())
    conn.close()


def test_raw_content_header_bytes_pass_unchanged(proxy: Target, names: Names) -> None:
    """The content header's property bytes a client sends are the bytes a getter receives."""
    import pika as _pika

    q = names.queue()
    b = _pika.BlockingConnection(_pika.ConnectionParameters("127.0.0.1", 5672))
    b.channel().queue_declare(q)
    b.close()
    props = commands.Basic.Properties(
        content_type="a/b",
        headers={"k": "v", "n": 1, "t": {"x": [1, 2]}},
        delivery_mode=1,
        priority=9,
        message_id="raw-1",
        timestamp=datetime.datetime(2020, 5, 6, 7, 8, 9),
        app_id="raw",
    )
    body = b"raw body \x00\xce"
    with RawClient(proxy.host, proxy.port) as c:
        c.handshake()
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        hdr = header.ContentHeader(0, len(body), props)
        sent_hdr = frame.marshal(hdr, 1)
        c.send(commands.Basic.Publish(exchange="", routing_key=q), 1)
        c.send_raw(sent_hdr)
        c.send(pbody.ContentBody(body), 1)
        deadline = time.monotonic() + 5
        while True:
            c.send(commands.Basic.Get(queue=q, no_ack=True), 1)
            _, m = c.read_method()
            if isinstance(m, commands.Basic.GetOk):
                break
            assert isinstance(m, commands.Basic.GetEmpty), m
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # read the raw header frame
        c._fill(7)
        size = int.from_bytes(c.buf[3:7], "big")
        raw_hdr = c.read_exact(7 + size + 1)
        _, got_body = c.read_frame()
    # frame type, channel and size may differ only if the proxy renumbers the channel
    assert raw_hdr[0] == 2
    assert raw_hdr[7:] == sent_hdr[7:], "content header payload changed on the way"
    assert got_body.value == body


def test_publisher_confirms_1000(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(1000):
        ch.basic_publish("", q, f"c{i}".encode())  # raises unless acked
    assert queue_counts(q) == (1000, 0)
    bodies = [b for _, _, b in get_all(ch, q)]
    assert bodies == [f"c{i}".encode() for i in range(1000)]
    conn.close()


def test_publisher_nack_reaches_client(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, arguments={"x-max-length": 3, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", q, f"n{i}".encode())
    for i in range(3, 6):
        with pytest.raises(pika.exceptions.NackError):
            ch.basic_publish("", q, f"n{i}".encode())
    assert queue_counts(q) == (3, 0)
    conn.close()


def test_transactions_commit_and_rollback(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    ch.tx_select()
    for i in range(3):
        ch.basic_publish("", q, f"t{i}".encode())
    assert queue_counts(q) == (0, 0)
    ch.tx_commit()
    assert queue_counts(q) == (3, 0)
    ch.basic_publish("", q, b"rolled-back-1")
    ch.basic_publish("", q, b"rolled-back-2")
    ch.tx_rollback()
    assert queue_counts(q) == (3, 0)
    # acks are transactional too: a rolled-back ack leaves the message unacked
    m, _, b = ch.basic_get(q)
    assert b == b"t0"
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    assert queue_counts(q) == (2, 0)
    conn.close()  # the still-unacked t0 goes back
    wait_for(lambda: queue_counts(q) == (3, 0), what="t0 requeued")
    ch = proxy.connect().channel()
    got = get_all(ch, q)
    assert [(m.redelivered, b) for m, _, b in got] == [
        (True, b"t0"),
        (False, b"t1"),
        (False, b"t2"),
    ]
    ch.connection.close()


def test_consume_ack_nack_reject_with_prefetch(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    for i in range(10):
        ch.basic_publish("", q, f"m{i}".encode())
    ch.basic_qos(prefetch_count=3)
    got: list[tuple[bytes, bool, int]] = []

    def on_msg(_ch: Any, m: Any, _p: Any, b: bytes) -> None:
        got.append((b, m.redelivered, m.delivery_tag))

    ch.basic_consume(q, on_msg)
    drain(conn, lambda: len(got) >= 3, what="3 deliveries")
    conn.process_data_events(time_limit=0.5)  # give the broker a chance to overdeliver
    assert [(b, r) for b, r, _ in got] == [(b"m0", False), (b"m1", False), (b"m2", False)]

    ch.basic_ack(got[0][2])
    drain(conn, lambda: len(got) >= 4, what="a 4th delivery after ack")
    assert got[3][:2] == (b"m3", False)
    ch.basic_nack(got[1][2], requeue=True)
    drain(conn, lambda: len(got) >= 5, what="redelivery after nack")
    assert got[4][:2] == (b"m1", True)
    ch.basic_reject(got[2][2], requeue=False)
    drain(conn, lambda: len(got) >= 6, what="a delivery after reject")
    assert got[5][:2] == (b"m4", False)
    conn.process_data_events(time_limit=0.3)
    assert len(got) == 6
    conn.close()  # unacked m3, m1, m4 go back
    wait_for(lambda: queue_counts(q) == (8, 0), what="unacked messages requeued")
    ready = sorted(b for _, _, b in get_all(proxy.connect().channel(), q))
    assert ready == sorted([b"m1", b"m3", b"m4", b"m5", b"m6", b"m7", b"m8", b"m9"])


def test_basic_return_mandatory_unroutable(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    x = names.exchange()
    ch.exchange_declare(x, "direct")
    returns: list[tuple[Any, Any, bytes]] = []
    ch.add_on_return_callback(lambda _c, m, p, b: returns.append((m, p, b)))
    ch.basic_publish(x, "nowhere", BODY, pika.BasicProperties(message_id="ret-1"), mandatory=True)
    ch.basic_publish("", "itest-no-such-queue-here", b"second", mandatory=True)
    drain(conn, lambda: len(returns) == 2, what="two basic.return")
    (m1, p1, b1), (m2, _, b2) = returns
    assert (m1.reply_code, m1.reply_text, m1.exchange, m1.routing_key) == (
        312,
        "NO_ROUTE",
        x,
        "nowhere",
    )
    assert b1 == BODY and p1.message_id == "ret-1"
    assert (m2.reply_code, m2.reply_text, m2.exchange, m2.routing_key) == (
        312,
        "NO_ROUTE",
        "",
        "itest-no-such-queue-here",
    )
    assert b2 == b"second"
    conn.close()


def test_broker_sent_basic_cancel(
    proxy: Target, broker: pika.BlockingConnection, names: Names
) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    cancelled: list[Any] = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method))
    tag = ch.basic_consume(q, lambda *a: None, consumer_tag="itest-ctag-1")
    assert tag == "itest-ctag-1"
    broker.channel().queue_delete(q)
    drain(conn, lambda: bool(cancelled), what="broker basic.cancel")
    assert cancelled[0].consumer_tag == "itest-ctag-1"
    # the channel stays open and usable
    q2 = names.queue()
    ch.queue_declare(q2)
    ch.basic_publish("", q2, b"after cancel")
    assert get_one(ch, q2)[2] == b"after cancel"
    conn.close()


def test_basic_recover_requeue_redelivers(proxy: Target, names: Names) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    for i in range(3):
        ch.basic_publish("", q, f"r{i}".encode())
    got: list[tuple[bytes, bool]] = []
    ch.basic_consume(q, lambda _c, m, _p, b: got.append((b, m.redelivered)))
    drain(conn, lambda: len(got) == 3, what="3 deliveries")
    ch.basic_recover(requeue=True)
    drain(conn, lambda: len(got) == 6, what="3 redeliveries")
    assert got[:3] == [(b"r0", False), (b"r1", False), (b"r2", False)]
    assert sorted(got[3:]) == [(b"r0", True), (b"r1", True), (b"r2", True)]
    conn.close()


def test_direct_reply_to_rpc(proxy: Target, names: Names) -> None:
    server = proxy.connect()
    client = proxy.connect()
    sch = server.channel()
    rpc_q = names.queue("rpc")
    sch.queue_declare(rpc_q)

    def serve(ch: Any, m: Any, p: Any, b: bytes) -> None:
        assert p.reply_to.startswith("amq.rabbitmq.reply-to.")
        ch.basic_publish(
            "", p.reply_to, b"reply:" + b, pika.BasicProperties(correlation_id=p.correlation_id)
        )
        ch.basic_ack(m.delivery_tag)

    sch.basic_consume(rpc_q, serve)
    cch = client.channel()
    replies: list[tuple[str, bytes]] = []
    cch.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda _c, _m, p, b: replies.append((p.correlation_id, b)),
        auto_ack=True,
    )
    for i in range(5):
        cch.basic_publish(
            "",
            rpc_q,
            f"req{i}".encode(),
            pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=f"cid-{i}"),
        )
    deadline = time.monotonic() + 10
    while len(replies) < 5 and time.monotonic() < deadline:
        server.process_data_events(time_limit=0.02)
        client.process_data_events(time_limit=0.02)
    assert replies == [(f"cid-{i}", f"reply:req{i}".encode()) for i in range(5)]
    server.close()
    client.close()
