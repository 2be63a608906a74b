"""Publishes survive the upstream connection: the proxy confirms them upstream itself.

Every upstream channel that carries a publish runs in confirm mode, selected by the proxy;
what the broker has not confirmed when its connection ends is published again through
another one. A client that selected confirms gets the broker's answers under its own
sequence numbers; a nack of a message whose client did not is counted and logged.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator

import pika
import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names, queue_counts
from tests.support.pika_client import get_all
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import http_request, metric_sample
from tests.support.raw_client import RawClient
from tests.support.relay import Relay
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for

from .test_close_policy import answered_within, open_, publish_frames


def direct() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))


def declared(names: Names, name: str, **arguments: object) -> str:
    q = names.queue(name)
    conn = direct()
    conn.channel().queue_declare(q, arguments=arguments or None)
    conn.close()
    return q


def drained(q: str) -> list[bytes]:
    conn = direct()
    try:
        return [body for _, _, body in get_all(conn.channel(), q)]
    finally:
        conn.close()


def counted(p: ProxyProcess, name: str, value: float) -> None:
    """Wait for a metric to read `value` (workers export about once a second)."""
    wait_for(lambda: metric_sample(p.http_port, name) == value, what=f"{name} == {value}")


def behind_relay(proxy_factory: ProxyFactory, relay: Relay, *options: str) -> ProxyProcess:
    p = proxy_factory(
        "-t", "30", "--workers", "1", *options,
        upstream=f"amqp://127.0.0.1:{relay.port}", upstream_port=relay.port, direct_ok=False,
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    return p


def test_what_the_broker_never_got_is_sent_again_once_its_connection_is_lost(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """close_policy local: the clients were told at once, and their messages were still on
    their way when the upstream connection died. None is lost, and each channel's come in
    order."""
    q = declared(names, "resend")
    with Relay() as relay:
        p = behind_relay(proxy_factory, relay, "--close-policy", "local")
        warm = p.connect()  # the upstream connection and a parked channel
        warm.channel().basic_publish("", q, b"warm")
        warm.close()
        wait_for(lambda: queue_counts(q)[0] == 1, what="the first message")
        relay.hold(to_broker=True)
        for client in range(3):
            conn = p.connect()
            ch = conn.channel()
            for i in range(20):
                ch.basic_publish("", q, f"{client}-{i}".encode())
            conn.close()  # CloseOk at once (local)
        time.sleep(0.3)
        assert queue_counts(q)[0] == 1  # the broker has none of them
        relay.cut()  # the upstream connection is lost with them
        wait_for(lambda: queue_counts(q)[0] == 61, timeout=15, what="the messages again")
        counted(p, "amqproxy_messages_resent_total", 60)
    got = drained(q)
    assert got[0] == b"warm" and sorted(got[1:]) == sorted(
        f"{c}-{i}".encode() for c in range(3) for i in range(20)
    )
    for client in range(3):
        mine = [body for body in got if body.startswith(f"{client}-".encode())]
        assert mine == [f"{client}-{i}".encode() for i in range(20)]
    assert p.wait_log(r"ended with 60 messages unconfirmed: sending them again")


def test_a_client_that_cannot_move_is_closed_but_its_message_is_sent_again(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """A confirming client that also consumes (its consumer cannot move) when its publish is
    unconfirmed and the connection dies: it gets 320, as before, and the message is there
    once (the broker never had the first copy)."""
    q = declared(names, "resend-confirm")
    with Relay() as relay:
        p = behind_relay(proxy_factory, relay)
        conn = p.connect()
        conn.channel().basic_consume(declared(names, "consumed"), lambda *_: None)
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, b"before")
        relay.hold(to_broker=True)
        failed: list[BaseException] = []

        def publish() -> None:
            try:
                ch.basic_publish("", q, b"cut off")
            except BaseException as exc:  # (any of pika's)
                failed.append(exc)

        t = threading.Thread(target=publish, daemon=True)
        t.start()
        time.sleep(0.3)
        relay.cut()
        t.join(10)
        assert failed and isinstance(failed[0], pika.exceptions.AMQPError), failed
        wait_for(lambda: queue_counts(q)[0] == 2, timeout=15, what="the message again")
    assert drained(q) == [b"before", b"cut off"]


def test_a_client_gets_confirms_under_its_own_numbers_on_a_reused_channel(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """The first client's publishes were numbered upstream too (the proxy confirms them):
    the next client on the same upstream channel counts from 1, as on a channel of its own,
    and its channel, only published on, is reused after it."""
    q = declared(names, "own-numbers")
    p = proxy_factory("-t", "30", "--workers", "1")
    first = p.connect()
    ch = first.channel()
    for i in range(3):
        ch.basic_publish("", q, f"first-{i}".encode())
    first.close()
    for client in range(2):
        with RawClient(p.host, p.port) as c:
            assert "open_ok" in c.handshake()
            c.send_raw(open_(1))
            assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
            c.send(commands.Confirm.Select(), 1)
            assert isinstance(c.read_method()[1], commands.Confirm.SelectOk)
            c.send_raw(
                b"".join(publish_frames(1, "", q, f"{client}-{i}".encode()) for i in range(4))
            )
            acked: set[int] = set()
            while acked != {1, 2, 3, 4}:
                got = answered_within(c, 5)
                assert isinstance(got, commands.Basic.Ack), got
                assert 1 <= got.delivery_tag <= 4 and got.delivery_tag not in acked, got
                start = 1 if got.multiple else got.delivery_tag
                acked |= {t for t in range(start, got.delivery_tag + 1)}
            c.send(commands.Connection.Close(200, "", 0, 0))
            assert isinstance(answered_within(c, 5), commands.Connection.CloseOk)
    counted(p, "amqproxy_channels_reused_total", 2)
    counted(p, "amqproxy_upstream_channel_opens_total", 1)
    assert queue_counts(q)[0] == 11


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_a_nack_goes_to_a_confirming_client_and_is_counted_for_others(
    proxy_factory: ProxyFactory, names: Names, via: str
) -> None:
    """A queue that refuses what is over its length (reject-publish): a confirming client
    sees the nack as it would directly; for one that does not confirm, the proxy counts it
    and logs where it went (the broker refused it: it is not sent again)."""
    q = declared(names, "nack", **{"x-max-length": 1, "x-overflow": "reject-publish"})
    p = proxy_factory("-t", "30", "--workers", "1")
    target = direct if via == "direct" else p.connect
    conn = target()
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, b"fits")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", q, b"refused")
    conn.close()
    if via == "proxy":
        conn = p.connect()
        conn.channel().basic_publish("", q, b"refused, unconfirmed")
        conn.close()
        counted(p, "amqproxy_messages_nacked_total", 2)
        assert p.wait_log(
            r"refused \(nack\) 1 message\(s\) .* the last to exchange '', routing key '" + q
        )
        assert metric_sample(p.http_port, "amqproxy_messages_resent_total") == 0
    assert drained(q) == [b"fits"]


def test_a_channel_that_published_can_select_tx(proxy_factory: ProxyFactory, names: Names) -> None:
    """RabbitMQ refuses Tx.Select on a channel in confirm mode, which the proxy's upstream
    channel is once it carried a publish: the client's channel moves to another upstream
    channel, with its prefetch, and works as directly."""
    q = declared(names, "tx-after-publish")
    p = proxy_factory("-t", "30", "--workers", "1")
    conn = p.connect()
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)
    ch.queue_declare(q, passive=True)
    ch.basic_publish("", q, b"before")
    ch.tx_select()
    ch.basic_publish("", q, b"rolled back")
    ch.tx_rollback()
    ch.basic_publish("", q, b"committed")
    ch.tx_commit()
    ch.basic_consume(q, lambda *_: None)
    conn.process_data_events(0.5)
    conn.close()
    assert drained(q) == [b"before", b"committed"]


def test_a_publishing_client_goes_on_through_a_new_connection_unaware(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """Three clients that only publish (one with confirms, one closing its connection and
    waiting for the answer) when their upstream connection is lost: each goes on through a
    new one without an error, what the broker never got is published there first, and every
    message is there once, in each client's order."""
    q = declared(names, "moved")
    with Relay() as relay:
        p = behind_relay(proxy_factory, relay)
        plain, confirming, closing = (p.connect() for _ in range(3))
        channels = [conn.channel() for conn in (plain, confirming, closing)]
        channels[1].confirm_delivery()
        for i in range(5):
            for n, ch in enumerate(channels):
                ch.basic_publish("", q, f"{n}-{i}".encode())
        relay.hold(to_broker=True)
        for i in range(5, 10):
            channels[0].basic_publish("", q, f"0-{i}".encode())
            channels[2].basic_publish("", q, f"2-{i}".encode())
        confirmed: list[BaseException | None] = []
        closed: list[BaseException | None] = []

        def run(results: list[BaseException | None], step: Callable[[], None]) -> None:
            try:
                step()
                results.append(None)
            except BaseException as exc:  # (any of pika's)
                results.append(exc)

        threads = [
            threading.Thread(
                target=run,
                args=(confirmed, lambda: channels[1].basic_publish("", q, b"1-5")),
                daemon=True,
            ),
            threading.Thread(target=run, args=(closed, closing.close), daemon=True),
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert not confirmed and not closed  # (the broker has not answered)
        relay.cut()
        for t in threads:
            t.join(15)
        assert confirmed == [None] and closed == [None]
        for i in range(10, 15):
            channels[0].basic_publish("", q, f"0-{i}".encode())
        channels[1].basic_publish("", q, b"1-6")
        plain.close()
        confirming.close()
        counted(p, "amqproxy_clients_moved_total", 3)
        assert p.wait_log(r"client .* moved from .* to .* with 1 channels")
    got = drained(q)
    expected = {0: 15, 1: 7, 2: 10}
    assert len(got) == sum(expected.values()), got
    for n, count in expected.items():
        assert [b for b in got if b.startswith(f"{n}-".encode())] == [
            f"{n}-{i}".encode() for i in range(count)
        ]


def test_a_resend_that_fails_costs_only_its_own_channels_messages(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """Two clients' unconfirmed messages when the connection is lost: one client's exchange
    is deleted before they are sent again (its publish now fails with 404), the other's
    messages still arrive, each channel's being sent again on a channel of its own."""
    q = declared(names, "resend-own-channel")
    exchange = names.exchange("resend-gone")
    setup = direct()
    setup.channel().exchange_declare(exchange, "fanout")
    setup.channel().queue_bind(q, exchange)
    with Relay() as relay:
        p = behind_relay(proxy_factory, relay, "--close-policy", "local")
        doomed, kept = p.connect(), p.connect()
        doomed_ch, kept_ch = doomed.channel(), kept.channel()
        doomed_ch.basic_consume(declared(names, "pin"), lambda *_: None)  # (closed, not moved)
        kept_ch.basic_consume(declared(names, "pin2"), lambda *_: None)
        time.sleep(0.2)
        relay.hold(to_broker=True)
        doomed_ch.basic_publish(exchange, "", b"to a deleted exchange")
        for i in range(5):
            kept_ch.basic_publish("", q, f"kept-{i}".encode())
        time.sleep(0.3)
        setup.channel().exchange_delete(exchange)
        relay.cut()
        wait_for(lambda: queue_counts(q)[0] == 5, timeout=15, what="the other client's messages")
    setup.close()
    assert drained(q) == [f"kept-{i}".encode() for i in range(5)]


def test_tx_select_on_a_reused_channel_after_a_cancel_and_an_ack(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """A parked channel is in the proxy's confirm mode (its last client published). The next
    client cancels an unknown consumer tag and selects tx: neither leaves state on the
    channel, so it moves to a fresh upstream channel and gets Tx.SelectOk, as directly
    (found by the differential harness, seed 242)."""
    q = declared(names, "tx-reused")
    p = proxy_factory("-t", "30", "--workers", "1")
    first = p.connect()
    first.channel().basic_publish("", q, b"first")
    first.close()
    conn = p.connect()
    ch = conn.channel()
    ch.basic_cancel("no-such-tag")
    ch.tx_select()
    ch.basic_publish("", q, b"committed")
    ch.tx_commit()
    conn.close()
    counted(p, "amqproxy_channels_reused_total", 1)
    assert drained(q) == [b"first", b"committed"]


def test_a_full_buffer_slows_publishers_and_loses_nothing(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """The broker's confirms are held back: once the worker holds more unconfirmed bytes
    than unconfirmed_buffer, its publishers are not read (slowed, not dropped); /pools shows
    what waits; when the confirms come, everything is there."""
    q = declared(names, "buffer-full")
    with Relay() as relay:
        p = behind_relay(proxy_factory, relay, "--unconfirmed-buffer", "65536")
        conn = p.connect()
        ch = conn.channel()
        ch.basic_publish("", q, b"warm")
        wait_for(lambda: queue_counts(q)[0] == 1, what="the first message")
        relay.hold()  # the broker gets the messages, the proxy not its confirms
        done = threading.Event()

        def publish() -> None:
            for i in range(3000):  # (24 MiB: more than the sockets' buffers hold)
                ch.basic_publish("", q, b"%04d" % i + b"." * 8192)
            done.set()

        threading.Thread(target=publish, daemon=True).start()
        assert p.wait_log(r"unconfirmed messages .* over the buffer of 65536 bytes", timeout=10)

        def waiting() -> int:  # (workers write /pools about once a second)
            status, text = http_request(p.http_port, "/pools")
            assert status == 200, text
            return sum(pool["unconfirmed_messages"] for pool in json.loads(text))

        assert 8 <= wait_for(waiting, what="/pools to show the messages waiting") < 3000
        time.sleep(0.5)
        assert not done.is_set()  # held: pika's writes wait in the socket
        relay.release()
        assert done.wait(30)
        conn.close()
        wait_for(lambda: queue_counts(q)[0] == 3001, timeout=30, what="every message")
    got = drained(q)
    assert [body[:4] for body in got[1:]] == [b"%04d" % i for i in range(3000)]


@contextlib.contextmanager
def raw_client_sharing_upstream(
    proxy_factory: ProxyFactory,
) -> Iterator[tuple[Relay, RawClient]]:
    """A raw client past its handshake, through a proxy behind a relay, on the upstream
    connection another client opened."""
    with Relay() as relay:
        p = behind_relay(proxy_factory, relay)
        warm = p.connect()  # the upstream connection
        warm.channel()
        with RawClient(p.host, p.port) as c:
            assert "open_ok" in c.handshake()
            yield relay, c
        warm.close()


@pytest.mark.parametrize("held_from", ["channel open", "publish"])
def test_a_client_closing_its_connection_moves_and_gets_its_close_ok(
    proxy_factory: ProxyFactory, names: Names, held_from: str
) -> None:
    """A raw client that publishes and sends Connection.Close (no Channel.Close) while the
    broker has not answered, from its Channel.Open on or from its publish on, when the
    upstream connection is lost: it moves, gets its CloseOk, and its message is there."""
    q = declared(names, "close-moves")
    with raw_client_sharing_upstream(proxy_factory) as (relay, c):
        if held_from == "channel open":
            relay.hold(to_broker=True)
        c.send_raw(open_(1))
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        relay.hold(to_broker=True)
        c.send_raw(publish_frames(1, "", q, b"closing"))
        c.send(commands.Connection.Close(200, "", 0, 0))
        assert answered_within(c, 0.5) is None  # (processed: the broker has not answered)
        relay.cut()
        assert isinstance(answered_within(c, 10), commands.Connection.CloseOk)
    wait_for(lambda: queue_counts(q)[0] == 1, timeout=10, what="the message")


def test_a_client_whose_confirm_select_is_unanswered_moves(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """A client's Confirm.Select and first publish are on their way when the upstream
    connection is lost (pika's confirm_delivery() as a connection starts): the client moves,
    gets its SelectOk and the ack of its message, and the message is there once."""
    q = declared(names, "select-moves")
    with raw_client_sharing_upstream(proxy_factory) as (relay, c):
        c.send_raw(open_(1))
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        relay.hold(to_broker=True)
        c.send(commands.Confirm.Select(), 1)
        c.send_raw(publish_frames(1, "", q, b"selected"))
        assert answered_within(c, 0.5) is None
        relay.cut()
        assert isinstance(answered_within(c, 10), commands.Confirm.SelectOk)
        ack = answered_within(c, 10)
        assert isinstance(ack, commands.Basic.Ack) and ack.delivery_tag == 1, ack
    wait_for(lambda: queue_counts(q)[0] == 1, timeout=10, what="the message")
    assert drained(q) == [b"selected"]
