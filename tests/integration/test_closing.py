"""Closing in both directions: client Channel.Close / Connection.Close / TCP drop, broker
Channel.Close and Connection.Close, reaching exactly the affected clients."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import Aux, Names, close_broker_connection, list_connections, queue_counts
from tests.support.pika_client import drain, get_all
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory, Target
from tests.support.util import wait_for


def roundtrip(ch: Any, q: str, body: bytes) -> None:
    ch.basic_publish("", q, body)
    deadline = time.monotonic() + 5
    while True:
        m, _, b = ch.basic_get(q, auto_ack=True)
        if m is not None:
            assert b == body
            return
        assert time.monotonic() < deadline, f"{body!r} never arrived in {q}"
        time.sleep(0.02)


def expect_connection_closed(conn: pika.BlockingConnection, timeout: float = 10) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
    except pika.exceptions.ConnectionClosedByBroker as exc:
        return exc.reply_code, exc.reply_text
    raise AssertionError(f"connection not closed by the server within {timeout}s")


def test_channel_close_then_new_channel(proxy: Target, names: Names) -> None:
    q = names.queue()
    conn = proxy.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    first_number = ch.channel_number
    ch.close()
    ch2 = conn.channel()
    assert ch2.channel_number == first_number  # pika reuses the number: the proxy must too
    roundtrip(ch2, q, b"on the new channel")
    conn.close()


def test_raw_channel_number_reuse_rapidly(proxy: Target, names: Names) -> None:
    q = names.queue()
    with RawClient(proxy.host, proxy.port) as c:
        assert "open_ok" in c.handshake()
        for i in range(30):
            c.send(commands.Channel.Open(), 1)
            assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
            c.send(commands.Queue.Declare(queue=q), 1)
            ch, m = c.read_method()
            assert ch == 1 and isinstance(m, commands.Queue.DeclareOk), (i, m)
            assert m.message_count == i
            c.publish(1, "", q, f"reuse-{i}".encode())
            c.send(commands.Channel.Close(200, "done", 0, 0), 1)
            ch, m = c.read_method()
            assert (ch, type(m)) == (1, commands.Channel.CloseOk), (i, m)
        c.send(commands.Connection.Close(200, "bye", 0, 0))
        assert isinstance(c.read_method()[1], commands.Connection.CloseOk)
    assert queue_counts(q) == (30, 0)


def test_connection_close_is_clean_and_frees_channels(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    # -t 1: safe channels are parked for reuse, then closed after the idle timeout
    p = proxy_factory("-t", "1")
    q = names.queue()
    conn = p.connect()
    chans = [conn.channel() for _ in range(3)]
    chans[0].queue_declare(q)
    for i, ch in enumerate(chans):
        roundtrip(ch, q, f"c{i}".encode())
    chans[1].basic_consume(q, lambda *a: None)
    conn.close()  # raises if the close handshake fails
    assert conn.is_closed
    assert wait_for(lambda: queue_counts(q)[1] == 0, what="consumer gone")
    if isinstance(p, ProxyProcess):
        rows = p.wait_upstream_count(1)
        wait_for(
            lambda: all(r["channels"] == 0 for r in p.upstream_connections()),
            what="upstream channels of the closed client closed",
        )
        assert rows[0]["user"] == "guest"


CONSUMER = textwrap.dedent(
    """
    import sys, pika
    host, port, q = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    c = pika.BlockingConnection(pika.ConnectionParameters(host, port))
    ch = c.channel()
    ch.basic_qos(prefetch_count=5)
    n = 0
    def on_msg(_ch, m, p, b):
        global n
        n += 1
        if n == 5:
            print("got 5", flush=True)
    ch.basic_consume(q, on_msg)
    ch.start_consuming()
    """
)


def test_killed_consumer_messages_requeued(proxy_factory: ProxyFactory, names: Names) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue("killed")
    b = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    bch = b.channel()
    bch.queue_declare(q)
    for i in range(10):
        bch.basic_publish("", q, f"k{i}".encode())
    b.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, p.host, str(p.port), q],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "got 5", proc.stderr.read() if proc.poll() is not None else line
        assert queue_counts(q) == (5, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(
        lambda: queue_counts(q) == (10, 0),
        timeout=10,
        what="all 10 messages ready again and no consumer",
    )
    if isinstance(p, ProxyProcess):
        # the killed client's upstream channel is closed on the broker
        wait_for(
            lambda: [r["channels"] for r in p.upstream_connections()] == [0],
            what="upstream channel of the killed client closed",
        )
    conn = p.connect()
    ch = conn.channel()
    got: list[tuple[bytes, bool]] = []
    ch.basic_consume(q, lambda _c, m, _p, body: got.append((body, m.redelivered)), auto_ack=True)
    drain(conn, lambda: len(got) == 10, what="10 messages for the second consumer")
    assert sorted(got) == sorted([(f"k{i}".encode(), i < 5) for i in range(10)])
    conn.close()


def test_broker_channel_close_reaches_only_that_channel(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue()
    a = p.connect()
    b = p.connect()
    a_ok = a.channel()
    a_bad = a.channel()
    bch = b.channel()
    bch.queue_declare(q)
    received: list[bytes] = []
    bch.basic_consume(q, lambda _c, _m, _p, body: received.append(body), auto_ack=True)
    if isinstance(p, ProxyProcess):
        p.wait_upstream_count(1)  # a and b share one upstream connection
    missing = f"itest-missing-x-{uuid.uuid4().hex[:8]}"
    a_bad.basic_publish(missing, "rk", b"to nowhere")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        a_bad.queue_declare(q, passive=True)
    assert (info.value.reply_code, info.value.reply_text) == (
        404,
        f"NOT_FOUND - no exchange '{missing}' in vhost '/'",
    )
    # b on the same upstream connection is unaffected
    for i in range(50):
        bch.basic_publish("", q, f"b{i}".encode())
    drain(b, lambda: len(received) == 50, what="b's 50 messages")
    assert received == [f"b{i}".encode() for i in range(50)]
    # a's other channel and a new channel of a work
    a_ok.basic_publish("", q, b"from a_ok")
    a.channel().basic_publish("", q, b"from a's new channel")
    drain(b, lambda: len(received) == 52, what="a's messages")
    assert received[50:] == [b"from a_ok", b"from a's new channel"]
    a.close()
    b.close()


def test_raw_frames_after_broker_channel_close_are_dropped(proxy: Target, names: Names) -> None:
    """A client that keeps sending on a channel the broker closed loses nothing else."""
    q = names.queue()
    missing = f"itest-missing-x-{uuid.uuid4().hex[:8]}"
    with RawClient(proxy.host, proxy.port) as c:
        assert "open_ok" in c.handshake()
        for ch in (1, 2):
            c.send(commands.Channel.Open(), ch)
            got_ch, m = c.read_method()
            assert got_ch == ch and isinstance(m, commands.Channel.OpenOk), m
        c.send(commands.Queue.Declare(queue=q), 2)
        assert isinstance(c.read_method()[1], commands.Queue.DeclareOk)
        for i in range(20):  # publishes pile up on channel 1 before the broker's close lands
            c.publish(1, missing, "rk", f"x{i}".encode())
        ch, m = c.read_method()
        assert ch == 1 and isinstance(m, commands.Channel.Close), m
        assert (m.reply_code, m.reply_text) == (
            404,
            f"NOT_FOUND - no exchange '{missing}' in vhost '/'",
        )
        assert (m.class_id, m.method_id) == (60, 40)
        c.publish(1, missing, "rk", b"after close")  # ignored until CloseOk
        c.send(commands.Channel.CloseOk(), 1)
        c.publish(2, "", q, b"on channel 2")
        c.send(commands.Channel.Open(), 1)
        ch, m = c.read_method()
        assert (ch, type(m)) == (1, commands.Channel.OpenOk), m
        c.publish(1, "", q, b"on reopened channel 1")
        c.send(commands.Queue.Declare(queue=q, passive=True), 1)
        ch, m = c.read_method()
        assert ch == 1 and isinstance(m, commands.Queue.DeclareOk), m
        c.send(commands.Connection.Close(200, "bye", 0, 0))
        assert isinstance(c.read_method()[1], commands.Connection.CloseOk)
    got = [
        b
        for _, _, b in get_all(
            pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672)).channel(), q
        )
    ]
    assert got == [b"on channel 2", b"on reopened channel 1"]


def test_broker_connection_close_reaches_exactly_affected_clients(
    proxy_factory: ProxyFactory, aux: Aux, names: Names
) -> None:
    p = proxy_factory("-t", "30")
    tag = uuid.uuid4().hex[:8]
    q_root, q_vh = names.queue(), names.queue(vhost=aux.vhost)

    def client(name: str, user: str, password: str, vhost: str) -> pika.BlockingConnection:
        return p.connect(
            user, password, vhost, client_properties={"connection_name": f"itest-{name}-{tag}"}
        )

    a = client("A", "guest", "guest", "/")
    b = client("B", "guest", "guest", "/")
    c = client("C", aux.user, aux.password, "/")
    d = client("D", "guest", "guest", aux.vhost)
    ach, bch, cch, dch = a.channel(), b.channel(), c.channel(), d.channel()
    ach.queue_declare(q_root)
    consumed = names.queue()
    ach.queue_declare(consumed)
    ach.basic_consume(consumed, lambda *_: None)  # (a consumer cannot move)
    dch.queue_declare(q_vh)
    roundtrip(bch, q_root, b"b before")
    roundtrip(cch, q_root, b"c before")
    roundtrip(dch, q_vh, b"d before")

    if isinstance(p, ProxyProcess):
        rows = p.wait_upstream_count(3)
        targets = [r for r in rows if (r["user"], r["vhost"]) == ("guest", "/")]
        assert len(targets) == 1, rows
    else:
        wanted = {f"itest-A-{tag}", f"itest-B-{tag}"}
        targets = [
            r for r in list_connections() if r["client_properties"].get("connection_name") in wanted
        ]
        assert len(targets) == 2
    for row in targets:
        close_broker_connection(row["peer_port"], "test reason")

    assert expect_connection_closed(a) == (320, "CONNECTION_FORCED - test reason")
    if isinstance(p, ProxyProcess):
        # B only published and got: it goes on through a new upstream connection, unaware
        roundtrip(bch, q_root, b"b after")
        b.close()
    else:
        assert expect_connection_closed(b) == (320, "CONNECTION_FORCED - test reason")
    # the clients on other upstream connections are unaffected
    c.process_data_events(time_limit=0.2)
    d.process_data_events(time_limit=0.2)
    assert c.is_open and d.is_open
    roundtrip(cch, q_root, b"c after")
    roundtrip(dch, q_vh, b"d after")
    # a new guest client gets a fresh upstream connection
    e = client("E", "guest", "guest", "/")
    roundtrip(e.channel(), q_root, b"e after")
    for conn in (c, d, e):
        conn.close()
