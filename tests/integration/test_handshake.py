"""The server side of the AMQP handshake as the proxy speaks it (raw sockets + pamqp)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pamqp import commands

from tests.support.broker import Names, queue_counts
from tests.support.raw_client import AMQP_HEADER, RawClient, RawClosed
from tests.support.targets import DirectTarget, ProxyFactory, Target

PHP_DIR = Path(__file__).parent / "php"

CAPABILITIES = [
    "publisher_confirms",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "exchange_exchange_bindings",
    "authentication_failure_close",
    "per_consumer_qos",
    "direct_reply_to",
]


@pytest.mark.parametrize(
    "bad_header",
    [
        b"HTTP/1.1",  # not AMQP at all
        b"AMQP\x03\x01\x00\x00",  # AMQP 1.0 (SASL) header
        b"AMQP\x00\x00\x08\x00",  # AMQP 0-8
    ],
)
def test_wrong_protocol_header_gets_091_header_and_close(proxy: Target, bad_header: bytes) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        c.send_raw(bad_header)
        data = c.read_until_closed()
    assert data == AMQP_HEADER


def test_connection_start_properties(proxy: Target) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        c.send_raw(AMQP_HEADER)
        ch, start = c.read_method()
    assert ch == 0
    assert isinstance(start, commands.Connection.Start)
    assert (start.version_major, start.version_minor) == (0, 9)
    mechanisms = start.mechanisms.split()
    assert "PLAIN" in mechanisms
    assert "AMQPLAIN" in mechanisms
    assert "en_US" in start.locales.split()
    props = start.server_properties
    assert isinstance(props.get("product"), str | bytes) and props["product"]
    caps = props["capabilities"]
    for cap in CAPABILITIES:
        assert caps.get(cap) is True, f"capability {cap} is {caps.get(cap)!r}: {caps}"


@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_full_raw_handshake(proxy: Target, mechanism: str) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        res = c.handshake("guest", "guest", "/", mechanism=mechanism)
        assert "close" not in res, res.get("close")
        tune = res["tune"]
        assert tune.heartbeat > 0, "the proxy must propose a heartbeat to clients"
        assert tune.frame_max >= 4096
        assert tune.channel_max > 0
        assert isinstance(res["open_ok"], commands.Connection.OpenOk)
        # the connection really works: open a channel, declare a server-named queue
        c.send(commands.Channel.Open(), 1)
        ch, m = c.read_method()
        assert (ch, type(m)) == (1, commands.Channel.OpenOk)
        c.send(commands.Queue.Declare(queue="", exclusive=True, auto_delete=True), 1)
        ch, m = c.read_method()
        assert ch == 1 and isinstance(m, commands.Queue.DeclareOk), m
        assert m.queue.startswith("amq.gen-")
        c.send(commands.Queue.Delete(queue=m.queue), 1)
        ch, m = c.read_method()
        assert ch == 1 and isinstance(m, commands.Queue.DeleteOk), m
        # and closes cleanly
        c.send(commands.Connection.Close(200, "bye", 0, 0))
        ch, m = c.read_method()
        assert (ch, type(m)) == (0, commands.Connection.CloseOk)


def test_heartbeat_from_tune_is_honoured_on_raw_socket(proxy_factory: ProxyFactory) -> None:
    """With heartbeat 1 accepted in TuneOk, the server side sends heartbeat frames."""
    from pamqp import heartbeat as hb

    p = proxy_factory("--client-heartbeat", "1")
    with RawClient(p.host, p.port, timeout=6) as c:
        res = c.handshake(heartbeat_s=1)
        assert "open_ok" in res
        ch, f = c.read_frame()  # nothing else is due on an idle connection
        assert ch == 0 and isinstance(f, hb.Heartbeat), f


def test_php_amqplib_amqplain_handshake(proxy: Target, names: Names) -> None:
    """php-amqplib logs in with AMQPLAIN by default; publish + get work byte-exact."""
    import pika

    q = names.queue("amqplib")
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    conn.channel().queue_declare(q)
    conn.close()
    body = bytes(range(256)) * 3 + b"\x00end"
    res = subprocess.run(
        [
            "php",
            str(PHP_DIR / "amqplib_roundtrip.php"),
            proxy.host,
            str(proxy.port),
            "guest",
            "guest",
            "/",
            q,
            body.hex(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["connected"] is True, out
    assert bytes.fromhex(out["body_hex"]) == body
    assert out["content_type"] == "application/octet-stream"
    assert out["message_id"] == "php-amqplib-1"
    assert queue_counts(q) == (0, 0)


def tune_outcome(target: Target, channel_max: int, frame_max: int) -> str:
    """What the server does with this TuneOk: "OpenOk", a Close's code, or "dropped"."""
    from pamqp import frame

    with RawClient(target.host, target.port, timeout=10) as c:
        c.send_raw(AMQP_HEADER)
        c.read_method()
        c.send(commands.Connection.StartOk({}, "PLAIN", "\0guest\0guest", "en_US"))
        c.read_method()
        c.send_raw(
            frame.marshal(commands.Connection.TuneOk(channel_max, frame_max, 0), 0)
            + frame.marshal(commands.Connection.Open("/"), 0)
        )
        try:
            _, answer = c.read_method()
        except (RawClosed, OSError):
            return "dropped"
        return (
            type(answer).__name__ if not hasattr(answer, "reply_code") else str(answer.reply_code)
        )


@pytest.mark.parametrize(
    ("channel_max", "frame_max"),
    [
        (0, 131072),
        (2048, 131072),
        (2047, 0),
        (2047, 131073),
        (2047, 4095),
        (1, 4096),
        (2047, 131072),
    ],
)
def test_tune_ok_values_are_taken_or_refused_as_the_broker_does(
    proxy: Target, channel_max: int, frame_max: int
) -> None:
    """RabbitMQ drops the connection for a TuneOk outside what its Tune offered (0 meaning
    "no limit", so above it); the proxy offers the same and must do the same."""
    direct = tune_outcome(DirectTarget(), channel_max, frame_max)
    assert tune_outcome(proxy, channel_max, frame_max) == direct
    acceptable = (channel_max, frame_max) in ((1, 4096), (2047, 131072))
    assert (direct == "OpenOk") == acceptable, direct


def test_a_large_frame_pipelined_behind_the_handshake_is_taken(proxy: Target, names: Names) -> None:
    """A client that sends TuneOk, Open, Channel.Open and a publish whose body frame exceeds
    the 4 096 bytes allowed before Tune, all in one write: the broker applies the frame_max
    of the TuneOk to the frames after it, and so must the proxy, which answers the Open of
    known credentials at once (without pausing) and so reads them in the same pass."""
    import pika
    from pamqp import body as pbody
    from pamqp import frame as pframe
    from pamqp import header

    queue = names.queue("pipelined")
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    conn.channel().queue_declare(queue)
    conn.close()
    message = bytes(range(256)) * 20  # 5 120 bytes: one body frame over 4 096
    with RawClient(proxy.host, proxy.port) as known:
        assert "open_ok" in known.handshake()  # these credentials have a live pool now
        with RawClient(proxy.host, proxy.port) as c:
            c.send_raw(AMQP_HEADER)
            assert isinstance(c.read_method()[1], commands.Connection.Start)
            c.send(commands.Connection.StartOk({"product": "pipelined"}, "PLAIN", "\0guest\0guest"))
            _, tune = c.read_method()
            assert isinstance(tune, commands.Connection.Tune) and tune.frame_max >= 8192
            c.send_raw(
                pframe.marshal(commands.Connection.TuneOk(tune.channel_max, 8192, 0), 0)
                + pframe.marshal(commands.Connection.Open("/"), 0)
                + pframe.marshal(commands.Channel.Open(), 1)
                + pframe.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1)
                + pframe.marshal(
                    header.ContentHeader(0, len(message), commands.Basic.Properties()), 1
                )
                + pframe.marshal(pbody.ContentBody(message), 1)
                + pframe.marshal(commands.Channel.Close(200, "done", 0, 0), 1)
            )
            replies = [c.read_method() for _ in range(3)]
            assert [(ch, type(m)) for ch, m in replies] == [
                (0, commands.Connection.OpenOk),
                (1, commands.Channel.OpenOk),
                (1, commands.Channel.CloseOk),
            ], replies
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        method, _, body = conn.channel().basic_get(queue, auto_ack=True)
        assert method is not None and body == message
    finally:
        conn.close()
