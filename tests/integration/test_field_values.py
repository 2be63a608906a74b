"""Every field-table value a client can send, as RabbitMQ reads it (rabbit_binary_parser):
in a message's headers (stored, and read by a headers exchange) and in a method's arguments.
The same bytes go to RabbitMQ directly and through the proxy: same outcome, and where the
broker refuses them on the connection, the client alone is refused and a neighbour on the
same upstream connection goes on."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pika
import pytest
from pamqp import commands, frame

from tests.support.broker import BROKER_HOST, BROKER_PORT, Names
from tests.support.pika_client import Bystander
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient, RawClosed
from tests.support.targets import DirectTarget, ProxyFactory, Target

pytestmark = pytest.mark.usefixtures("require_proxy")


def long(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def nested(tag: bytes, depth: int) -> bytes:
    """A table value (F, each holding one entry with an empty key) or an array value (A),
    nested `depth` deep."""
    value = tag + long(b"")
    for _ in range(depth):
        value = tag + long((b"\x00" if tag == b"F" else b"") + value)
    return value


VALUES: dict[str, bytes] = {
    "t": b"t\x01", "b": b"b\xff", "B": b"B\xff", "s": b"s\x80\x00", "u": b"u\xff\xff",
    "I": b"I\x80\x00\x00\x00", "i": b"i\xff\xff\xff\xff",
    "l min": b"l" + struct.pack(">q", -(2**63)), "l max": b"l" + struct.pack(">q", 2**63 - 1),
    "L": b"L" + struct.pack(">q", -1), "L max": b"L" + struct.pack(">q", 2**63 - 1),
    "f": b"f" + struct.pack(">f", 1.5), "f -0": b"f" + struct.pack(">f", -0.0),
    "f NaN": b"f" + struct.pack(">f", float("nan")),
    "f +inf": b"f" + struct.pack(">f", float("inf")),
    "f -inf": b"f" + struct.pack(">f", float("-inf")),
    "d": b"d" + struct.pack(">d", 2.5), "d max": b"d" + struct.pack(">d", 1.7976931348623157e308),
    "d NaN": b"d" + struct.pack(">d", float("nan")),
    "d +inf": b"d" + struct.pack(">d", float("inf")),
    "d -inf": b"d" + struct.pack(">d", float("-inf")),
    "D": b"D\x02" + struct.pack(">I", 12345), "T max": b"T" + struct.pack(">Q", 2**64 - 1),
    "V": b"V", "S empty": b"S" + long(b""), "S": b"S" + long("héllo".encode()),
    "S large": b"S" + long(b"s" * 120_000), "x": b"x" + long(b"\x00\xff\xce"),
    "A empty": b"A" + long(b""), "F empty": b"F" + long(b""),
    "A mixed": b"A" + long(b"t\x01" + b"S" + long(b"a") + b"V" + b"F" + long(b"")),
    "F nested 15000": nested(b"F", 15000),
    "A nested 20000": nested(b"A", 20000),
    "U unknown tag": b"U\x00\x01", "Z unknown tag": b"Z",
    "S past the table": b"S" + struct.pack(">I", 99) + b"ab",
}  # fmt: skip


#: What RabbitMQ's parser does not read (Erlang's float pattern fails on NaN and infinities).
REFUSED = {name for name in VALUES if "NaN" in name or "inf" in name or "unknown" in name}
REFUSED.add("S past the table")


def refused(result: list[Any]) -> bool:
    return any(r == "dropped" or (isinstance(r, tuple) and r[0] == "closed") for r in result)


def table(key: bytes, value: bytes) -> bytes:
    return long(bytes([len(key)]) + key + value)


def raw_frame(ftype: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + b"\xce"


def read_raw(c: RawClient) -> tuple[int, bytes]:
    """The next frame as (type, payload), skipping heartbeats."""
    while True:
        c._fill(7)
        ftype, _, size = struct.unpack_from(">BHI", c.buf)
        data = c.read_exact(7 + size + 1)
        if ftype != 8:
            return ftype, data[7:-1]


def outcome(target: Target, setup: bytes, stop: bytes) -> Any:
    """Send `setup` on channel 1, then read until a frame whose payload starts with `stop`
    (the reply that ends the scenario): the payloads of the methods and content headers seen
    (bodies skipped), or how the connection ended."""
    seen: list[Any] = []
    with RawClient(target.host, target.port) as c:
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        c.read_method()
        c.send_raw(setup)
        c.sock.settimeout(5)
        try:
            while True:
                ftype, payload = read_raw(c)
                if ftype == 1 and payload[:4] == b"\x00\x0a\x00\x32":  # Connection.Close
                    close = frame.unmarshal(raw_frame(1, 0, payload))[2]
                    seen.append(("closed", close.reply_code, close.reply_text))
                    return seen
                if ftype in (1, 2):
                    seen.append((ftype, payload))
                if ftype == 1 and payload[:4] == stop:
                    return seen
        except RawClosed:
            seen.append("dropped")
        except TimeoutError:
            seen.append("nothing more")
    return seen


def publish(exchange: str, routing_key: str, headers: bytes) -> bytes:
    method = frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)
    props = struct.pack(">HHQH", 60, 0, 3, 0x2000) + headers
    return method + raw_frame(2, 1, props) + raw_frame(3, 1, b"abc")


GET = frame.marshal(commands.Basic.Get(queue="", no_ack=True), 1)
GET_REPLIES = (b"\x00\x3c\x00\x47", b"\x00\x3c\x00\x48")  # GetOk, GetEmpty


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.proxy import ProxyProcess

    p = ProxyProcess(tmp_path_factory.mktemp("values") / "proxy.log", ("-t", "60"))
    p.start()
    yield p
    p.stop()


@pytest.mark.parametrize("name", list(VALUES))
def test_header_values_stored_and_routed_as_directly(
    proxy: ProxyProcess, names: Names, name: str
) -> None:
    value = VALUES[name]
    broker = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    bch = broker.channel()
    x, q = names.exchange("values"), names.queue("values")
    bch.exchange_declare(x, "headers")
    bch.queue_declare(q)
    bch.queue_bind(q, x, arguments={"x-match": "any", "k": "never"})
    bystander = Bystander(proxy, names)
    bystander.roundtrip()
    before = proxy.upstream_local_ports()
    results = []
    for target in (DirectTarget(), proxy):
        headers = table(b"k", value)
        results.append(
            outcome(
                target,
                # stored as they are, then through a headers exchange, which reads them
                publish("", q, headers) + publish(x, "", headers)
                + frame.marshal(commands.Basic.Get(queue=q, no_ack=True), 1),
                GET_REPLIES[0],
            )
        )  # fmt: skip
        bch.queue_purge(q)
    direct, through = results
    assert through == direct
    assert refused(direct) == (name in REFUSED), direct
    bystander.roundtrip()
    assert proxy.upstream_local_ports() == before
    bystander.close()
    broker.close()


@pytest.mark.parametrize("name", list(VALUES))
def test_argument_values_as_directly(proxy: ProxyProcess, names: Names, name: str) -> None:
    value = VALUES[name]
    bystander = Bystander(proxy, names)
    before = proxy.upstream_local_ports()
    results = []
    for target in (DirectTarget(), proxy):
        q = f"itest-args-{uuid.uuid4().hex[:8]}"
        declare = (
            struct.pack(">HHH", 50, 10, 0) + bytes([len(q)]) + q.encode()
            + bytes([0b01000])  # auto-delete
            + table(b"x-k", value)
        )  # fmt: skip
        results.append(outcome(target, raw_frame(1, 1, declare), b"\x00\x32\x00\x0b"))
    direct, through = [
        [r if isinstance(r, str) or r[0] == "closed" else (r[0], r[1][:4]) for r in result]
        for result in results
    ]  # (a DeclareOk names its queue, which differs)
    assert through == direct
    assert refused(direct) == (name in REFUSED), direct
    bystander.roundtrip()
    assert proxy.upstream_local_ports() == before
    bystander.close()


@pytest.mark.parametrize("exchange", ["itest-values-missing", "amq.direct", ""])
def test_unreadable_properties_answered_as_directly(proxy: ProxyProcess, exchange: str) -> None:
    """RabbitMQ looks the exchange up before it reads a message's properties: a NaN header
    sent to a missing exchange is the channel's 404, to an existing one the connection's 541.
    A later publish on the same connection tells whether the proxy kept reading in order."""
    nan = table(b"k", b"d" + struct.pack(">d", float("nan")))
    setup = publish(exchange, "k", nan) + publish("", "k", b"")
    results = [
        outcome(target, setup, b"\x00\x14\x00\x28")  # Channel.Close
        for target in (DirectTarget(), proxy)
    ]
    assert results[1] == results[0]
    closed = results[0][-1][0] == "closed"
    assert closed == (exchange != "itest-values-missing"), results[0]


def test_the_channel_of_a_client_closed_for_unreadable_properties_serves_one_client(
    proxy_factory: ProxyFactory,
) -> None:
    """The 541 for unreadable properties gives the client's channels back while the broker's
    answer that decided it is being handled: the upstream channel is parked once. (It was
    parked twice, and handed to two later clients at once: one got the other's replies.)"""
    proxy = proxy_factory("--workers", "1", direct_ok=False)
    nan = table(b"k", b"d" + struct.pack(">d", float("nan")))
    ended = outcome(proxy, publish("amq.direct", "k", nan), b"\x00\x14\x00\x28")
    assert ended[-1][:2] == ("closed", 541), ended
    clients = [RawClient(proxy.host, proxy.port, timeout=5) for _ in range(2)]
    for c in clients:
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
    for c in clients:
        c.send(commands.Queue.Declare(queue="", exclusive=True), 1)
    names = []
    for c in clients:
        _, reply = c.read_method()  # each its own reply, none for the other
        assert isinstance(reply, commands.Queue.DeclareOk), reply
        names.append(reply.queue)
        c.close()
    assert len(set(names)) == 2


def test_unreadable_properties_to_an_exchange_name_pamqp_refuses_are_answered_as_directly(
    proxy: Any,
) -> None:
    """A message with unreadable properties, to an exchange whose name has a character pamqp
    will not encode (a NUL): RabbitMQ looks the name up as it is. The proxy's own lookup of
    the exchange crashed building its request (541 "proxy error"). Found by the fuzz test."""
    name = b"\x00test-fuzz-a"
    method = (
        struct.pack(">HHH", 60, 40, 0) + bytes([len(name)]) + name + b"\x01k" + b"\x00"
    )  # Basic.Publish(exchange=name, routing_key="k")
    header = struct.pack(">HHQ", 60, 0, 0)  # no property flags at all: unreadable
    setup = raw_frame(1, 1, method) + raw_frame(2, 1, header)
    stop = b"\x00\x14\x00\x28"  # Channel.Close
    direct = outcome(DirectTarget(), setup, stop)
    assert outcome(proxy, setup, stop) == direct
    assert direct[-1][0] == "closed" or direct[-1][0] == 1, direct
