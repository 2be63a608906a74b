"""What a client's channels must behave like through the proxy, exactly as they do directly,
however the proxy places them on shared upstream connections and reuses upstream channels."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands, frame

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names, queue_counts
from tests.support.pika_client import Bystander, drain
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient
from tests.support.targets import DirectTarget, ProxyFactory, Target
from tests.support.util import wait_for


def targets(proxy_factory: ProxyFactory, *options: str) -> list[Target]:
    """RabbitMQ itself, then a proxy: every scenario must give the same on both."""
    return [DirectTarget(), proxy_factory("-t", "60", *options, direct_ok=False)]


def raw(target: Target) -> RawClient:
    c = RawClient(target.host, target.port)
    assert "open_ok" in c.handshake()
    return c


def replies(c: RawClient, count: int) -> list[tuple[int, str, Any]]:
    out = []
    for _ in range(count):
        ch, method = c.read_method()
        out.append((ch, type(method).__name__, getattr(method, "reply_code", None)))
    return out


def test_a_clients_channels_share_its_exclusive_queue(proxy_factory: ProxyFactory) -> None:
    """Channel 1 declares an exclusive queue, channel 2 consumes from it: fine directly, and
    through the proxy even when one upstream channel per connection would spread them."""

    def scenario(target: Target) -> None:
        conn = target.connect()
        first, second = conn.channel(), conn.channel()
        q = first.queue_declare("", exclusive=True).method.queue
        got: list[bytes] = []
        second.basic_consume(q, lambda _c, _m, _p, body: got.append(body), auto_ack=True)
        first.basic_publish("", q, b"to the second channel")
        drain(conn, lambda: got == [b"to the second channel"], what="the message")
        if isinstance(target, ProxyProcess):  # ... on one upstream connection
            assert len(target.upstream_local_ports()) == 1
        conn.close()

    for target in targets(proxy_factory, "--max-upstream-channels", "1"):
        scenario(target)


def consume_ok_tag(c: RawClient) -> str:
    while True:
        _, method = c.read_method()
        if isinstance(method, commands.Basic.ConsumeOk):
            return str(method.consumer_tag)


def close_of(c: RawClient) -> tuple[int, str, int, int]:
    while True:
        _, method = c.read_method()
        if isinstance(method, commands.Connection.Close):
            return method.reply_code, method.reply_text, method.class_id, method.method_id


@pytest.mark.parametrize("how", ["server-chosen", "client-chosen"])
def test_reusing_a_consumer_tag_is_the_brokers_530_for_that_client_alone(
    proxy_factory: ProxyFactory, names: Names, how: str
) -> None:
    results = []
    for target in targets(proxy_factory):
        bystander = Bystander(target, names)
        with raw(target) as c:
            c.send(commands.Channel.Open(), 1)
            c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
            c.send(commands.Basic.Consume(queue="", consumer_tag="" if how == "server-chosen"
                                          else "mine"), 1)  # fmt: skip
            tag = consume_ok_tag(c)
            c.send(commands.Basic.Consume(queue="", consumer_tag=tag), 1)
            code, text, class_id, method_id = close_of(c)
            results.append((code, text.replace(tag, "TAG"), class_id, method_id))
        bystander.roundtrip()  # the shared upstream connection lives on
        bystander.close()
    direct, through = results
    assert direct[0] == 530 and through == direct


def test_a_tag_the_broker_cancelled_may_be_used_again(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """The broker cancels a consumer whose queue is deleted (Basic.Cancel): its tag is free."""

    def scenario(target: Target) -> None:
        q = names.queue("cancelled")
        conn = target.connect()
        ch = conn.channel()
        ch.queue_declare(q)
        cancelled: list[Any] = []
        ch.add_on_cancel_callback(cancelled.append)
        ch.basic_consume(q, lambda *a: None, consumer_tag="again")
        other = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
        other.channel().queue_delete(q)
        drain(conn, lambda: bool(cancelled), what="the broker's Basic.Cancel")
        ch.queue_declare(q)
        ch.basic_consume(q, lambda *a: None, consumer_tag="again")  # no 530
        assert conn.is_open and ch.is_open
        other.channel().queue_delete(q)
        other.close()
        conn.close()

    for target in targets(proxy_factory):
        scenario(target)


def test_basic_cancel_only_reaches_clients_that_announced_consumer_cancel_notify(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """RabbitMQ sends Basic.Cancel only to clients with the capability; the proxy's upstream
    connection has it, so the proxy must not pass it to a client without it."""
    seen = []
    for target in targets(proxy_factory):
        q = names.queue("notify")
        c = RawClient(target.host, target.port)
        assert "open_ok" in c.handshake(client_properties={"capabilities": {}})
        c.send(commands.Channel.Open(), 1)
        c.send(commands.Queue.Declare(queue=q), 1)
        c.send(commands.Basic.Consume(queue=q, consumer_tag="t"), 1)
        consume_ok_tag(c)
        other = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
        other.channel().queue_delete(q)
        other.close()
        c.send(commands.Basic.Qos(prefetch_count=1), 1)  # a round trip after the delete
        got = []
        while True:
            _, method = c.read_method()
            got.append(type(method).__name__)
            if isinstance(method, commands.Basic.QosOk):
                break
        seen.append(got)
        c.close()
    assert seen[0] == ["QosOk"] and seen[1] == seen[0]


def test_a_close_crossing_the_brokers_then_its_close_ok_is_accepted(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """The client closes a channel just as the broker closes it (404): RabbitMQ answers the
    client's Close with CloseOk and takes the client's CloseOk for its own Close."""
    outcomes = []
    for target in targets(proxy_factory):
        bystander = Bystander(target, names)
        with raw(target) as c:
            for round_ in range(5):
                c.send(commands.Channel.Open(), 1)
                assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
                # unsafe (a consumer), so the proxy forwards the Close; the passive declare fails
                c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
                c.send_raw(
                    frame.marshal(commands.Queue.Declare(queue="itest-nope", passive=True), 1)
                    + frame.marshal(commands.Channel.Close(200, "bye", 0, 0), 1)
                )
                got = replies(c, 3)  # DeclareOk, the broker's Close, the answer to ours
                c.send(commands.Channel.CloseOk(), 1)  # for the broker's Close
                c.send(commands.Channel.Open(), 1)  # the channel is usable again
                got += replies(c, 1)
                c.send(commands.Channel.Close(200, "", 0, 0), 1)
                got += replies(c, 1)
                outcomes.append((round_, got))
        bystander.roundtrip()
        bystander.close()
    half = len(outcomes) // 2
    assert [got for _, got in outcomes[half:]] == [got for _, got in outcomes[:half]]
    assert outcomes[0][1] == [
        (1, "DeclareOk", None), (1, "Close", 404), (1, "CloseOk", None),
        (1, "OpenOk", None), (1, "CloseOk", None),
    ]  # fmt: skip


def test_a_qos_never_overtakes_the_reply_of_an_earlier_request(proxy_factory: ProxyFactory) -> None:
    """Pipelined Queue.Declare, Basic.Get and Basic.Qos: the replies come in that order, as
    directly (the proxy answers a Qos itself only when nothing else is awaited)."""
    orders = []
    for target in targets(proxy_factory):
        with raw(target) as c:
            c.send(commands.Channel.Open(), 1)
            c.read_method()
            q = f"itest-qos-order-{uuid.uuid4().hex[:8]}"
            c.send_raw(
                frame.marshal(commands.Queue.Declare(queue=q, auto_delete=True), 1)
                + frame.marshal(commands.Basic.Get(queue=q), 1)
                + frame.marshal(commands.Basic.Qos(prefetch_count=7), 1)
                + frame.marshal(commands.Basic.Qos(prefetch_count=8, global_=True), 1)
            )
            orders.append([name for _, name, _ in replies(c, 4)])
    assert orders[0] == ["DeclareOk", "GetEmpty", "QosOk", "QosOk"]
    assert orders[1] == orders[0]


def test_an_earlier_clients_global_prefetch_does_not_bind_the_next(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """Client A sets a global prefetch of 1 and leaves its (reusable) channel; client B, on
    that very upstream channel, sets a per-consumer prefetch of 10 and consumes: it must get
    10 unacked deliveries, not 1."""
    p = proxy_factory("-t", "60", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    q = names.queue("prefetch")
    setup = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    sch = setup.channel()
    sch.queue_declare(q)
    for i in range(20):
        sch.basic_publish("", q, str(i).encode())
    a = p.connect()
    ach = a.channel()
    ach.basic_qos(prefetch_count=1, global_qos=True)
    ach.basic_publish("", "itest-nowhere", b"x")  # a safe channel: it will be reused
    a.close()
    time.sleep(0.2)
    b = p.connect()
    bch = b.channel()
    bch.basic_qos(prefetch_count=10)
    got: list[Any] = []
    bch.basic_consume(q, lambda _c, method, _p, _b: got.append(method.delivery_tag))
    drain(b, lambda: len(got) >= 10, timeout=5, what="10 unacked deliveries")
    b.process_data_events(time_limit=0.3)
    assert len(got) == 10
    wait_for(lambda: queue_counts(q)[0] == 10, what="10 left in the queue")
    b.close()
    setup.close()


def frames_until(c: RawClient, stop: type, limit: int = 20) -> list[str]:
    """Names of the frames on channel 1 up to a method of type `stop` (included)."""
    seen: list[str] = []
    while len(seen) < limit:
        _, value = c.read_frame()
        name = type(value).__name__
        seen.append(f"{name} {value.reply_code}" if hasattr(value, "reply_code") else name)
        if isinstance(value, stop):
            break
    return seen


@pytest.mark.parametrize("queue_has", ["a message", "nothing"])
def test_a_get_pipelined_with_its_channels_close_is_answered_first(
    proxy_factory: ProxyFactory, names: Names, queue_has: str
) -> None:
    """Basic.Get then Channel.Close at once: the reply (with its message) comes before the
    CloseOk, and nothing else on the upstream connection notices."""
    outcomes = []
    for target in targets(proxy_factory):
        q = names.queue("get-close")
        setup = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
        setup.channel().queue_declare(q)
        if queue_has == "a message":
            setup.channel().basic_publish("", q, b"precious")
        setup.close()
        bystander = Bystander(target, names)
        with raw(target) as c:
            c.send(commands.Channel.Open(), 1)
            c.read_method()
            c.send_raw(
                frame.marshal(commands.Basic.Get(queue=q, no_ack=True), 1)
                + frame.marshal(commands.Channel.Close(200, "bye", 0, 0), 1)
            )
            outcomes.append(frames_until(c, commands.Channel.CloseOk))
        bystander.roundtrip()
        bystander.close()
        assert queue_counts(q)[0] == 0
    assert outcomes[1] == outcomes[0]
    assert outcomes[0][-1] == "CloseOk"


def test_a_channel_error_comes_after_the_replies_to_what_came_before(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """B gets a message (no_ack) and, in the same write, touches A's exclusive queue: RabbitMQ
    answers the Get, with its message, then closes the channel (405). The proxy finds the 405
    itself (A is on the same upstream connection) and must not drop the GetOk before it."""
    outcomes = []
    locked = f"itest-locked-{uuid.uuid4().hex[:8]}"
    for target in targets(proxy_factory):
        q = names.queue("before-error")
        setup = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
        setup.channel().queue_declare(q)
        setup.channel().basic_publish("", q, b"precious")
        setup.close()
        with raw(target) as a, raw(target) as b:
            for c in (a, b):
                c.send(commands.Channel.Open(), 1)
                c.read_method()
            a.send(commands.Queue.Declare(queue=locked, exclusive=True), 1)
            a.read_method()
            b.send_raw(
                frame.marshal(commands.Basic.Get(queue=q, no_ack=True), 1)
                + frame.marshal(commands.Queue.Declare(queue=locked, passive=True), 1)
            )
            outcomes.append(frames_until(b, commands.Channel.Close))
    assert outcomes[0] == ["GetOk", "ContentHeader", "ContentBody", "Close 405"]
    assert outcomes[1] == outcomes[0]


def test_an_exclusive_queue_its_client_deleted_is_free_for_another(
    proxy_factory: ProxyFactory,
) -> None:
    """A declares an exclusive queue and deletes it; B may then declare it (exclusive)."""
    outcomes = []
    for target in targets(proxy_factory):
        q = f"itest-freed-{uuid.uuid4().hex[:8]}"
        with raw(target) as a, raw(target) as b:
            for c in (a, b):
                c.send(commands.Channel.Open(), 1)
                c.read_method()
            a.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
            a.read_method()
            a.send(commands.Queue.Delete(queue=q), 1)
            a.read_method()
            b.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
            outcomes.append(type(b.read_method()[1]).__name__)
            b.send(commands.Queue.Delete(queue=q), 1)
            b.read_method()
    assert outcomes == ["DeclareOk", "DeclareOk"]


def test_a_queue_of_the_same_name_made_after_a_client_deleted_its_own_survives_it(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """A declares an exclusive queue and deletes it; someone else then makes a queue of that
    name; A leaves: that queue, and its messages, are not A's to take."""
    for target in targets(proxy_factory):
        q = names.queue("not-yours")
        with raw(target) as a:
            a.send(commands.Channel.Open(), 1)
            a.read_method()
            a.send(commands.Queue.Declare(queue=q, exclusive=True, auto_delete=True), 1)
            a.read_method()
            a.send(commands.Queue.Delete(queue=q), 1)
            a.read_method()
            other = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
            och = other.channel()
            och.queue_declare(q)
            for _ in range(3):
                och.basic_publish("", q, b"theirs")
            a.send(commands.Connection.Close(200, "bye", 0, 0))
            a.read_method()
        time.sleep(0.5)
        assert queue_counts(q)[0] == 3
        och.queue_delete(q)
        other.close()


def test_binding_another_clients_exclusive_queue_is_answered_as_directly(
    proxy_factory: ProxyFactory,
) -> None:
    """RabbitMQ checks a binding's exchange (404), and for an unbind whether the binding
    exists (UnbindOk when not), before the queue's exclusivity (405). Through the proxy, A's
    exclusive queue is on the connection B shares: B must still get the broker's order."""
    steps = [
        commands.Queue.Bind(exchange="itest-no-such-exchange", routing_key="k"),
        commands.Queue.Bind(exchange="amq.direct", routing_key="k"),
        commands.Queue.Unbind(exchange="amq.direct", routing_key="not-bound"),
        commands.Queue.Unbind(exchange="itest-no-such-exchange", routing_key="k"),
        commands.Queue.Unbind(exchange="amq.direct", routing_key="bound"),
        commands.Queue.Bind(exchange="amq.direct", routing_key="k", nowait=True),
    ]
    outcomes = []
    for target in targets(proxy_factory):
        q = f"itest-locked-bind-{uuid.uuid4().hex[:8]}"
        seen = []
        with raw(target) as a, raw(target) as b:
            a.send(commands.Channel.Open(), 1)
            a.read_method()
            a.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
            a.read_method()
            a.send(commands.Queue.Bind(queue=q, exchange="amq.direct", routing_key="bound"), 1)
            a.read_method()
            for number, step in enumerate(steps, start=1):
                step.queue = q
                b.send(commands.Channel.Open(), number)
                b.read_method()
                b.send(step, number)
                b.send(commands.Basic.Qos(prefetch_count=1), number)  # a reply after it
                _, reply = b.read_method()
                seen.append(f"{type(reply).__name__} {getattr(reply, 'reply_code', '')}".strip())
                if isinstance(reply, commands.Channel.Close):
                    b.send(commands.Channel.CloseOk(), number)
                else:
                    b.read_method()  # the QosOk
        outcomes.append(seen)
    assert outcomes[0] == [
        "Close 404",
        "Close 405",
        "UnbindOk",
        "UnbindOk",
        "Close 405",
        "Close 405",
    ]
    assert outcomes[1] == outcomes[0]


def test_two_clients_declaring_one_exclusive_queue_at_once_share_it_safely(
    proxy_factory: ProxyFactory,
) -> None:
    """A and B declare the same exclusive queue before either DeclareOk is back: on their
    shared upstream connection the broker confirms both, and the DeclareOk processed last
    decides its owner (the other gets 405 for it, as from another connection). The other's
    departure leaves the queue alone; the owner's deletes it; the proxy carries on. (It once
    deleted the queue when the other left, then failed when the owner left.)"""
    p = proxy_factory("--workers", "1", direct_ok=False)
    q = f"itest-raced-{uuid.uuid4().hex[:8]}"
    with raw(p) as a, raw(p) as b:
        for c in (a, b):
            c.send(commands.Channel.Open(), 1)
            c.read_method()
        a.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
        b.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
        assert isinstance(a.read_method()[1], commands.Queue.DeclareOk)
        assert isinstance(b.read_method()[1], commands.Queue.DeclareOk)
        answers = {}
        for name, c in (("a", a), ("b", b)):
            c.send(commands.Queue.Declare(queue=q, passive=True), 1)
            answers[name] = c.read_method()[1]
        owners = [n for n, m in answers.items() if isinstance(m, commands.Queue.DeclareOk)]
        assert len(owners) == 1, answers  # the other was told 405, as directly
        owner, other = (a, b) if owners == ["a"] else (b, a)
        other.send(commands.Connection.Close(200, "bye", 0, 0))
        other.read_method()
        time.sleep(0.3)
        owner.send(commands.Queue.Declare(queue=q, passive=True), 1)
        assert isinstance(owner.read_method()[1], commands.Queue.DeclareOk)  # still there
        owner.send(commands.Connection.Close(200, "bye", 0, 0))
        owner.read_method()

    def gone() -> bool:
        try:
            queue_counts(q)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return exc.reply_code == 404  # (405 while it is still someone's)
        return False

    wait_for(gone, what="the queue deleted when its owner left")
    with raw(p) as c:  # the proxy carries on
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
    assert "Traceback" not in p.log_text()


@pytest.mark.parametrize("ending", ["client-close", "proxy-close", "both-close"])
def test_a_clients_exclusive_queues_are_gone_when_its_connection_close_arrives(
    proxy_factory: ProxyFactory, ending: str
) -> None:
    """RabbitMQ deletes a connection's exclusive queues before it answers its Connection.Close
    and as it sends its own: whoever then asks for them (on any connection) finds them gone,
    and a new connection may declare them again and keep them. Through the proxy, the
    upstream connection outlives the client, so the proxy deletes them: the client must not
    hear its connection has ended before they are gone. (It once answered first: the next
    connection got 405, or its own new queue was deleted under it.)"""
    outcomes = []
    for target in targets(proxy_factory, "--workers", "1"):
        base = f"itest-gone-{uuid.uuid4().hex[:8]}"
        queues = [f"{base}-{i}" for i in range(30)]
        seen = []
        with raw(target) as a, raw(DirectTarget()) as observer:
            observer.send(commands.Channel.Open(), 1)
            observer.read_method()
            a.send(commands.Channel.Open(), 1)
            a.read_method()
            for q in queues:
                a.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
                a.read_method()
            if ending == "client-close":
                a.send(commands.Connection.Close(200, "bye", 0, 0))
            elif ending == "proxy-close":  # a method on a channel not open: 504 closes it
                a.send(commands.Basic.Qos(prefetch_count=1), 7)
            else:  # the same, and the client's own Close crosses the broker's (the proxy's)
                a.send(commands.Basic.Qos(prefetch_count=1), 7)
                time.sleep(0.002)  # (the 30 deletes take longer)
                a.send(commands.Connection.Close(200, "bye", 0, 0))
            seen.append(type(a.read_method()[1]).__name__)  # (RabbitMQ ignores a crossing Close)
            observer.send(commands.Queue.Declare(queue=queues[-1], passive=True), 1)
            _, reply = observer.read_method()
            seen.append(f"{type(reply).__name__} {getattr(reply, 'reply_code', '')}".strip())
        with raw(target) as b:  # the next connection declares the name again and keeps it
            b.send(commands.Channel.Open(), 1)
            b.read_method()
            b.send(commands.Queue.Declare(queue=queues[-1], exclusive=True), 1)
            seen.append(type(b.read_method()[1]).__name__)
            time.sleep(0.3)
            b.send(commands.Queue.Declare(queue=queues[-1], passive=True), 1)
            seen.append(type(b.read_method()[1]).__name__)
        outcomes.append(seen)
    closing = "CloseOk" if ending == "client-close" else "Close"
    assert outcomes[0] == [closing, "Close 404", "DeclareOk", "DeclareOk"]
    assert outcomes[1] == outcomes[0]


def test_a_queue_declared_just_after_a_client_left_mid_declare_is_not_deleted_under_its_owner(
    proxy_factory: ProxyFactory,
) -> None:
    """A sends an exclusive declare of a name and drops its socket before the DeclareOk; B,
    on the same upstream connection, declares that name at once. The proxy deletes A's
    queue when its DeclareOk comes (A is gone): that delete must never take B's queue.
    B may get 405 while A's queue is still there (as from another connection), or the
    queue; if B gets it, B keeps it. (B's new queue was deleted under it.)"""
    p = proxy_factory("-t", "60", "--workers", "1", direct_ok=False)
    for _ in range(20):
        q = f"itest-orphan-{uuid.uuid4().hex[:8]}"
        with raw(p) as b:
            b.send(commands.Channel.Open(), 1)
            b.read_method()
            a = raw(p)
            a.send(commands.Channel.Open(), 1)
            a.read_method()
            a.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
            a.close()
            b.send(commands.Queue.Declare(queue=q, exclusive=True), 1)
            _, reply = b.read_method()
            if isinstance(reply, commands.Queue.DeclareOk):
                time.sleep(0.2)
                b.send(commands.Queue.Declare(queue=q, passive=True), 1)
                _, again = b.read_method()
                assert isinstance(again, commands.Queue.DeclareOk), "B's queue was deleted"
            else:
                assert isinstance(reply, commands.Channel.Close), reply
                assert reply.reply_code == 405, reply
