"""Methods and frames that would make RabbitMQ close (or drop) the whole connection are
stopped at the proxy, so only the client that sent them is closed, with exactly the answer
RabbitMQ gives it directly, and a pika bystander with the same credentials (hence on the same
upstream connection) carries on.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pamqp import commands, frame

from tests.support.broker import Names
from tests.support.pika_client import Bystander
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient, read_until_connection_close
from tests.support.targets import DirectTarget, ProxyFactory, Target

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
    #: Why the proxy cannot answer exactly as the broker does, and what it answers instead
    #: (a reply code); empty: it answers exactly as the broker does.
    differs: str = ""
    proxy_code: int = 0


def with_content(method_frame: bytes) -> bytes:
    return method_frame + content_header() + body()


#: Stream and quorum queues the cases declare (durable: deleted at the end of the module).
TYPED_QUEUES = Names()


@pytest.fixture(scope="module", autouse=True)
def _delete_typed_queues() -> Iterator[None]:
    yield
    TYPED_QUEUES.cleanup()


def typed_queue(queue_type: str, then: Callable[[str], bytes]) -> bytes:
    """Declare a new durable queue of that type on channel 1, then send what `then` makes."""
    q = TYPED_QUEUES.queue(f"typed-{queue_type}")
    declare = commands.Queue.Declare(queue=q, durable=True, arguments={"x-queue-type": queue_type})
    return method(declare) + then(q)


CASES = [
    # --- methods RabbitMQ answers with a connection-level error --------------------------
    Case("basic.publish immediate=true", lambda: publish(flags=2) + content_header() + body()),
    Case("basic.qos prefetch_size=1", lambda: method(commands.Basic.Qos(prefetch_size=1))),
    Case("basic.recover requeue=false", lambda: method(commands.Basic.Recover(requeue=False))),
    Case("basic.recover-async requeue=false",
         lambda: method(commands.Basic.RecoverAsync(requeue=False))),
    Case("channel.flow active=false",
         lambda: EXCLUSIVE_DECLARE + method(commands.Channel.Flow(active=False))),
    Case("channel.flow-ok never asked for",
         lambda: EXCLUSIVE_DECLARE + method(commands.Channel.FlowOk(active=True))),
    Case("basic.consume reusing a consumer tag",
         lambda: EXCLUSIVE_DECLARE
         + method(commands.Basic.Consume(queue="", consumer_tag="tag-1"))
         + method(commands.Basic.Consume(queue="", consumer_tag="tag-1"))),
    # --- methods a queue's type makes a connection-level error --------------------------------
    Case("basic.get on a stream queue",
         lambda: typed_queue("stream", lambda q: method(commands.Basic.Get(queue=q)))),
    Case("queue.purge on a stream queue",
         lambda: typed_queue("stream", lambda q: method(commands.Queue.Purge(queue=q)))),
    Case("basic.consume no_ack on a stream queue",
         lambda: typed_queue("stream", lambda q: method(commands.Basic.Qos(prefetch_count=10))
                             + method(commands.Basic.Consume(queue=q, no_ack=True)))),
    Case("queue.delete if-unused on a quorum queue",
         lambda: typed_queue("quorum",
                             lambda q: method(commands.Queue.Delete(queue=q, if_unused=True)))),
    Case("queue.delete if-empty on a quorum queue",
         lambda: typed_queue("quorum",
                             lambda q: method(commands.Queue.Delete(queue=q, if_empty=True)))),
    # --- method frames RabbitMQ cannot decode ----------------------------------------------
    Case("queue.declare with bytes after its arguments",
         lambda: raw_frame(1, 1, queue_declare_payload(b"", 8, table(b"")) + b"xx")),
    Case("basic.get with bytes after its arguments",
         lambda: raw_frame(1, 1, method(commands.Basic.Get(queue="q"))[7:-1] + b"\x00")),
    Case("channel.close without arguments",
         lambda: EXCLUSIVE_DECLARE + raw_frame(1, 1, b"\x00\x14\x00\x28")),
    Case("channel.flow without arguments",
         lambda: EXCLUSIVE_DECLARE + raw_frame(1, 1, b"\x00\x14\x00\x14")),
    Case("channel.flow with bytes after its arguments",
         lambda: EXCLUSIVE_DECLARE + raw_frame(1, 1, b"\x00\x14\x00\x14\x01\x00")),
    Case("field table with type tag 0x00",
         lambda: raw_frame(1, 1, queue_declare_payload(
             b"", 8, table(shortstr(b"x-expires") + b"\x00\x00\x00\x00\x00")))),
    Case("field table with a NaN double",
         lambda: raw_frame(1, 1, queue_declare_payload(
             b"", 8, table(shortstr(b"x-k") + b"d" + struct.pack(">d", float("nan")))))),
    Case("connection.close too short on channel 0",
         lambda: raw_frame(1, 0, b"\x00\x0a\x00\x32\x00\xc8")),
    # --- content RabbitMQ refuses on the connection ------------------------------------------
    Case("content header of another class",
         lambda: publish() + content_header(class_id=50) + body()),
    Case("content header with a weight", lambda: publish() + content_header(weight=1) + body()),
    Case("content header with undecodable properties",
         lambda: publish() + content_header(props=b"\x80\x00\x50abc") + body()),
    Case("content header with bytes after its properties",
         lambda: publish() + content_header(props=b"\x00\x00zzzz") + body()),
    Case("content header with a malformed headers table",
         lambda: publish() + content_header(props=b"\x20\x00" + table(b"\x01kZ")) + body()),
    Case("content header with an infinite float header",
         lambda: publish() + content_header(
             props=b"\x20\x00" + table(shortstr(b"k") + b"f" + struct.pack(">f", float("inf"))))
         + body()),
    Case("content header with continued property flags",
         lambda: publish() + content_header(props=b"\x00\x01\x00\x00") + body()),
    # --- what else RabbitMQ refuses on the connection ---------------------------------------
    Case("connection.close on a channel",
         lambda: method(commands.Connection.Close(200, "x", 0, 0), 1)),
    Case("connection.open on a channel", lambda: method(commands.Connection.Open("/"), 1)),
    Case("second channel.open on an open channel", lambda: method(commands.Channel.Open(), 1)),
    Case("channel.close-ok on an open channel",
         lambda: EXCLUSIVE_DECLARE + method(commands.Channel.CloseOk())),
    Case("a method only servers send",
         lambda: with_content(method(commands.Basic.Deliver("t", 1, False, "", "q")))),
    Case("queue.declare-ok from a client",
         lambda: method(commands.Queue.DeclareOk("q", 0, 0))),
    Case("unknown method of a known class", lambda: raw_frame(1, 1, b"\x00\x32\x00\x63")),
    Case("unknown class on channel 0", lambda: raw_frame(1, 0, b"\x00\x63\x00\x01")),
    Case("a channel method on channel 0", lambda: method(commands.Basic.Qos(), 0)),
    Case("method frame too short for a method id", lambda: raw_frame(1, 1, b"\x00\x32")),
    Case("method frame too short on channel 0", lambda: raw_frame(1, 0, b"\x00")),
    Case("empty method frame on channel 0", lambda: raw_frame(1, 0, b"")),
    Case("method while a message is incomplete",
         lambda: publish() + method(commands.Basic.Qos())),
    Case("channel.close while a message is incomplete",
         lambda: publish() + method(commands.Channel.Close(200, "", 0, 0))),
    Case("second content header", lambda: publish() + content_header() + content_header()),
    Case("body larger than its header announced, then a method",
         lambda: publish() + content_header(body_size=2) + body(b"abc")
         + method(commands.Basic.Qos())),
    Case("heartbeat frame on a channel", lambda: raw_frame(8, 1, b"")),
    Case("method on a channel never opened", lambda: method(commands.Queue.Declare(queue="x"), 5)),
    Case("channel.close-ok on a channel never opened",
         lambda: method(commands.Channel.CloseOk(), 5)),
    Case("content header without a method",
         lambda: content_header()),
    Case("content body without a method", lambda: body()),
    Case("content header on channel 0", lambda: raw_frame(2, 0, b"\x00\x3c\x00\x00")),
    Case("unknown frame type", lambda: raw_frame(9, 1, b"x")),
    Case("bad frame-end octet",
         lambda: method(commands.Queue.Declare(queue="x"))[:-1] + b"\x00"),
    Case("frame larger than frame_max",
         lambda: b"\x03\x00\x01" + (200000).to_bytes(4, "big") + b"x" * 200000 + b"\xce"),
    Case("body frame after a complete message",
         lambda: publish() + content_header(body_size=3) + body() + body(b"x")),
    # --- where the proxy knowingly differs (docs/differences.md) ---------------------------
    Case("channel number above the negotiated channel_max",
         lambda: method(commands.Channel.Open(), 2048),
         differs="RabbitMQ 3.10 does not enforce the channel_max it negotiated; the proxy does "
         "(each client channel holds an upstream channel)", proxy_code=504),
]  # fmt: skip


Outcome = tuple[int, str, int, int] | str


def unwrapped(text: str) -> str:
    """RabbitMQ's texts print Erlang terms with io_lib's line wrapping; the proxy's do not.
    (A typed queue's name is new for each target.)"""
    return re.sub(r"itest-typed-\w+?-[0-9a-f]+", "Q", re.sub(r"\n\s*", "", text))


def outcome(target: Target, data: bytes) -> Outcome:
    """What a client that sends `data` on a fresh connection (channel 1 open) is told: the
    Connection.Close, or "dropped" (socket closed without one), or "nothing"."""
    with open_offender(target) as c:
        c.send_raw(data)
        try:
            close, _ = read_until_connection_close(c, timeout=3)
        except (TimeoutError, OSError):
            return "nothing"
    if close is None:
        return "dropped"
    return (close.reply_code, unwrapped(close.reply_text), close.class_id, close.method_id)


def open_offender(target: Target) -> RawClient:
    c = RawClient(target.host, target.port, timeout=10)
    assert "open_ok" in c.handshake(), "handshake failed"
    c.send(commands.Channel.Open(), 1)
    assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
    return c


def upstream_ports(target: Target) -> set[int] | None:
    return target.upstream_local_ports() if isinstance(target, ProxyProcess) else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.usefixtures("require_proxy")
def test_connection_level_errors_are_the_brokers_and_stay_with_the_offender(
    shared_proxy: Target, names: Names, case: Case
) -> None:
    """The broker is the oracle: the same bytes go to RabbitMQ directly, then through the
    proxy, which must answer exactly the same (code, text, class and method), while a
    bystander on the same upstream connection notices nothing."""
    p = shared_proxy
    assert isinstance(p, ProxyProcess)
    log_offset = len(p.log_text())
    direct = outcome(DirectTarget(), case.send())
    assert case.differs or direct != "nothing", "RabbitMQ accepted it: not a connection error"
    bystander = Bystander(p, names)
    bystander.roundtrip()
    before = upstream_ports(p)
    assert before is not None and len(before) == 1
    through = outcome(p, case.send())
    bystander.roundtrip()  # raises if the shared upstream connection went away
    if case.differs:
        assert direct != through and isinstance(through, tuple), (direct, through)
        assert through[0] == case.proxy_code, through
    else:
        assert through == direct
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
