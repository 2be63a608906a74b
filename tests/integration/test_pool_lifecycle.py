"""Pools and upstream connections come and go with their clients: nothing piles up."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import close_broker_connection, queue_counts
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import http_request
from tests.support.raw_client import AMQP_HEADER, RawClient, read_until_connection_close
from tests.support.targets import DirectTarget, ProxyFactory, Target
from tests.support.util import wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")


def test_retired_connections_close_under_churn(proxy_factory: ProxyFactory) -> None:
    """Connections past upstream_max_lifetime take no new channels and close once empty;
    channels parked on them must be closed too, or the connection lives forever."""
    p = proxy_factory("--upstream-max-lifetime", "1", "-t", "60")
    assert isinstance(p, ProxyProcess)
    seen: set[int] = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # PHP-FPM churn: each client parks its channel
        conn = p.connect()
        conn.channel().basic_publish("", "itest-nowhere", b"x")
        conn.close()
        seen |= p.upstream_local_ports()
    assert len(seen) >= 3, seen  # several connections retired meanwhile
    wait_for(
        lambda: len(p.upstream_local_ports()) <= 1, timeout=6, what="retired connections closed"
    )
    assert len(p.upstream_connections()) <= 1


def pools_page(p: ProxyProcess) -> list[dict[str, object]]:
    status, body = http_request(p.http_port, "/pools")
    assert status == 200
    entries: list[dict[str, object]] = json.loads(body)
    return entries


def test_a_client_leaving_during_authentication_leaves_no_pool(
    proxy_factory: ProxyFactory,
) -> None:
    p = proxy_factory("-t", "60")
    assert isinstance(p, ProxyProcess)
    vhosts = [f"itest-gone-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    for vhost in vhosts:  # Connection.Open for a vhost that does not exist, then gone
        c = RawClient(p.host, p.port)
        c.send_raw(AMQP_HEADER)
        c.read_method()
        c.send(commands.Connection.StartOk({}, "PLAIN", "\0guest\0guest"))
        tune = c.read_method()[1]
        c.send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        c.send(commands.Connection.Open(vhost))
        c.close()
    time.sleep(1.5)  # the broker's refusals arrive; /pools is written every second
    conn = p.connect()  # one real pool, so that the page is current
    conn.channel()
    wait_for(lambda: any(e["vhost"] == "/" for e in pools_page(p)), what="the live pool")
    assert [e["vhost"] for e in pools_page(p)] == ["/"]
    conn.close()


def test_clients_in_their_handshake_do_not_count_against_max_client_connections(
    proxy_factory: ProxyFactory,
) -> None:
    p = proxy_factory("--max-client-connections", "2")
    assert isinstance(p, ProxyProcess)
    waiting = [socket.create_connection((p.host, p.port)) for _ in range(5)]
    for s in waiting:
        s.sendall(AMQP_HEADER)  # and nothing more for now
    first, second = p.connect(), p.connect()  # both within the limit
    assert first.is_open and second.is_open
    for s in waiting:
        s.close()
    first.close()
    second.close()


def test_a_client_whose_exclusive_queue_went_with_an_upstream_connection_is_told(
    proxy_factory: ProxyFactory,
) -> None:
    """Directly, the connection that holds an exclusive queue is the client's own: when the
    broker closes it, the client knows. Through the proxy the client may have no channel left
    on that upstream connection; it must be closed all the same, or it would carry on without
    its queue."""
    answers = []
    targets: list[Target] = [DirectTarget(), proxy_factory("-t", "60")]
    for target in targets:
        with RawClient(target.host, target.port) as c:
            assert "open_ok" in c.handshake()
            c.send(commands.Channel.Open(), 1)
            c.read_method()
            c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
            c.read_method()
            c.send(commands.Channel.Close(200, "done with it", 0, 0), 1)
            c.read_method()
            if isinstance(target, ProxyProcess):
                (port,) = target.upstream_local_ports()
            else:
                port = c.sock.getsockname()[1]
            close_broker_connection(port, "itest node maintenance")
            close, _ = read_until_connection_close(c)
            answers.append(None if close is None else (close.reply_code, close.reply_text))
    assert answers[0] == (320, "CONNECTION_FORCED - itest node maintenance")
    assert answers[1] == answers[0]


def test_an_idle_upstream_connection_holding_a_clients_exclusive_queue_is_kept(
    proxy_factory: ProxyFactory,
) -> None:
    """A client that closed its channels keeps its exclusive queue while it stays connected,
    as directly. The upstream connection that holds it has no channels then, and must not
    be closed as idle: that would delete the queue and close the client. (It was.)"""
    p = proxy_factory(
        "-t", "60", "--idle-connection-timeout", "1", "--max-upstream-channels", "1",
        direct_ok=False,
    )  # fmt: skip
    with RawClient(p.host, p.port) as other, RawClient(p.host, p.port) as c:
        for client in (other, c):
            assert "open_ok" in client.handshake()
        other.send(commands.Channel.Open(), 1)  # c then gets a second upstream connection
        other.read_method()
        c.send(commands.Channel.Open(), 1)
        c.read_method()
        c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
        _, ok = c.read_method()
        c.send(commands.Channel.Close(200, "done with it", 0, 0), 1)
        c.read_method()
        time.sleep(3)  # three idle timeouts
        c.send(commands.Channel.Open(), 1)
        c.read_method()
        c.send(commands.Queue.Declare(queue=ok.queue, passive=True), 1)
        _, reply = c.read_method()
        assert isinstance(reply, commands.Queue.DeclareOk), reply


def test_a_client_whose_home_connection_closed_meanwhile_keeps_its_channels_together(
    proxy_factory: ProxyFactory,
) -> None:
    """A client's channels all go to one upstream connection, its home, where its exclusive
    queues are. Its home closes as idle while it has no channel there; its next channels
    must make a new home together. (They went each to a connection of its own, so the second
    got 405 for the first's exclusive queue.)"""
    p = proxy_factory(
        "-t", "60", "--idle-connection-timeout", "1", "--max-upstream-channels", "1",
        direct_ok=False,
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    with RawClient(p.host, p.port) as other, RawClient(p.host, p.port) as c:
        for client in (other, c):
            assert "open_ok" in client.handshake()
        other.send(commands.Channel.Open(), 1)  # holds the first connection
        other.read_method()
        c.send(commands.Channel.Open(), 1)
        c.read_method()
        c.send(commands.Channel.Close(200, "bye", 0, 0), 1)
        c.read_method()
        p.wait_log(r"closed: idle for 1 s", timeout=10)
        for number in (1, 2):
            c.send(commands.Channel.Open(), number)
            c.read_method()
        c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
        _, ok = c.read_method()
        c.send(commands.Queue.Declare(queue=ok.queue, passive=True), 2)
        _, reply = c.read_method()
        assert isinstance(reply, commands.Queue.DeclareOk), reply


def passive_code(name: str) -> int:
    """200 if the queue exists for a new connection, else the broker's code (404, 405)."""
    try:
        queue_counts(name)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    return 200


def test_a_departed_clients_exclusive_queue_is_deleted_even_when_its_channel_was_closing(
    proxy_factory: ProxyFactory,
) -> None:
    """The client publishes to a missing exchange and drops its socket at once: the broker
    is closing the channel (404) the proxy first sends the client's exclusive queue's
    delete on, and ignores it. The delete must go again, on another channel: the queue
    must not stay on the shared connection. (Its name was freed, and the queue stayed,
    gathering messages, locked for every other connection: 405.)"""
    p = proxy_factory("-t", "60", direct_ok=False)
    q = f"itest-kept-{uuid.uuid4().hex[:8]}"
    c = RawClient(p.host, p.port)
    assert "open_ok" in c.handshake()
    c.send(commands.Channel.Open(), 1)
    c.read_method()
    c.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
    c.read_method()
    c.publish(1, "itest-no-such-exchange", "k", b"to nowhere")
    c.close()
    wait_for(lambda: passive_code(q) == 404, timeout=5, what="the queue deleted")
