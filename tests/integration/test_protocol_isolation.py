"""A misbehaving client is closed alone: clients sharing its upstream connection go on."""

from __future__ import annotations

import socket
import time
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import body, commands, frame, header

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names, queue_counts
from tests.support.pika_client import drain, get_all
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory, Target
from tests.support.util import wait_for


def test_client_dying_mid_message_publishes_nothing(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("-t", "60")
    q = names.queue("halfmsg")
    other = p.connect()
    och = other.channel()
    och.queue_declare(q)
    for cut in ("after-method", "after-header", "mid-body"):
        c = RawClient(p.host, p.port)
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        data = frame.marshal(commands.Basic.Publish(exchange="", routing_key=q), 1)
        if cut != "after-method":
            data += frame.marshal(header.ContentHeader(0, 100, commands.Basic.Properties()), 1)
        if cut == "mid-body":
            data += frame.marshal(body.ContentBody(b"h" * 50), 1)
        c.send_raw(data)
        c.close()
        och.basic_publish("", q, f"complete-{cut}".encode())
    time.sleep(0.3)  # let anything that would wrongly be published arrive
    got = [b for _, _, b in get_all(och, q)]
    assert got == [b"complete-after-method", b"complete-after-header", b"complete-mid-body"]
    other.close()


def passive_code(name: str) -> int:
    """200 if the queue exists and is accessible, else the broker's channel close code
    (404 missing, 405 exclusive to another connection)."""
    try:
        queue_counts(name)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    return 200


def test_exclusive_queue_deleted_when_client_leaves(proxy: Target) -> None:
    conn = proxy.connect()
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    named = f"itest-excl-{time.monotonic_ns()}"
    ch.queue_declare(named, exclusive=True)
    assert passive_code(q) == passive_code(named) == 405  # exists, owned by another connection
    conn.close()
    wait_for(
        lambda: passive_code(q) == passive_code(named) == 404,
        timeout=5,
        what="exclusive queues deleted",
    )


def test_exclusive_queue_deleted_when_client_drops(proxy: Target) -> None:
    c = RawClient(proxy.host, proxy.port)
    assert "open_ok" in c.handshake()
    c.send(commands.Channel.Open(), 1)
    assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
    c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
    _, ok = c.read_method()
    assert isinstance(ok, commands.Queue.DeclareOk)
    assert passive_code(ok.queue) == 405
    c.close()
    wait_for(
        lambda: passive_code(ok.queue) == 404,
        timeout=5,
        what="exclusive queue of a dropped client deleted",
    )


@pytest.mark.parametrize("scenario", ["consume", "get"])
def test_unacked_of_closed_channel_requeued_others_unaffected(
    proxy: Target, names: Any, scenario: str
) -> None:
    q = names.queue("unacked")
    b = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    bch = b.channel()
    bch.queue_declare(q)
    for i in range(4):
        bch.basic_publish("", q, f"u{i}".encode())
    wait_for(lambda: queue_counts(q) == (4, 0), what="4 messages enqueued")
    conn = proxy.connect()
    ch = conn.channel()
    if scenario == "consume":
        got: list[bytes] = []
        ch.basic_qos(prefetch_count=2)
        ch.basic_consume(q, lambda _c, _m, _p, body: got.append(body))
        drain(conn, lambda: len(got) == 2, what="2 deliveries")
    else:
        assert ch.basic_get(q)[2] == b"u0"
        assert ch.basic_get(q)[2] == b"u1"
    ch.close()  # the unacked two go back to the queue; the connection stays
    wait_for(lambda: queue_counts(q) == (4, 0), what="unacked messages requeued")
    ch2 = conn.channel()
    assert sorted(body for _, _, body in get_all(ch2, q)) == [b"u0", b"u1", b"u2", b"u3"]
    conn.close()
    b.close()


def test_slow_client_does_not_stall_others(proxy_factory: ProxyFactory, names: Names) -> None:
    """A consumer that stops reading its socket must not stall the clients sharing its
    upstream connection; the proxy bounds what it buffers for it and drops it."""
    p = proxy_factory("-t", "60")
    q_slow, q_fast = names.queue("slow"), names.queue("fast")
    b = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    bch = b.channel()
    bch.queue_declare(q_slow)
    chunk = b"s" * (1024 * 1024)
    for _ in range(128):  # 128 MiB waiting for the slow consumer
        bch.basic_publish("", q_slow, chunk)
    b.close()
    fast = p.connect()
    fch = fast.channel()
    fch.queue_declare(q_fast)
    slow = RawClient(p.host, p.port)
    try:
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert "open_ok" in slow.handshake()
        slow.send(commands.Channel.Open(), 1)
        assert isinstance(slow.read_method()[1], commands.Channel.OpenOk)
        slow.send(commands.Basic.Consume(queue=q_slow, no_ack=True), 1)
        # ... and never read again. Meanwhile the other client goes on:
        t0 = time.monotonic()
        for i in range(20):
            fch.basic_publish("", q_fast, f"fast-{i}".encode())
            deadline = time.monotonic() + 5
            while True:
                m, _, body = fch.basic_get(q_fast, auto_ack=True)
                if m is not None:
                    break
                assert time.monotonic() < deadline, f"fast client stalled at message {i}"
                time.sleep(0.01)
            assert body == f"fast-{i}".encode()
        assert time.monotonic() - t0 < 15
        if isinstance(p, ProxyProcess):
            # the proxy gave up on the slow client: its consumer is gone upstream
            wait_for(
                lambda: queue_counts(q_slow)[1] == 0,
                timeout=20,
                what="the slow consumer to be dropped",
            )
    finally:
        slow.close()
        fast.close()
