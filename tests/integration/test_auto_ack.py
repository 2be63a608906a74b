"""A client's no_ack consumer is consumed upstream with acks, the proxy acking each delivery
once it has left for the client (docs/architecture.md, "slow consumers"). Whatever else the
client does on that channel (its own acks of other deliveries, acks of "everything", Recover,
a multiple Nack, transactions, a cancelled tag used again) must come out as it does directly:
every message once, no channel error. RabbitMQ is the oracle: each scenario runs directly and
through the proxy, and both must agree.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from pamqp import commands

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient
from tests.support.targets import DirectTarget, Target


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(tmp_path_factory.mktemp("auto-ack") / "proxy.log", ("-t", "60"))
    p.start()
    yield p
    assert "Traceback" not in p.log_text()
    p.stop()


@pytest.fixture(params=["direct", "proxy"])
def target(request: pytest.FixtureRequest, proxy: ProxyProcess) -> Target:
    return DirectTarget() if request.param == "direct" else proxy


def fill(queue: str, count: int, size: int) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    ch = conn.channel()
    ch.queue_declare(queue)
    for _ in range(count):
        ch.basic_publish("", queue, b"x" * size)
    conn.close()


def left(queue: str) -> int:
    """Messages in the queue, ready or not (its consumers are gone)."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def client(target: Target, receive_buffer: int = 0) -> RawClient:
    c = RawClient(target.host, target.port)
    if receive_buffer:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    assert "open_ok" in c.handshake()
    c.send(commands.Channel.Open(), 1)
    c.read_method()
    return c


def read_all(c: RawClient, quiet: float = 3.0) -> tuple[list[int], list[Any]]:
    """Delivery tags and the other channel-1 methods, until nothing comes for `quiet` s."""
    tags: list[int] = []
    others: list[Any] = []
    c.sock.settimeout(quiet)
    try:
        while True:
            _, value = c.read_frame()
            if isinstance(value, commands.Basic.Deliver):
                tags.append(value.delivery_tag)
            elif isinstance(value, commands.Channel.Close):
                others.append((value.reply_code, value.reply_text))
                break
            elif hasattr(value, "name"):
                others.append(value.name)
    except TimeoutError:
        pass
    return tags, others


@pytest.mark.parametrize("then", ["nothing", "ack everything", "recover", "nack everything"])
def test_a_no_ack_consumer_gets_every_message_once_whatever_the_client_sends(
    target: Target, names: Names, then: str
) -> None:
    """The client reads slowly, so the proxy holds deliveries it has not acked yet, then sends
    something about "all deliveries": directly, no_ack deliveries are not among them."""
    q = names.queue("auto-ack")
    fill(q, 3000, 10_000)
    c = client(target, receive_buffer=65536)
    c.send(commands.Basic.Consume(queue=q, consumer_tag="auto", no_ack=True), 1)
    c.read_method()
    time.sleep(1.0)  # not reading: the proxy's buffer towards the client fills
    if then == "ack everything":
        c.send(commands.Basic.Ack(delivery_tag=0, multiple=True), 1)
    elif then == "recover":
        c.send(commands.Basic.Recover(requeue=True), 1)
    elif then == "nack everything":
        c.send(commands.Basic.Nack(delivery_tag=0, multiple=True, requeue=True), 1)
    tags, others = read_all(c)
    c.close()
    assert len(tags) == len(set(tags)) == 3000, (len(tags), len(set(tags)), others)
    assert [o for o in others if isinstance(o, tuple)] == []
    assert left(q) == 0


def test_a_tag_used_again_by_a_manual_consumer_is_not_acked_by_the_proxy(
    target: Target, names: Names
) -> None:
    """Consumer "t" with no_ack, cancelled, then "t" again with manual acks: the client's own
    ack of its delivery must be the only one (a second is a 406)."""
    q = names.queue("tag-again")
    fill(q, 0, 0)
    c = client(target)
    c.send(commands.Basic.Consume(queue=q, consumer_tag="t", no_ack=True), 1)
    c.read_method()
    c.send(commands.Basic.Cancel(consumer_tag="t"), 1)
    c.read_method()
    c.send(commands.Basic.Consume(queue=q, consumer_tag="t", no_ack=False), 1)
    c.read_method()
    c.publish(1, "", q, b"hello")
    _, deliver = c.read_method()
    assert isinstance(deliver, commands.Basic.Deliver)
    c.read_frame(), c.read_frame()  # header, body
    time.sleep(0.3)  # (when the proxy would have acked it)
    c.send(commands.Basic.Ack(delivery_tag=deliver.delivery_tag), 1)
    c.send(commands.Queue.Declare(queue=q, passive=True), 1)
    _, answer = c.read_method()
    c.close()
    assert isinstance(answer, commands.Queue.DeclareOk), answer
    assert answer.message_count == 0


def test_a_no_ack_consumer_on_a_transactional_channel_gets_everything(
    target: Target, names: Names
) -> None:
    """More messages than the proxy's consumer window: acks of the proxy's would wait in the
    client's transaction, which it never commits, and the consumer would stall."""
    q = names.queue("tx-no-ack")
    fill(q, 1500, 10)
    c = client(target)
    c.send(commands.Tx.Select(), 1)
    c.read_method()
    c.send(commands.Basic.Consume(queue=q, no_ack=True), 1)
    c.read_method()
    tags, others = read_all(c)
    c.close()
    assert len(tags) == 1500, (len(tags), others)
