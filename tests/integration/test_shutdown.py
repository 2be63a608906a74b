"""Graceful shutdown on SIGTERM: stop accepting, let clients leave within the grace period,
then Connection.Close 320 CONNECTION_FORCED to the rest, exit 0."""

from __future__ import annotations

import signal
import socket
import time

import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import Names
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient, RawClosed
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")


def serves_amqp(host: str, port: int, timeout: float = 0.3) -> bool:
    """True when a new connection gets Connection.Start."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1)[:1] == b"\x01"
    except OSError:
        return False


def test_sigterm_forces_remaining_clients_with_320(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p: ProxyProcess = proxy_factory("--term-client-close-timeout", "1", direct_ok=False)
    q = names.queue("term")
    conn = p.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    assert serves_amqp(p.host, p.port)
    t0 = time.monotonic()
    p.signal(signal.SIGTERM)
    wait_for(
        lambda: not serves_amqp(p.host, p.port),
        timeout=0.8,
        what="the proxy to stop accepting new clients",
    )
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        while time.monotonic() - t0 < 10:
            conn.process_data_events(time_limit=0.05)
    elapsed = time.monotonic() - t0
    assert info.value.reply_code == 320
    assert info.value.reply_text.startswith("CONNECTION_FORCED"), info.value.reply_text
    assert elapsed >= 0.9, f"forced after {elapsed:.2f}s, before the 1 s grace period"
    assert p.wait(10) == 0
    assert not serves_amqp(p.host, p.port)


def test_client_leaving_within_grace_period_sees_no_error(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p: ProxyProcess = proxy_factory("--term-client-close-timeout", "8", direct_ok=False)
    q = names.queue("grace")
    conn = p.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    t0 = time.monotonic()
    p.signal(signal.SIGTERM)
    # an existing client keeps working during the grace period
    ch.basic_publish("", q, b"during grace")
    deadline = time.monotonic() + 3
    while True:
        m, _, body = ch.basic_get(q, auto_ack=True)
        if m is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert body == b"during grace"
    conn.close()  # no exception: a clean close
    # the last client is gone: no need to wait out the 8 s
    assert p.wait(6) == 0
    assert time.monotonic() - t0 < 6


def test_term_timeout_force_closes_unresponsive_client(proxy_factory: ProxyFactory) -> None:
    p: ProxyProcess = proxy_factory(
        "--term-client-close-timeout", "1", "--term-timeout", "1", direct_ok=False
    )
    with RawClient(p.host, p.port, timeout=10) as c:
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        ch, m = c.read_method()
        assert ch == 0 and isinstance(m, commands.Connection.Close), m
        assert m.reply_code == 320
        # never answer CloseOk: the proxy must give up on us and exit
        assert p.wait(8) == 0
        assert time.monotonic() - t0 < 8
        with pytest.raises(RawClosed):
            while True:
                c.read_frame()


def test_a_quick_stop_closes_upstream_connections_without_blaming_the_broker(
    proxy_factory: ProxyFactory,
) -> None:
    """SIGINT drops every connection at once: the upstream ones end because the proxy ends
    them, which the log must not report as the node's failure (a node "down", a connection
    "lost" or "closed by broker"): an operator reads those as a broker outage."""
    p: ProxyProcess = proxy_factory(direct_ok=False)
    conn = p.connect()
    conn.channel()
    p.signal(signal.SIGINT)
    p.wait(10)
    text = p.log_text()
    assert "closing all connections now" in text
    for blame in ("is down", "connection closed by broker", "connection lost"):
        assert blame not in text, text[-3000:]
