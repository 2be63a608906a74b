"""Issue 4, isolation rules not covered by test_protocol_isolation.py: methods and frames that
would make RabbitMQ close (or drop) the whole connection are stopped at the proxy, so only
the client that sent them is closed, and a pika bystander with the same credentials (hence on
the same upstream connection) carries on.

Each case also names what RabbitMQ itself answers (checked with ``--direct``): the proxy should
answer like RabbitMQ where it can, and RabbitMQ's answer proves that the input really is a
connection-level error, i.e. that forwarding it would hurt the neighbours.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pamqp import commands, frame

from .helpers import (
    REPLY_NAMES,
    Bystander,
    DirectTarget,
    Names,
    ProxyFactory,
    ProxyProcess,
    RawClient,
    Target,
    read_until_connection_close,
)

# pamqp warns about the deprecated Basic.RecoverAsync a case sends on purpose
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def _module_proxy(tmp_path_factory: pytest.TempPathFactory, direct_mode: bool) -> Iterator[Target]:
    if direct_mode:
        yield DirectTarget()
        return
    p = ProxyProcess(tmp_path_factory.mktemp("isolation") / "proxy.log", ("-t", "60"))
    p.start()
    yield p
    p.stop()


@pytest.fixture
def shared_proxy(_module_proxy: Target, request: pytest.FixtureRequest) -> Iterator[Target]:
    """One proxy for the module (a case that breaks the upstream connection does not break
    the next: each compares with the connection it started with); its log lines of a failed
    test are printed."""
    p = _module_proxy
    if isinstance(p, ProxyProcess):
        assert p.running, p.log_text()[-3000:]
    offset = len(p.log_text())
    yield p
    p.close_clients()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n===== proxy log since the test started =====\n{p.log_text()[offset:][-5000:]}")


def raw_frame(ftype: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes([end])


def method(m: object, channel: int = 1) -> bytes:
    return bytes(frame.marshal(m, channel))


def shortstr(text: bytes) -> bytes:
    return bytes([len(text)]) + text


def publish(flags: int = 0, exchange: bytes = b"", routing_key: bytes = b"itest-nowhere") -> bytes:
    payload = struct.pack(">HHH", 60, 40, 0) + shortstr(exchange) + shortstr(routing_key)
    return raw_frame(1, 1, payload + bytes([flags]))


def content_header(
    body_size: int = 3, class_id: int = 60, weight: int = 0, props: bytes = b"\x00\x00"
) -> bytes:
    return raw_frame(2, 1, struct.pack(">HHQ", class_id, weight, body_size) + props)


def body(data: bytes = b"abc") -> bytes:
    return raw_frame(3, 1, data)


def table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def queue_declare_payload(name: bytes, bits: int, arguments: bytes) -> bytes:
    return struct.pack(">HHH", 50, 10, 0) + shortstr(name) + bytes([bits]) + arguments


#: Queue.Declare so that the channel is not a "safe" (publish-only) channel any more
EXCLUSIVE_DECLARE = method(commands.Queue.Declare(queue="", exclusive=True))


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[], bytes]
    #: reply codes the proxy may answer with (RabbitMQ's own first)
    proxy_codes: frozenset[int]
    #: RabbitMQ's answer on a direct connection (0: it drops the socket without a Close)
    rabbitmq_code: int


CASES = [
    # --- methods RabbitMQ answers with a connection-level error --------------------------
    Case("basic.publish immediate=true",
         lambda: publish(flags=2) + content_header() + body(), frozenset({540}), 540),
    Case("basic.qos prefetch_size=1",
         lambda: method(commands.Basic.Qos(prefetch_size=1)), frozenset({540}), 540),
    Case("basic.recover requeue=false",
         lambda: method(commands.Basic.Recover(requeue=False)), frozenset({540}), 540),
    Case("basic.recover-async requeue=false",
         lambda: method(commands.Basic.RecoverAsync(requeue=False)), frozenset({540}), 540),
    Case("channel.flow active=false",
         lambda: EXCLUSIVE_DECLARE + method(commands.Channel.Flow(active=False)),
         frozenset({540}), 540),
    Case("channel.flow-ok never asked for",
         lambda: EXCLUSIVE_DECLARE + method(commands.Channel.FlowOk(active=True)),
         frozenset({503}), 503),
    Case("basic.consume reusing a consumer tag",
         lambda: EXCLUSIVE_DECLARE
         + method(commands.Basic.Consume(queue="", consumer_tag="tag-1"))
         + method(commands.Basic.Consume(queue="", consumer_tag="tag-1")),
         frozenset({530}), 530),
    # --- method frames RabbitMQ cannot decode ----------------------------------------------
    Case("queue.declare with bytes after its arguments",
         lambda: raw_frame(1, 1, queue_declare_payload(b"", 8, table(b"")) + b"xx"),
         frozenset({501, 502}), 501),
    Case("basic.get with bytes after its arguments",
         lambda: raw_frame(1, 1, method(commands.Basic.Get(queue="q"))[7:-1] + b"\x00"),
         frozenset({501, 502}), 501),
    Case("channel.close without arguments",
         lambda: EXCLUSIVE_DECLARE + raw_frame(1, 1, b"\x00\x14\x00\x28"),
         frozenset({501, 502}), 501),
    Case("channel.flow without arguments",
         lambda: EXCLUSIVE_DECLARE + raw_frame(1, 1, b"\x00\x14\x00\x14"),
         frozenset({501, 502}), 501),
    Case("channel.flow with bytes after its arguments",
         lambda: EXCLUSIVE_DECLARE + raw_frame(1, 1, b"\x00\x14\x00\x14\x01\x00"),
         frozenset({501, 502}), 501),
    Case("field table with type tag 0x00",
         lambda: raw_frame(1, 1, queue_declare_payload(
             b"", 8, table(shortstr(b"x-expires") + b"\x00\x00\x00\x00\x00"))),
         frozenset({502}), 0),
    # --- content RabbitMQ refuses on the connection ------------------------------------------
    Case("content header of another class",
         lambda: publish() + content_header(class_id=50) + body(), frozenset({505}), 505),
    Case("content header with a weight",
         lambda: publish() + content_header(weight=1) + body(), frozenset({505}), 505),
    Case("content header with undecodable properties",
         lambda: publish() + content_header(props=b"\x80\x00\x50abc") + body(),
         frozenset({502, 501}), 541),
    Case("content header with bytes after its properties",
         lambda: publish() + content_header(props=b"\x00\x00zzzz") + body(),
         frozenset({502, 501}), 541),
    Case("content header with a malformed headers table",
         lambda: publish() + content_header(props=b"\x20\x00" + table(b"\x01kZ")) + body(),
         frozenset({502, 501}), 541),
    # --- what the proxy checks itself (not in test_protocol_isolation.py) ---------------------
    Case("connection.close on a channel",
         lambda: method(commands.Connection.Close(200, "x", 0, 0), 1), frozenset({503}), 503),
    Case("connection.open on a channel",
         lambda: method(commands.Connection.Open("/"), 1), frozenset({503}), 503),
    Case("second channel.open on an open channel",
         lambda: method(commands.Channel.Open(), 1), frozenset({504}), 504),
    Case("channel number above the negotiated channel_max",
         lambda: method(commands.Channel.Open(), 2048), frozenset({504}), 0),
    Case("a method only servers send",
         lambda: method(commands.Basic.Deliver("t", 1, False, "", "q")), frozenset({503}), 0),
    Case("unknown method of a known class",
         lambda: raw_frame(1, 1, b"\x00\x32\x00\x63"), frozenset({503, 540}), 0),
    Case("method frame too short for a method id",
         lambda: raw_frame(1, 1, b"\x00\x32"), frozenset({501, 502}), 501),
    Case("method frame too short on channel 0",
         lambda: raw_frame(1, 0, b"\x00"), frozenset({501, 502}), 501),
    Case("empty method frame on channel 0",
         lambda: raw_frame(1, 0, b""), frozenset({501, 502}), 501),
    Case("method while a message is incomplete",
         lambda: publish() + method(commands.Basic.Qos()), frozenset({505}), 505),
    Case("body larger than its header announced",
         lambda: publish() + content_header(body_size=2) + body(b"abc"),
         frozenset({501, 505}), 0),
    Case("heartbeat frame on a channel",
         lambda: raw_frame(8, 1, b""), frozenset({501, 505}), 505),
]  # fmt: skip


def open_offender(target: Target) -> RawClient:
    c = RawClient(target.host, target.port, timeout=10)
    assert "open_ok" in c.handshake(), "handshake failed"
    c.send(commands.Channel.Open(), 1)
    assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
    return c


def upstream_ports(target: Target) -> set[int] | None:
    return target.upstream_local_ports() if isinstance(target, ProxyProcess) else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_connection_level_errors_stay_with_the_offender(
    shared_proxy: Target, names: Names, case: Case
) -> None:
    p = shared_proxy
    log_offset = len(p.log_text())
    bystander = Bystander(p, names)
    bystander.roundtrip()
    before = upstream_ports(p)
    assert before is None or len(before) == 1
    with open_offender(p) as c:
        c.send_raw(case.send())
        try:
            close, _ = read_until_connection_close(c, timeout=5)
        except TimeoutError:
            close = None
    code = close.reply_code if close is not None else 0
    bystander.roundtrip()  # raises if the shared upstream connection went away
    if p.direct:
        assert code == case.rabbitmq_code, (close and close.reply_text) or "dropped"
    else:
        assert code in case.proxy_codes, (code, close and close.reply_text)
        assert close.reply_text.startswith(REPLY_NAMES[code]), close.reply_text
        assert upstream_ports(p) == before, "the shared upstream connection was replaced"
        assert "Traceback" not in p.log_text()[log_offset:]
    bystander.close()


@pytest.mark.parametrize("leave", ["connection.close", "socket drop", "frame error"])
def test_a_channel_the_broker_closes_twice_does_not_cost_the_neighbours(
    proxy_factory: ProxyFactory, names: Names, leave: str
) -> None:
    """RabbitMQ answers each pipelined Basic.Consume/Queue.Bind naming queue '' (the last
    declared one, here none) with its own Channel.Close 404. A client that leaves right
    after such a burst must not make the proxy answer both: a second Channel.CloseOk on a
    channel the broker already forgot is a connection error (504) on the shared connection."""
    p = proxy_factory("-t", "60", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    bystander = Bystander(p, names)
    bystander.roundtrip()
    before = p.upstream_local_ports()
    for _ in range(3):
        c = open_offender(p)
        c.send_raw(method(commands.Basic.Consume(queue="")) * 3)
        if leave == "connection.close":
            c.send(commands.Connection.Close(200, "bye", 0, 0))
            while not isinstance(c.read_method()[1], commands.Connection.CloseOk):
                pass  # the broker's Channel.Close frames may come first
        elif leave == "frame error":
            c.send_raw(raw_frame(1, 1, b"\x00\x3c\x00\x0a", end=0))
            close, _ = read_until_connection_close(c, timeout=5)
            assert close is not None and close.reply_code == 501, close
        c.close()
        time.sleep(0.2)  # the broker's closes and the proxy's answers cross meanwhile
        bystander.roundtrip()
        assert p.upstream_local_ports() == before, "the shared upstream connection was replaced"
    bystander.close()


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(table(shortstr(b"x-message-ttl") + b"Z" + b"\x00" * 4), id="unknown tag"),
        pytest.param(struct.pack(">I", 40) + shortstr(b"k") + b"t\x01", id="length too long"),
        pytest.param(
            table(shortstr(b"k") + b"S" + struct.pack(">I", 99) + b"ab"),
            id="string longer than the table",
        ),
        pytest.param(
            table(shortstr(b"k") + b"F" + struct.pack(">I", 2) + b"\x05k"),
            id="nested table cut short",
        ),
        pytest.param(table(b"\x09x-expires"), id="key without a value"),
    ],
)
@pytest.mark.parametrize("where", ["queue.declare", "basic.consume", "exchange.declare"])
@pytest.mark.usefixtures("require_proxy")
def test_malformed_field_table_is_502_for_that_client_only(
    shared_proxy: Target, names: Names, arguments: bytes, where: str
) -> None:
    p = shared_proxy
    assert isinstance(p, ProxyProcess)
    bystander = Bystander(p, names)
    before = p.upstream_local_ports()
    if where == "queue.declare":
        payload = queue_declare_payload(b"itest-badtable", 0, arguments)
    elif where == "basic.consume":
        payload = (
            (struct.pack(">HHH", 60, 20, 0) + shortstr(bystander.queue.encode()) + shortstr(b""))
            + b"\x00"
            + arguments
        )
    else:
        payload = (
            (struct.pack(">HHH", 40, 10, 0) + shortstr(b"itest-badtable") + shortstr(b"direct"))
            + b"\x00"
            + arguments
        )
    with open_offender(p) as c:
        c.send_raw(raw_frame(1, 1, payload))
        close, _ = read_until_connection_close(c, timeout=5)
    assert close is not None
    name = {"queue.declare": "Queue.Declare", "basic.consume": "Basic.Consume"}.get(
        where, "Exchange.Declare"
    )
    assert (close.reply_code, close.reply_text.split(":")[0]) == (
        502,
        f"SYNTAX_ERROR - malformed {name}",
    )
    bystander.roundtrip()
    assert p.upstream_local_ports() == before
    bystander.close()
