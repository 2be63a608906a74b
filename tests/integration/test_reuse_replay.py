"""Channel reuse under an earlier client's late error.

A reused channel may be handed over before the broker answered its parking marker. If the
broker then closes it for what the previous user did (a publish to a missing exchange), the
proxy must move the new user to a fresh upstream channel and send again what the broker
dropped: nothing lost, nothing doubled, no error for the new user.
"""

from __future__ import annotations

import socket
import time

import pika
import pytest
from pamqp import commands, frame
from pamqp import header as pheader

from .conftest import ProxyFactory
from .helpers import Names, RawClient, get_all, queue_counts, wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")


def publish_frames(channel: int, exchange: str, routing_key: str, body: bytes) -> bytes:
    from pamqp import body as pbody

    data = frame.marshal(
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key), channel
    )
    hdr = pheader.ContentHeader(0, len(body), commands.Basic.Properties())
    data += frame.marshal(hdr, channel)
    return data + frame.marshal(pbody.ContentBody(body), channel)


def test_late_error_of_previous_user_does_not_cost_the_next_one(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("-t", "30")
    q = names.queue("replay")
    setup = pika.BlockingConnection(pika.ConnectionParameters(p.host, p.port))
    setup.channel().queue_declare(q)
    setup.close()
    c = RawClient(p.host, p.port)
    assert "open_ok" in c.handshake()
    c.send(commands.Channel.Open(), 1)
    assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
    # all in one write: a publish that the broker will refuse (404), the close of that
    # channel (answered by the proxy, the channel is parked), a new channel (the same
    # upstream channel, handed over before the 404 can arrive) and a good publish on it
    missing = f"itest-missing-{time.monotonic_ns()}"
    burst = publish_frames(1, missing, "", b"lost on purpose")
    burst += frame.marshal(commands.Channel.Close(200, "bye", 0, 0), 1)
    burst += frame.marshal(commands.Channel.Open(), 2)
    burst += frame.marshal(commands.Basic.Qos(prefetch_count=3), 2)
    burst += publish_frames(2, "", q, b"must arrive once")
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.send_raw(burst)
    replies = [c.read_method() for _ in range(3)]
    assert [(ch, type(m).__name__) for ch, m in replies] == [
        (1, "CloseOk"),
        (2, "OpenOk"),
        (2, "QosOk"),
    ]
    wait_for(lambda: queue_counts(q)[0] == 1, what="the good message")
    time.sleep(0.3)  # a duplicate would show up by now
    conn = pika.BlockingConnection(pika.ConnectionParameters(p.host, p.port))
    assert [body for _, _, body in get_all(conn.channel(), q)] == [b"must arrive once"]
    conn.close()
    # the new user's channel still works, and nothing else reached it
    c.send(commands.Basic.Get(queue=q, no_ack=True), 2)
    ch, reply = c.read_method()
    assert (ch, type(reply).__name__) == (2, "GetEmpty")
    c.close()
    # the path under test was taken: channel 2 reused the parked one, then moved to a new one
    wait_for(
        lambda: (metric(p, "amqproxy_channels_reused_total"),
                 metric(p, "amqproxy_upstream_channel_opens_total")) == (1, 4),
        what="1 reuse and 4 upstream channel opens (setup, channel 1, the move, the check)",
        timeout=3,
    )  # fmt: skip


def metric(p: object, name: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}/metrics") as r:  # type: ignore[attr-defined]
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0
