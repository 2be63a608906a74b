"""Issue 4: resources whose scope is the (shared) upstream connection.

- Exclusive queues belong to the upstream connection, which many clients share: the proxy
  locks them to the client that declared them (405 RESOURCE_LOCKED for everybody else, as
  RabbitMQ answers across connections) and deletes them when that client goes.
- RabbitMQ answers an Exchange.Declare of an unknown type with 503 on the whole connection:
  the proxy tries a type it has not seen work on a disposable connection first, so that only
  the client asking for it is closed.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import Names, queue_counts, rabbitmqctl
from tests.support.pika_client import Bystander, drain
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import metric_sample
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory, Target
from tests.support.util import wait_for


def locked_text(queue: str, vhost: str = "/") -> str:
    return (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost "
        f"'{vhost}'. It could be originally declared on another connection or the exclusive "
        "property value does not match that of the original declaration."
    )


def channel_error(op: Callable[[Any], object], conn: pika.BlockingConnection) -> tuple[int, str]:
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        op(ch)
    return info.value.reply_code, info.value.reply_text


def passive_code(conn: pika.BlockingConnection, queue: str) -> int:
    ch = conn.channel()
    try:
        ch.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    ch.close()
    return 200


OTHERS: list[tuple[str, Callable[[Any, str], object]]] = [
    ("basic.consume", lambda ch, q: ch.basic_consume(q, lambda *a: None)),
    ("basic.get", lambda ch, q: ch.basic_get(q)),
    ("queue.declare", lambda ch, q: ch.queue_declare(q)),
    ("queue.declare exclusive", lambda ch, q: ch.queue_declare(q, exclusive=True)),
    ("queue.declare passive", lambda ch, q: ch.queue_declare(q, passive=True)),
    ("queue.purge", lambda ch, q: ch.queue_purge(q)),
    ("queue.bind", lambda ch, q: ch.queue_bind(q, "amq.fanout")),
    ("queue.unbind", lambda ch, q: ch.queue_unbind(q, "amq.fanout")),
    ("queue.delete", lambda ch, q: ch.queue_delete(q)),
]


@pytest.mark.parametrize("server_named", [False, True], ids=["named", "server-named"])
def test_exclusive_queue_is_locked_to_its_owner_on_the_shared_upstream(
    proxy_factory: ProxyFactory, server_named: bool
) -> None:
    p = proxy_factory("-t", "60")
    owner = p.connect()
    och = owner.channel()
    q = och.queue_declare(
        "" if server_named else f"itest-excl-lock-{uuid.uuid4().hex[:8]}", exclusive=True
    ).method.queue
    och.queue_bind(q, "amq.fanout")
    other = p.connect()
    if isinstance(p, ProxyProcess):
        assert len(p.upstream_local_ports()) == 1  # the owner and the other share it
    # everything another client does with it is refused, as across connections
    for what, op in OTHERS:
        got = channel_error(lambda ch, op=op: op(ch, q), other)
        if server_named and what in ("queue.declare", "queue.declare exclusive"):
            # RabbitMQ checks the name first: nobody may declare an amq.* name
            reserved = f"ACCESS_REFUSED - queue name '{q}' contains reserved prefix 'amq.*'"
            assert got == (403, reserved), what
        else:
            assert got == (405, locked_text(q)), what
    # ... exactly like RabbitMQ would: class and method of the refused method, raw
    with RawClient(p.host, p.port) as c:
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        c.send(commands.Basic.Consume(queue=q), 1)
        ch, close = c.read_method()
        assert ch == 1 and isinstance(close, commands.Channel.Close), close
        assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
            405,
            locked_text(q),
            60,
            20,
        )
    # the owner uses it freely, on any of its channels
    och.queue_declare(q, exclusive=True, passive=server_named)  # redeclare
    och.basic_publish("", q, b"to the owner")
    och.basic_publish("amq.fanout", "", b"through the binding")
    assert [och.basic_get(q, auto_ack=True)[2] for _ in range(2)] == [
        b"to the owner",
        b"through the binding",
    ]
    got: list[bytes] = []
    owner.channel().basic_consume(q, lambda _c, _m, _p, body: got.append(body), auto_ack=True)
    och.basic_publish("", q, b"consumed")
    drain(owner, lambda: got == [b"consumed"], what="the owner's consumer")
    och.queue_purge(q)
    # the other client's connection is fine, and once the owner leaves the queue is gone
    assert other.is_open
    owner.close()
    wait_for(lambda: passive_code(other, q) == 404, 5, what="exclusive queue deleted")
    if not server_named:  # now anyone may take the name
        och2 = other.channel()
        och2.queue_declare(q, exclusive=True)
        och2.queue_delete(q)
    other.close()


def test_exclusive_queue_of_a_client_that_leaves_before_declare_ok_is_deleted(
    proxy_factory: ProxyFactory,
) -> None:
    """A client that declares an exclusive queue and goes before the broker's DeclareOk
    arrives (a PHP worker killed mid-request) must not leave the queue behind on the shared
    upstream connection, where it would live as long as that connection."""
    p = proxy_factory("-t", "60", direct_ok=False)
    keep = p.connect()  # keeps the pool's upstream connection (and its queues) alive
    names = [f"itest-excl-race-{uuid.uuid4().hex[:8]}" for _ in range(10)]
    for name in names:
        c = RawClient(p.host, p.port)
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        c.send(commands.Queue.Declare(queue=name, exclusive=True), 1)
        c.close()  # at once, without waiting for Queue.DeclareOk
    wait_for(
        lambda: all(passive_code(keep, name) == 404 for name in names),
        5,
        what="exclusive queues of departed clients deleted",
    )
    keep.close()


# --------------------------------------------------------------------------- exchange types


def upstream_opened(p: Target) -> int:
    """How many upstream connections the proxy opened so far (its log, one line each)."""
    return len(re.findall(r"upstream connection opened to ", p.log_text()))


def test_unknown_exchange_type_closes_only_that_client(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("-t", "60")
    bystander = Bystander(p, names)
    bystander.roundtrip()
    is_proxy = isinstance(p, ProxyProcess)
    ports = p.upstream_local_ports() if is_proxy else set()
    x = names.exchange("xtype")
    for attempt in (1, 2):  # a refused type is tried again (a plugin may have been enabled)
        conn = p.connect()
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
            conn.channel().exchange_declare(x, exchange_type="x-nonexistent")
        assert (info.value.reply_code, info.value.reply_text) == (
            503,
            "COMMAND_INVALID - unknown exchange type 'x-nonexistent'",
        )
        bystander.roundtrip()
        if is_proxy:
            assert p.upstream_local_ports() == ports, "the shared upstream connection changed"
            assert upstream_opened(p) == 1 + attempt  # the shared one, and one probe each
            p.wait_log(r"declared an exchange of type 'x-nonexistent', which the broker refuses")
    # a built-in type works at once, without any probe
    q = names.queue("xtype")
    conn = p.connect()
    ch = conn.channel()
    ch.exchange_declare(x, exchange_type="topic")
    ch.queue_declare(q)
    ch.queue_bind(q, x, "a.*")
    ch.basic_publish(x, "a.b", b"through a topic exchange")
    wait_for(lambda: queue_counts(q)[0] == 1, what="the message in the queue")
    assert ch.basic_get(q, auto_ack=True)[2] == b"through a topic exchange"
    bystander.roundtrip()
    if is_proxy:
        assert upstream_opened(p) == 3
        wait_for(
            lambda: metric_sample(p.http_port, "amqproxy_upstream_connect_seconds_count") == 3,
            5,
            what="3 upstream connects in /metrics",
        )
        assert p.upstream_local_ports() == ports
    conn.close()
    bystander.close()


@contextlib.contextmanager
def plugin_enabled(name: str, exchange_type: str) -> Iterator[None]:
    """The plugin's exchange type is available within; the plugin is disabled again after
    (in the enabled_plugins file: the running broker keeps the type registered anyway)."""
    if shutil.which("rabbitmq-plugins") is None:
        pytest.skip("rabbitmq-plugins is not available")
    registered = rabbitmqctl("-q", "eval", "rabbit_registry:lookup_all(exchange).")
    enabled_here = f"'{exchange_type}'" not in registered
    if enabled_here:
        subprocess.run(
            ["rabbitmq-plugins", "enable", "--online", name],
            check=True,
            capture_output=True,
            timeout=60,
        )
    try:
        yield
    finally:
        if enabled_here:
            subprocess.run(
                ["rabbitmq-plugins", "disable", "--offline", name],
                check=False,
                capture_output=True,
                timeout=60,
            )


def test_a_plugin_exchange_type_is_probed_once_then_known(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """A type the proxy does not know (x-random, from a plugin shipped with RabbitMQ) is tried
    on a disposable connection the first time; once it worked, declares of it go straight to
    the shared connection."""
    p = proxy_factory("-t", "60", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    bystander = Bystander(p, names)
    ports = p.upstream_local_ports()
    with plugin_enabled("rabbitmq_random_exchange", "x-random"):
        x1, x2, q = names.exchange("rnd"), names.exchange("rnd"), names.queue("rnd")
        conn = p.connect()
        ch = conn.channel()
        ch.exchange_declare(x1, exchange_type="x-random")
        assert upstream_opened(p) == 2  # the shared connection and one probe
        p.wait_log(r"closed: exchange type probe done")
        ch.exchange_declare(x2, exchange_type="x-random")  # known now: no second probe
        ch.queue_declare(q)
        ch.queue_bind(q, x2, "")
        ch.basic_publish(x2, "", b"through x-random")
        wait_for(lambda: queue_counts(q)[0] == 1, what="the message in the queue")
        assert upstream_opened(p) == 2
        bystander.roundtrip()
        assert p.upstream_local_ports() == ports
        ch.exchange_delete(x1)
        ch.exchange_delete(x2)
        conn.close()
    bystander.close()
