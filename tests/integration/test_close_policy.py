"""A client's close, and the upstream channel it leaves behind.

With close_policy = processed (the default) a client's Channel.Close or Connection.Close is
answered once the broker has processed what the client published on that channel, so the
client sees what it would see directly: the error of a publish that failed, and its messages
in the queue, in order, before it carries on. With local it is answered at once. Either way
a channel is handed to another client only once nothing its last client did can still close
it, so no client ever loses a message to another's error.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands, frame
from pamqp import header as pheader

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names, queue_counts
from tests.support.pika_client import get_all
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient
from tests.support.relay import Relay
from tests.support.targets import DirectTarget, ProxyFactory, Target
from tests.support.util import wait_for

from .test_php import php

POLICIES = ["processed", "local"]


def publish_frames(channel: int, exchange: str, routing_key: str, body: bytes) -> bytes:
    from pamqp import body as pbody

    data = frame.marshal(
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key), channel
    )
    hdr = pheader.ContentHeader(0, len(body), commands.Basic.Properties())
    data += frame.marshal(hdr, channel)
    return data + frame.marshal(pbody.ContentBody(body), channel)


def close(channel: int) -> bytes:
    return frame.marshal(commands.Channel.Close(200, "bye", 0, 0), channel)


def open_(channel: int) -> bytes:
    return frame.marshal(commands.Channel.Open(), channel)


def target(proxy_factory: ProxyFactory, policy: str, *options: str) -> Target:
    if policy == "direct":
        return DirectTarget()
    return proxy_factory("-t", "30", "--close-policy", policy, *options, direct_ok=False)


def declared_queue(names: Names) -> str:
    q = names.queue("close")
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    conn.channel().queue_declare(q)
    conn.close()
    return q


def drained(q: str) -> list[bytes]:
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    try:
        return [body for _, _, body in get_all(conn.channel(), q)]
    finally:
        conn.close()


@pytest.mark.parametrize("policy", ["direct", *POLICIES])
def test_a_reused_channel_keeps_the_next_clients_messages(
    proxy_factory: ProxyFactory, names: Names, policy: str
) -> None:
    """In one write: a publish to a missing exchange and the close of its channel, then a
    new channel (the upstream channel the proxy would like to reuse) and a good publish. The
    broker's Channel.Close for the first publish discards whatever follows on that upstream
    channel, so the proxy may hand the channel over only once it knows that close is not
    coming."""
    p = target(proxy_factory, policy)
    q = declared_queue(names)
    channel_one: Counter[tuple[str, int]] = Counter()
    for i in range(20):
        with RawClient(p.host, p.port) as c:
            assert "open_ok" in c.handshake()
            burst = open_(1) + publish_frames(1, f"itest-missing-{uuid.uuid4().hex}", "", b"x")
            burst += close(1) + open_(2) + publish_frames(2, "", q, f"must arrive {i}".encode())
            burst += close(2)
            c.send_raw(burst)
            done_one = done_two = False
            while not (done_one and done_two):
                ch, method = c.read_method()
                if ch == 1 and isinstance(method, commands.Channel.Close):
                    channel_one["Close", method.reply_code] += 1
                    c.send(commands.Channel.CloseOk(), 1)
                elif ch == 1 and isinstance(method, commands.Channel.CloseOk):
                    channel_one["CloseOk", 0] += 1
                    done_one = True
                elif ch == 2 and isinstance(method, commands.Channel.CloseOk):
                    done_two = True
    wait_for(lambda: queue_counts(q)[0] == 20, what="all 20 messages", timeout=10)
    assert drained(q) == [f"must arrive {i}".encode() for i in range(20)]
    if policy == "local":
        assert channel_one == {("CloseOk", 0): 20}  # the 404 comes too late: it is dropped
    else:
        # as directly: the broker's 404, then the answer to the client's own Close
        assert channel_one == {("Close", 404): 20, ("CloseOk", 0): 20}


@pytest.mark.parametrize("policy", POLICIES)
def test_a_request_after_a_failed_one_loses_nothing(
    proxy_factory: ProxyFactory, names: Names, policy: str
) -> None:
    """PHP-FPM: one request publishes to a missing exchange and disconnects, the next one
    (same credentials, so the same pool and, if safe, the same upstream channel) publishes
    at once."""
    p = target(proxy_factory, policy)
    q = declared_queue(names)
    for i in range(20):
        for exchange, body in ((f"itest-missing-{uuid.uuid4().hex}", b"lost"), ("", b"kept")):
            with RawClient(p.host, p.port) as c:
                assert "open_ok" in c.handshake()
                c.send_raw(
                    open_(1)
                    + publish_frames(1, exchange, q, body + str(i).encode())
                    + close(1)
                    + frame.marshal(commands.Connection.Close(200, "", 0, 0), 0)
                )
                while not isinstance(c.read_method()[1], commands.Connection.CloseOk):
                    pass
    wait_for(lambda: queue_counts(q)[0] == 20, what="all 20 messages", timeout=10)
    assert drained(q) == [f"kept{i}".encode() for i in range(20)]


def pika_publish_then_close(p: Target, close: str) -> tuple[str, Any]:
    conn = pika.BlockingConnection(pika.ConnectionParameters(p.host, p.port))
    ch = conn.channel()
    ch.basic_publish(f"itest-missing-{uuid.uuid4().hex[:8]}", "rk", b"x")
    try:
        if close == "channel":
            ch.close()
        conn.close()
    except pika.exceptions.ChannelClosedByBroker as exc:
        return type(exc).__name__, exc.reply_code
    return "", None


def php_publish_then_close(script: str, p: Target, close: str) -> tuple[str, Any]:
    exchange = f"itest-missing-{uuid.uuid4().hex[:8]}"
    out = php(script, p.host, str(p.port), "guest", "guest", "/", exchange, "rk", close)
    return (out["class"], out["code"]) if out["raised"] else ("", None)


CLIENTS = {
    "pika": pika_publish_then_close,
    "php-amqplib": lambda p, c: php_publish_then_close("amqplib_publish_then_close.php", p, c),
    "php-amqp": lambda p, c: php_publish_then_close("publish_then_close.php", p, c),
}


@pytest.mark.parametrize("policy", ["processed", "confirmed"])
@pytest.mark.parametrize("close", ["channel", "connection"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_failed_publish_is_reported_as_directly(
    proxy_factory: ProxyFactory, client: str, close: str, policy: str
) -> None:
    """Publish to a missing exchange and close at once. Directly, pika and php-amqplib raise
    the broker's 404 from the channel close (php-amqp 1.11 reports nothing either way); with
    close_policy processed or confirmed, so they do through the proxy. (With local the close may be
    answered before the 404 arrives: see test_a_reused_channel_keeps_the_next_clients_messages.)
    """
    run = CLIENTS[client]
    p = target(proxy_factory, policy)
    direct = run(DirectTarget(), close)
    assert direct == (("ChannelClosedByBroker" if client == "pika" else "PhpAmqpLib\\Exception"
                       "\\AMQPProtocolChannelException", 404) if close == "channel"
                      and client != "php-amqp" else ("", None))  # fmt: skip
    for _ in range(5):
        assert run(p, close) == direct


def test_sequential_connections_keep_their_order_across_two_workers(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """A php-amqp loop of connect/publish/disconnect: SO_REUSEPORT spreads the connections
    over both workers, each with its own upstream connection. Each CloseOk comes after the
    broker has the message, so the next connection's message cannot overtake it."""
    p = target(proxy_factory, "processed", "--workers", "2")
    for run in range(20):
        q = declared_queue(names)
        out = php("publish_loop.php", p.host, str(p.port), "guest", "guest", "/", q, "200")
        assert out["_rc"] == 0 and out["published"] == 200, out
        # every message is in the queue already: each CloseOk waited for the broker
        assert queue_counts(q)[0] == 200
        assert drained(q) == [f"msg-{i:04d}".encode() for i in range(200)], f"run {run}"
    if isinstance(p, ProxyProcess):
        assert len(p.upstream_local_ports()) == 2  # both workers took part


def proxy_behind_relay(proxy_factory: ProxyFactory, relay: Relay, policy: str) -> ProxyProcess:
    p = proxy_factory(
        "-t", "30", "--close-policy", policy,
        upstream=f"amqp://127.0.0.1:{relay.port}", upstream_port=relay.port, direct_ok=False,
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    return p


def answered_within(c: RawClient, seconds: float) -> Any:
    """The next method from the proxy, or None when none comes within `seconds`."""
    c.sock.settimeout(seconds)
    try:
        return c.read_method()[1]
    except TimeoutError:
        return None
    finally:
        c.sock.settimeout(10)


@pytest.mark.parametrize("policy", POLICIES)
def test_only_a_channel_that_published_waits_for_the_broker(
    proxy_factory: ProxyFactory, names: Names, policy: str
) -> None:
    q = declared_queue(names)
    with Relay() as relay:
        p = proxy_behind_relay(proxy_factory, relay, policy)
        with RawClient(p.host, p.port) as c:
            assert "open_ok" in c.handshake()
            c.send_raw(open_(1) + open_(2))
            assert [type(c.read_method()[1]) for _ in range(2)] == [commands.Channel.OpenOk] * 2
            time.sleep(0.2)  # the upstream channels are open: nothing from the broker is due
            relay.hold()
            c.send(commands.Basic.Qos(prefetch_count=5), 1)
            assert isinstance(answered_within(c, 5), commands.Basic.QosOk)
            c.send_raw(close(1))  # it published nothing: nothing to wait for
            assert isinstance(answered_within(c, 5), commands.Channel.CloseOk)
            c.send_raw(publish_frames(2, "", q, b"waits") + close(2))
            if policy == "processed":
                assert answered_within(c, 1.0) is None, "answered before the broker could"
                relay.release()
            assert isinstance(answered_within(c, 5), commands.Channel.CloseOk)
            relay.release()
            c.send(commands.Connection.Close(200, "", 0, 0))
            assert isinstance(answered_within(c, 5), commands.Connection.CloseOk)
            if policy == "processed":
                assert queue_counts(q)[0] == 1
            else:  # (with local, losing the upstream connection now would lose it)
                wait_for(lambda: queue_counts(q)[0] == 1, what="the message")
    assert drained(q) == [b"waits"]


@pytest.mark.parametrize("policy", POLICIES)
def test_connection_close_waits_for_the_publishes_of_every_channel(
    proxy_factory: ProxyFactory, names: Names, policy: str
) -> None:
    q = declared_queue(names)
    with Relay() as relay:
        p = proxy_behind_relay(proxy_factory, relay, policy)
        with RawClient(p.host, p.port) as c:
            assert "open_ok" in c.handshake()
            c.send_raw(open_(1) + open_(2) + open_(3))
            assert [type(c.read_method()[1]) for _ in range(3)] == [commands.Channel.OpenOk] * 3
            time.sleep(0.2)
            relay.hold()
            # channel 2 consumes (not reusable: closed upstream), 3 only publishes
            c.send(commands.Basic.Consume(queue=q, consumer_tag="c"), 2)
            c.send_raw(publish_frames(1, "", q, b"one") + publish_frames(3, "", q, b"three"))
            c.send(commands.Connection.Close(200, "", 0, 0))
            if policy == "processed":
                assert answered_within(c, 1.0) is None, "answered before the broker could"
                relay.release()
            got = [answered_within(c, 5)]
            while not isinstance(got[-1], commands.Connection.CloseOk | None):
                got.append(answered_within(c, 5))
            assert isinstance(got[-1], commands.Connection.CloseOk), got
            if policy == "processed":
                # a client discards all but CloseOk now: no deliveries (the broker would not
                # send them either)
                assert all(isinstance(m, commands.Basic.ConsumeOk) for m in got[:-1]), got
                assert queue_counts(q)[0] == 2
            else:  # (with local, losing the upstream connection now would lose them)
                relay.release()
                wait_for(lambda: queue_counts(q)[0] == 2, what="both messages")
    assert sorted(drained(q)) == [b"one", b"three"]


def test_a_close_that_waits_is_told_when_the_upstream_connection_dies(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """The client was not told its messages are safe: it gets 320, not CloseOk."""
    q = declared_queue(names)
    with Relay() as relay:
        p = proxy_behind_relay(proxy_factory, relay, "processed")
        with RawClient(p.host, p.port) as c:
            assert "open_ok" in c.handshake()
            c.send_raw(open_(1))
            assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
            time.sleep(0.2)
            relay.hold()
            c.send_raw(publish_frames(1, "", q, b"in flight") + close(1))
            assert answered_within(c, 0.5) is None
            relay.close()  # the upstream connection is lost
            got = answered_within(c, 10)
            assert isinstance(got, commands.Connection.Close), got
            assert got.reply_code == 320


def test_php_amqp_and_pika_see_their_messages_once_closed(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """What "closed" means by default: the message is in the queue when the close returns."""
    p = target(proxy_factory, "processed")
    q = declared_queue(names)
    for i in range(50):
        conn = pika.BlockingConnection(pika.ConnectionParameters(p.host, p.port))
        conn.channel().basic_publish("", q, f"pika-{i}".encode())
        conn.close()
        assert queue_counts(q)[0] == i + 1
    out = php("publish_loop.php", p.host, str(p.port), "guest", "guest", "/", q, "50")
    assert out["published"] == 50 and queue_counts(q)[0] == 100


@pytest.fixture(scope="module", autouse=True)
def php_available() -> None:
    res = subprocess.run(["php", "-m"], capture_output=True, text=True)
    assert "amqp" in res.stdout.split(), "the PHP amqp extension is missing"


def test_every_message_of_a_clean_close_survives_upstream_failures(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """pika clients connect, publish and close in a loop while the broker closes the proxy's
    upstream connections again and again. A message whose client's close returned cleanly
    was processed by the broker: it is in the queue. (The others' clients were told, with
    Connection.Close 320.)"""
    import threading

    from tests.support.broker import close_broker_connections

    p = target(proxy_factory, "processed")
    assert isinstance(p, ProxyProcess)
    q = declared_queue(names)
    confirmed: list[bytes] = []
    failures = [0]
    stop = threading.Event()

    def loop(n: int) -> None:
        i = 0
        while not stop.is_set():
            body = f"{n}-{i}".encode()
            i += 1
            try:
                conn = pika.BlockingConnection(p.params())
                conn.channel().basic_publish("", q, body)
                conn.close()
            except pika.exceptions.AMQPError:
                failures[0] += 1
                continue
            confirmed.append(body)

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    kills = 0
    deadline = time.monotonic() + 30
    while kills < 8 and time.monotonic() < deadline:
        time.sleep(0.7)
        kills += close_broker_connections(p.upstream_local_ports(), "itest: upstream failure")
    stop.set()
    for t in threads:
        t.join(10)
    assert kills >= 8 and len(confirmed) > 500, (kills, len(confirmed))
    wait_for(lambda: queue_counts(q)[0] >= len(confirmed), timeout=10, what="the messages")
    stored = set(drained(q))
    missing = [body for body in confirmed if body not in stored]
    assert missing == [], f"{len(missing)} of {len(confirmed)} lost ({failures[0]} told)"
