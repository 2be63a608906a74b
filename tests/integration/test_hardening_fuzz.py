"""Hostile clients, fuzzed: thousands of random and mutated frame sequences from many
connections, while honest pika clients with the same credentials, hence on the same upstream
connection, publish with confirms and consume.

What must hold (issue 4, "no client can hurt another"):
- the honest clients see no error at all and lose nothing: every confirmed message is
  consumed, exactly once, never redelivered;
- every hostile connection ends with a Connection.Close carrying a hard-error reply code whose
  text names it (or, for garbage instead of a protocol header or during the handshake, with a
  plain close), never with a hang;
- the shared upstream connection is never replaced and the proxy never logs an internal error;
- the worker's resident memory stays within +50 MB;
- exclusive queues of hostile clients do not outlive them.

Hypothesis generates the sequences and shrinks a failing one to a minimal example; every
example is checked on its own (a sentinel client on the same upstream connection makes two
round trips after it), so the falsifying example it prints is the culprit.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header
from pamqp import encode as pencode

from .helpers import (
    AMQP_HEADER,
    HARD_ERRORS,
    REPLY_NAMES,
    SOFT_ERRORS,
    ProxyFactory,
    ProxyProcess,
    RabbitAdmin,
    RawClient,
    RawClosed,
    RssSampler,
    http_request,
    rabbitmqctl,
    read_until_connection_close,
    unique,
    wait_for,
)

pytestmark = [
    pytest.mark.usefixtures("require_proxy"),
    # pamqp warns about the deprecated methods the hostile clients send on purpose
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: Hypothesis examples (each is 1..4 hostile connections) and the wall-clock budget for them.
MAX_EXAMPLES = int(os.environ.get("AMQPROXY_FUZZ_EXAMPLES", "2000"))
BUDGET_S = float(os.environ.get("AMQPROXY_FUZZ_SECONDS", "40"))
#: Fewest hostile connections a run must have made ("thousands of sequences").
MIN_CONNECTIONS = min(2000, MAX_EXAMPLES)
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
FRAME_MAX = 131072  # the proxy's (and RabbitMQ's default) frame_max
HOSTILE_TIMEOUT = 8.0

# --------------------------------------------------------------------------- frame building


def raw_frame(ftype: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes([end])


def method_frame(method: Any, channel: int) -> bytes:
    try:
        return bytes(frame.marshal(method, channel))
    except (TypeError, ValueError, struct.error, OverflowError):  # a value pamqp cannot encode
        return bytes(frame.marshal(commands.Queue.Declare(queue="itest-fuzz-a"), channel))


def shortstr(text: bytes) -> bytes:
    return bytes([len(text)]) + text


def publish_payload(exchange: str, routing_key: str, flags: int) -> bytes:
    return (
        struct.pack(">HHH", 60, 40, 0)
        + shortstr(exchange.encode())
        + shortstr(routing_key.encode())
        + bytes([flags])
    )


#: Every method id pamqp knows, plus a few it does not.
KNOWN_IDS = sorted(commands.INDEX_MAPPING)
EXTRA_IDS = [0x000A0046, 0x000A0047, 0x00550001, 0x003C0064, 0x00000000, 0xFFFFFFFF]

NAMES = ["itest-fuzz-a", "itest-fuzz-b", "itest-fuzz-c", "", "amq.direct", "amq.gen-zz"]
names = st.sampled_from(NAMES)
tags = st.sampled_from(["", "t1", "t1", "t2"])  # "t1" twice: consumer tag reuse is likely
exchange_types = st.sampled_from(
    ["direct", "fanout", "topic", "headers"] * 3 + ["x-nonexistent", "", "Direct"]
)
ARG_KEYS = [
    "x-message-ttl", "x-expires", "x-max-length", "x-dead-letter-exchange", "x-max-priority",
    "x-priority", "alternate-exchange", "x-match", "x-queue-type", "x-overflow",
    "x-single-active-consumer", "x-queue-mode", "x-cancel-on-ha-failover", "k",
]  # fmt: skip
table_values = st.recursive(
    st.one_of(
        st.integers(-(2**31), 2**31 - 1),
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        st.sampled_from(["classic", "bogus", "reject-publish", "lazy", "all", "any", "1000"]),
        st.text(max_size=6),
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.none(),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=4,
)
tables = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(ARG_KEYS) | st.text(max_size=5), table_values, max_size=3),
)


@st.composite
def table_bytes(draw: st.DrawFn) -> bytes:
    """An encoded field table, often corrupted (bad type tag, bad lengths, cut short)."""
    value = draw(tables) or {}
    try:
        data = bytearray(pencode.field_table(value))
    except (TypeError, ValueError, struct.error):
        data = bytearray(b"\x00\x00\x00\x00")
    how = draw(st.sampled_from(["keep", "keep", "tag", "byte", "length", "cut", "append"]))
    if how == "tag" and len(data) > 4:
        key_len = data[4] if len(data) > 5 else 0
        pos = min(len(data) - 1, 5 + key_len)
        data[pos] = draw(st.sampled_from(b"ZzLUcXyo\x00\xff"))
    elif how == "byte" and len(data) > 4:
        data[draw(st.integers(4, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "length":
        data[0:4] = struct.pack(">I", draw(st.integers(0, len(data) + 8)))
    elif how == "cut" and len(data) > 4:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


def _safe(build: Callable[[], Any], fallback: Any) -> Any:
    try:
        return build()
    except (TypeError, ValueError, struct.error, OverflowError):
        return fallback


@st.composite
def methods(draw: st.DrawFn) -> Any:
    """A well-formed client-side (or deliberately server-side) method object."""
    b = st.booleans()
    kind = draw(st.integers(0, 27))
    if kind == 0:
        return _safe(
            lambda: commands.Queue.Declare(
                queue=draw(names), passive=draw(b), durable=draw(b), exclusive=draw(b),
                auto_delete=draw(b), nowait=draw(b), arguments=draw(tables),
            ),
            commands.Queue.Declare(queue="itest-fuzz-a", exclusive=True),
        )  # fmt: skip
    if kind == 1:
        return commands.Queue.Bind(
            queue=draw(names), exchange=draw(names), routing_key=draw(names), nowait=draw(b)
        )
    if kind == 2:
        return commands.Queue.Unbind(queue=draw(names), exchange=draw(names))
    if kind == 3:
        return commands.Queue.Purge(queue=draw(names), nowait=draw(b))
    if kind == 4:
        return commands.Queue.Delete(
            queue=draw(names), if_unused=draw(b), if_empty=draw(b), nowait=draw(b)
        )
    if kind == 5:
        return _safe(
            lambda: commands.Exchange.Declare(
                exchange=draw(names), exchange_type=draw(exchange_types), passive=draw(b),
                durable=draw(b), auto_delete=draw(b), internal=draw(b), nowait=draw(b),
                arguments=draw(tables),
            ),
            commands.Exchange.Declare(exchange="itest-fuzz-a"),
        )  # fmt: skip
    if kind == 6:
        return commands.Exchange.Delete(exchange=draw(names), if_unused=draw(b))
    if kind == 7:
        return commands.Exchange.Bind(
            destination=draw(names), source=draw(names), routing_key=draw(names)
        )
    if kind == 8:
        return commands.Basic.Qos(
            prefetch_size=draw(st.sampled_from([0, 0, 0, 1])),
            prefetch_count=draw(st.integers(0, 65535)),
            global_=draw(b),
        )
    if kind == 9:
        return _safe(
            lambda: commands.Basic.Consume(
                queue=draw(names), consumer_tag=draw(tags), no_local=draw(b), no_ack=draw(b),
                exclusive=draw(b), nowait=draw(b), arguments=draw(tables),
            ),
            commands.Basic.Consume(queue="itest-fuzz-a"),
        )  # fmt: skip
    if kind == 10:
        return commands.Basic.Cancel(consumer_tag=draw(tags), nowait=draw(b))
    if kind == 11:
        return commands.Basic.Get(queue=draw(names), no_ack=draw(b))
    if kind in (12, 13):
        tag = draw(st.integers(0, 5))
        return draw(
            st.sampled_from(
                [
                    commands.Basic.Ack(delivery_tag=tag, multiple=draw(b)),
                    commands.Basic.Nack(delivery_tag=tag, multiple=draw(b), requeue=draw(b)),
                    commands.Basic.Reject(delivery_tag=tag, requeue=draw(b)),
                ]
            )
        )
    if kind == 14:
        return commands.Basic.Recover(requeue=draw(b))
    if kind == 15:
        return commands.Basic.RecoverAsync(requeue=draw(b))
    if kind == 16:
        return draw(
            st.sampled_from(
                [commands.Confirm.Select(nowait=draw(b)), commands.Tx.Select(),
                 commands.Tx.Commit(), commands.Tx.Rollback()]
            )
        )  # fmt: skip
    if kind == 17:
        return commands.Channel.Open()
    if kind == 18:
        return commands.Channel.Close(
            reply_code=draw(st.sampled_from([200, 320, 404, 0])), reply_text="fuzz"
        )
    if kind == 19:
        return commands.Channel.CloseOk()
    if kind == 20:
        return commands.Channel.Flow(active=draw(b))
    if kind == 21:
        return commands.Channel.FlowOk(active=draw(b))
    if kind == 22:  # connection methods (sent on a channel, or on channel 0 out of turn)
        return draw(
            st.sampled_from(
                [
                    commands.Connection.StartOk(client_properties={}, response="\0guest\0guest"),
                    commands.Connection.TuneOk(channel_max=5, frame_max=4096, heartbeat=1),
                    commands.Connection.Open(virtual_host="/"),
                    commands.Connection.Close(reply_code=200, reply_text="x"),
                    commands.Connection.CloseOk(),
                    commands.Connection.Blocked(reason="x"),
                    commands.Connection.Unblocked(),
                    commands.Connection.UpdateSecret(new_secret="s", reason="r"),
                ]
            )
        )
    if kind == 23:  # a publish without its content
        return commands.Basic.Publish(exchange=draw(names), routing_key=draw(names))
    if kind == 24:  # methods only a server sends
        return draw(
            st.sampled_from(
                [
                    commands.Basic.Deliver(consumer_tag="t1", delivery_tag=1, exchange="",
                                           routing_key="x"),
                    commands.Basic.GetOk(delivery_tag=1, exchange="", routing_key="x"),
                    commands.Basic.GetEmpty(),
                    commands.Basic.ConsumeOk(consumer_tag="t1"),
                    commands.Queue.DeclareOk(queue="itest-fuzz-a"),
                    commands.Channel.OpenOk(),
                    commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="",
                                          routing_key="x"),
                    commands.Connection.Start(),
                    commands.Connection.Tune(),
                ]
            )
        )  # fmt: skip
    if kind == 25:
        return commands.Exchange.Unbind(destination=draw(names), source=draw(names))
    if kind == 26:
        return commands.Basic.Nack(delivery_tag=draw(st.integers(0, 2**64 - 1)), multiple=True)
    return commands.Queue.Declare(queue=draw(names), exclusive=True, nowait=draw(b))


channels = st.one_of(
    st.just(1), st.just(1), st.just(1), st.sampled_from([0, 2, 3]), st.integers(2045, 2050),
    st.integers(0, 65535),
)  # fmt: skip


@st.composite
def method_frames(draw: st.DrawFn) -> bytes:
    method = draw(methods())
    channel = draw(channels)
    if isinstance(method, commands.Connection.Close) and channel == 0:
        channel = 1  # a real Connection.Close from the client ends it cleanly: not hostile
    return method_frame(method, channel)


@st.composite
def table_methods(draw: st.DrawFn) -> bytes:
    """Methods with a field table, whose table bytes are often corrupted."""
    channel = draw(channels)
    bits = bytes([draw(st.integers(0, 31))])
    table = draw(table_bytes())
    which = draw(st.sampled_from(["queue.declare", "exchange.declare", "consume", "bind"]))
    if which == "queue.declare":
        payload = struct.pack(">HHH", 50, 10, 0) + shortstr(b"itest-fuzz-a") + bits + table
    elif which == "exchange.declare":
        kind = draw(st.sampled_from([b"direct", b"topic", b"x-nonexistent"]))
        payload = (
            struct.pack(">HHH", 40, 10, 0) + shortstr(b"itest-fuzz-a") + shortstr(kind) + bits
        ) + table
    elif which == "consume":
        payload = (
            struct.pack(">HHH", 60, 20, 0) + shortstr(b"itest-fuzz-a") + shortstr(b"") + bits
        ) + table
    else:
        payload = (
            struct.pack(">HHH", 50, 20, 0)
            + shortstr(b"itest-fuzz-a")
            + shortstr(b"amq.direct")
            + shortstr(b"rk")
            + bits
        ) + table
    return raw_frame(1, channel, payload)


@st.composite
def property_bytes(draw: st.DrawFn) -> bytes:
    """Property flags and values of a content header, as pamqp encodes valid ones."""
    kwargs = {
        "content_type": draw(st.none() | st.text(max_size=5)),
        "headers": draw(tables),
        "delivery_mode": draw(st.none() | st.sampled_from([1, 2])),
        "priority": draw(st.none() | st.integers(0, 255)),
        "expiration": draw(st.none() | st.sampled_from(["1000", "abc", "", "-1"])),
        "user_id": draw(st.none() | st.sampled_from(["guest", "alice"])),
        "message_id": draw(st.none() | st.text(max_size=5)),
    }
    try:
        props = commands.Basic.Properties(**kwargs)
        return bytes(header.ContentHeader(0, 0, props).marshal()[12:])
    except (TypeError, ValueError, struct.error, OverflowError):
        return b"\x00\x00"


@st.composite
def contents(draw: st.DrawFn) -> bytes:
    """Publish + header + bodies, often out of order, mis-sized or with a broken header."""
    channel = draw(st.sampled_from([1, 1, 1, 2]))
    flags = draw(st.sampled_from([0, 0, 0, 1, 2, 3]) | st.integers(0, 255))
    out = [raw_frame(1, channel, publish_payload(draw(names), draw(names), flags))]
    size = draw(st.integers(0, 300))
    declared = draw(st.sampled_from([size] * 6 + [0, size + 1, max(size - 1, 0), 2**62]))
    class_id = draw(st.sampled_from([60] * 8 + [50, 0, 65535]))
    weight = draw(st.sampled_from([0] * 8 + [1]))
    prop_kind = draw(st.sampled_from(["valid"] * 4 + ["none", "random"]))
    if prop_kind == "valid":
        prop_bytes = draw(property_bytes())
    elif prop_kind == "none":
        prop_bytes = b"\x00\x00"
    else:
        prop_bytes = draw(st.binary(min_size=0, max_size=12))
    out.append(raw_frame(2, channel, struct.pack(">HHQ", class_id, weight, declared) + prop_bytes))
    body = b"b" * size
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
    pos = 0
    for cut in [*cuts, size]:
        if cut > pos:
            out.append(raw_frame(3, channel, body[pos:cut]))
            pos = cut
    order = draw(st.sampled_from(["keep"] * 6 + ["drop", "swap", "dup", "interleave"]))
    if order == "drop" and len(out) > 1:
        del out[draw(st.integers(0, len(out) - 1))]
    elif order == "swap" and len(out) > 1:
        i = draw(st.integers(0, len(out) - 2))
        out[i], out[i + 1] = out[i + 1], out[i]
    elif order == "dup":
        i = draw(st.integers(0, len(out) - 1))
        out.insert(i, out[i])
    elif order == "interleave":
        out.insert(draw(st.integers(1, len(out))), method_frame(commands.Basic.Qos(), channel))
    return b"".join(out)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame (or content sequence) with one thing broken."""
    data = bytearray(draw(st.one_of(method_frames(), contents())))
    # the first frame is the one mutated
    size = struct.unpack_from(">I", data, 3)[0]
    end = 7 + size
    how = draw(st.sampled_from(["type", "channel", "size", "end", "method", "byte", "cut", "grow"]))
    if how == "type":
        data[0] = draw(st.sampled_from([0, 2, 3, 4, 8, 9, 65, 206, 255]))
    elif how == "channel":
        data[1:3] = struct.pack(">H", draw(st.sampled_from([0, 2, 2047, 2048, 65535])))
    elif how == "size":
        new = draw(st.sampled_from([0, 1, 3, size - 1, size + 1, size + 8, 4089, 131064, 131065]))
        data[3:7] = struct.pack(">I", max(new, 0))
    elif how == "end":
        data[end] = draw(st.integers(0, 255).filter(lambda v: v != 0xCE))
    elif how == "method" and size >= 4:
        new_id = draw(st.sampled_from(KNOWN_IDS + EXTRA_IDS) | st.integers(0, 2**32 - 1))
        data[7:11] = struct.pack(">I", new_id)
    elif how == "byte" and size > 0:
        data[draw(st.integers(7, end - 1))] = draw(st.integers(0, 255))
    elif how == "cut" and size > 0:
        # drop payload bytes, fixing the size so that only the content is short
        cut = draw(st.integers(1, size))
        del data[end - cut : end]
        data[3:7] = struct.pack(">I", size - cut)
    else:  # grow: trailing bytes after a method's arguments
        extra = draw(st.binary(min_size=1, max_size=8))
        data[end:end] = extra
        data[3:7] = struct.pack(">I", size + len(extra))
    return bytes(data)


specials = st.sampled_from(
    [
        method_frame(commands.Channel.Open(), 1),  # second Channel.Open on channel 1
        method_frame(commands.Channel.Open(), 2048),  # above the negotiated channel_max
        method_frame(commands.Channel.Open(), 65535),
        method_frame(commands.Queue.Declare(queue="itest-fuzz-a"), 65535),
        raw_frame(8, 1, b""),  # heartbeat on a channel
        raw_frame(8, 0, b"x"),  # heartbeat with a payload
        raw_frame(2, 0, struct.pack(">HHQH", 60, 0, 1, 0)),  # content on channel 0
        raw_frame(3, 0, b"x"),
        raw_frame(1, 0, b""),  # empty method payloads
        raw_frame(1, 1, b"\x00\x3c"),
        raw_frame(3, 1, b"x" * 131064),  # a full-size body without a header
        raw_frame(3, 1, b"x" * 131065),  # one byte over frame_max
        raw_frame(1, 1, struct.pack(">HH", 30, 10) + shortstr(b"/data") + b"\x00"),  # access
    ]
)

atoms = st.one_of(
    method_frames(),
    method_frames(),
    contents(),
    mutated(),
    mutated(),
    table_methods(),
    specials,
    st.binary(min_size=1, max_size=48),
)


# --------------------------------------------------------------------------- hostile connections


@dataclass
class Hostile:
    #: "header": garbage instead of the protocol header; "handshake": garbage instead of the
    #: rest of the handshake; "active": garbage after a complete handshake.
    phase: str
    data: bytes
    channel_max: int = 2047
    frame_max: int = FRAME_MAX
    open_channels: tuple[int, ...] = (1,)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return (
            f"Hostile(phase={self.phase!r}, channel_max={self.channel_max}, "
            f"frame_max={self.frame_max}, open_channels={self.open_channels}, "
            f"data={compact_bytes(self.data)})"
        )


def compact_bytes(data: bytes) -> str:
    """A Python expression for ``data`` with long runs of one byte written as b'x' * n."""
    parts: list[str] = []
    start = 0
    i = 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i]:
            j += 1
        if j - i >= 32:
            if start < i:
                parts.append(repr(data[start:i]))
            parts.append(f"{bytes([data[i]])!r} * {j - i}")
            start = j
        i = j
    if start < len(data) or not parts:
        parts.append(repr(data[start:]))
    return " + ".join(parts)


handshake_garbage = st.one_of(
    st.binary(min_size=1, max_size=32),
    mutated(),
    st.sampled_from(
        [
            method_frame(commands.Connection.StartOk(response="\0guest"), 0),  # bad PLAIN
            method_frame(commands.Connection.StartOk(mechanism="EXTERNAL"), 0),
            method_frame(commands.Connection.TuneOk(frame_max=1024), 0),  # out of turn
            method_frame(commands.Connection.Open(virtual_host="/"), 0),
            method_frame(commands.Channel.Open(), 1),
            method_frame(commands.Connection.StartOk(response="\0guest\0guest"), 0)
            + method_frame(commands.Connection.TuneOk(frame_max=100), 0),  # below the minimum
            method_frame(commands.Connection.StartOk(response="\0guest\0guest"), 0)
            + method_frame(commands.Connection.TuneOk(frame_max=1 << 20), 0),  # above ours
        ]
    ),
)


@st.composite
def hostiles(draw: st.DrawFn) -> Hostile:
    phase = draw(st.sampled_from(["active"] * 16 + ["header", "handshake"]))
    if phase == "header":
        data = draw(st.binary(min_size=1, max_size=16).filter(lambda d: not is_header_prefix(d)))
        return Hostile(phase, data)
    if phase == "handshake":
        return Hostile(phase, draw(handshake_garbage))
    data = b"".join(draw(st.lists(atoms, min_size=1, max_size=6)))
    return Hostile(
        phase,
        data,
        channel_max=draw(st.sampled_from([2047, 2047, 2047, 2, 3])),
        frame_max=draw(st.sampled_from([FRAME_MAX, FRAME_MAX, 4096])),
        open_channels=draw(st.sampled_from([(1,), (1,), (1,), (), (1, 2)])),
    )


def is_header_prefix(data: bytes) -> bool:
    n = min(len(data), len(AMQP_HEADER))
    return data[:n] == AMQP_HEADER[:n]


def poison_for(stream: bytes) -> bytes:
    """0xFF bytes that make sure the proxy meets a frame error after ``stream``, however it
    parsed it: they complete any frame left open (up to the largest frame_max, ending it
    with 0xFF instead of 0xCE) or start a frame whose size is far over any frame_max."""
    data = bytearray(stream)
    limit = FRAME_MAX  # RabbitMQ, and so the proxy, lets a payload reach frame_max itself
    extra = 0
    while True:
        pos, need = 0, 0
        while True:
            if len(data) - pos < 7:
                need = 7 - (len(data) - pos)
                break
            _, _, size = struct.unpack_from(">BHI", data, pos)
            if size > limit:
                return b"\xff" * extra
            end = pos + 7 + size
            if end >= len(data):
                need = end + 1 - len(data)
                break
            if data[end] != 0xCE:
                return b"\xff" * extra
            pos = end + 1
        data += b"\xff" * need
        extra += need


@dataclass
class Outcome:
    hostile: Hostile
    close: Any = None  # the server's Connection.Close, if any
    others: list[tuple[int, Any]] = field(default_factory=list)
    received: bytes = b""  # what came back before EOF (header phase)
    eof: bool = False


class HostileConnection:
    def __init__(self, port: int, vhost: str, hostile: Hostile) -> None:
        self.hostile = hostile
        self.vhost = vhost
        self.c = RawClient("127.0.0.1", port, timeout=HOSTILE_TIMEOUT)

    def start(self) -> None:
        h = self.hostile
        if h.phase == "handshake":
            self.c.send_raw(AMQP_HEADER)
            _, start = self.c.read_method()
            assert isinstance(start, commands.Connection.Start), start
        elif h.phase == "active":
            self._handshake()
            for number in h.open_channels:
                self.c.send(commands.Channel.Open(), number)
                ch, ok = self.c.read_method()
                assert (ch, type(ok)) == (number, commands.Channel.OpenOk), (ch, ok)

    def _handshake(self) -> None:
        h, c = self.hostile, self.c
        c.send_raw(AMQP_HEADER)
        _, start = c.read_method()
        assert isinstance(start, commands.Connection.Start), start
        c.send(commands.Connection.StartOk({"product": "itest-fuzz"}, "PLAIN", "\0guest\0guest"))
        _, tune = c.read_method()
        assert isinstance(tune, commands.Connection.Tune), tune
        c.send(commands.Connection.TuneOk(h.channel_max, h.frame_max, 0))
        c.send(commands.Connection.Open(self.vhost))
        _, ok = c.read_method()
        assert isinstance(ok, commands.Connection.OpenOk), ok

    def send(self) -> None:
        data = self.hostile.data
        if self.hostile.phase != "header":
            data += poison_for(data)
        # the proxy may have closed it already (allowed before the handshake completed)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.c.send_raw(data)

    def finish(self) -> Outcome:
        out = Outcome(self.hostile)
        try:
            if self.hostile.phase == "header":
                out.received = self.c.read_until_closed(limit=64)
                out.eof = True
            else:
                out.close, out.others = read_until_connection_close(self.c, HOSTILE_TIMEOUT)
                out.eof = out.close is None
        except TimeoutError as exc:
            raise AssertionError(f"hostile connection hangs: {self.hostile!r}") from exc
        finally:
            self.c.close()
        return out


def check_outcome(out: Outcome) -> None:
    h = out.hostile
    if h.phase == "header":
        assert is_header_prefix(out.received) and len(out.received) in (0, 8), out
        return
    for channel, method in out.others:
        if isinstance(method, commands.Channel.Close):
            assert channel != 0, out
            assert method.reply_code in SOFT_ERRORS, (method.reply_code, method.reply_text, h)
            assert method.reply_text.startswith(REPLY_NAMES[method.reply_code]), (method, h)
    if out.close is None:
        # a plain close: before the TuneOk, or where RabbitMQ's own parser would crash (an
        # unknown method id, a field table it cannot read), as RabbitMQ does
        return
    code, text = out.close.reply_code, out.close.reply_text
    allowed = HARD_ERRORS | ({403} if h.phase == "handshake" else set())
    assert code in allowed, (code, text, h)
    # 541 is RabbitMQ's answer to message properties it cannot read, exactly "INTERNAL_ERROR";
    # any other 541 is the proxy's own bug, or the broker's close of the shared connection
    assert code != 541 or text == "INTERNAL_ERROR", (code, text, h)
    assert text.startswith(REPLY_NAMES[code]), (code, text, h)


# --------------------------------------------------------------------------- honest clients


class HonestTraffic:
    """Publishers with confirms (mandatory, so an unroutable message is an error too) and a
    consumer with manual acks, all on the proxy with the hostile clients' credentials."""

    def __init__(self, p: ProxyProcess, vhost: str, queue: str, publishers: int = 2) -> None:
        self.p, self.vhost, self.queue = p, vhost, queue
        self.errors: list[str] = []
        self.confirmed: set[bytes] = set()
        self.received: list[bytes] = []
        self.max_confirm_latency = 0.0
        self.stop_publishing = threading.Event()
        self.stop_consuming = threading.Event()
        self.consuming = threading.Event()
        self.threads = [threading.Thread(target=self._consumer, daemon=True)] + [
            threading.Thread(target=self._publisher, args=(i,), daemon=True)
            for i in range(publishers)
        ]

    def _connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.p.params(vhost=self.vhost))

    def _publisher(self, index: int) -> None:
        try:
            self.consuming.wait(10)
            conn = self._connect()
            ch = conn.channel()
            ch.confirm_delivery()
            i = 0
            while not self.stop_publishing.is_set():
                body = f"honest-{index}-{i}".encode()
                started = time.monotonic()
                ch.basic_publish("", self.queue, body, mandatory=True)
                self.max_confirm_latency = max(self.max_confirm_latency, time.monotonic() - started)
                self.confirmed.add(body)
                i += 1
                time.sleep(0.003)
            conn.close()
        except Exception as exc:  # any error at all is a failure
            self.errors.append(f"publisher {index}: {exc!r}")

    def _consumer(self) -> None:
        try:
            conn = self._connect()
            ch = conn.channel()
            ch.basic_qos(prefetch_count=50)

            def on_message(chan: Any, method: Any, _props: Any, body: bytes) -> None:
                if method.redelivered:
                    self.errors.append(f"consumer: {body!r} redelivered")
                self.received.append(body)
                chan.basic_ack(method.delivery_tag)

            ch.basic_consume(self.queue, on_message)
            self.consuming.set()
            while not self.stop_consuming.is_set():
                conn.process_data_events(time_limit=0.05)
            conn.close()
        except Exception as exc:
            self.errors.append(f"consumer: {exc!r}")

    def start(self) -> None:
        for t in self.threads:
            t.start()
        wait_for(lambda: len(self.received) >= 20 or self.errors, 15, what="honest traffic")
        assert self.errors == []

    def finish(self) -> None:
        self.stop_publishing.set()
        for t in self.threads[1:]:
            t.join(15)
        wait_for(
            lambda: len(self.received) >= len(self.confirmed) or self.errors,
            20,
            what="every confirmed message consumed",
        )
        self.stop_consuming.set()
        self.threads[0].join(15)


class Sentinel:
    """A raw client on the shared upstream connection: two round trips through the broker
    after each example show that the connection is still the same and still works."""

    def __init__(self, port: int, vhost: str, queue: str) -> None:
        self.port, self.vhost, self.queue = port, vhost, queue
        self.c = self._open()

    def _open(self) -> RawClient:
        c = RawClient("127.0.0.1", self.port, timeout=10)
        assert "open_ok" in c.handshake(vhost=self.vhost)
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        return c

    def check(self) -> None:
        try:
            for _ in range(2):
                self.c.send(commands.Queue.Declare(queue=self.queue, passive=True), 1)
                ch, m = self.c.read_method()
                while isinstance(m, commands.Connection.Blocked | commands.Connection.Unblocked):
                    ch, m = self.c.read_method()  # someone else's memory alarm: not ours
                if isinstance(m, commands.Connection.Close):
                    raise AssertionError(f"Connection.Close {m.reply_code} {m.reply_text!r}")
                assert (ch, type(m)) == (1, commands.Queue.DeclareOk), (ch, m)
        except (AssertionError, RawClosed, OSError) as exc:
            self.c.close()
            self.c = self._open()  # for the next example (hypothesis shrinks this one)
            raise AssertionError(f"the shared upstream connection was hurt: {exc!r}") from exc

    def close(self) -> None:
        self.c.close()


class LogWatcher:
    """What the proxy logged since the last call (for per-example checks)."""

    def __init__(self, p: ProxyProcess) -> None:
        self.path = p.log_path
        self.offset = self.path.stat().st_size

    def new_text(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace")


def exclusive_queues(vhost: str) -> list[str]:
    out = rabbitmqctl("-q", "list_queues", "-p", vhost, "name", "exclusive", "--formatter", "json")
    return [row["name"] for row in json.loads(out or "[]") if row.get("exclusive")]


# --------------------------------------------------------------------------- the test


def test_hostile_clients_cannot_hurt_honest_clients_on_the_same_upstream(
    proxy_factory: ProxyFactory, admin: RabbitAdmin
) -> None:
    vhost = admin.add_vhost("fuzz")
    admin.grant("guest", vhost)
    p = proxy_factory("-t", "60", "--client-handshake-timeout", "5", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    queue = unique("fuzz-honest")
    setup = pika.BlockingConnection(p.params(vhost=vhost))
    setup.channel().queue_declare(queue)
    setup.close()

    honest = HonestTraffic(p, vhost, queue)
    honest.start()
    log = LogWatcher(p)
    sentinel = Sentinel(p.port, vhost, queue)
    upstream = p.upstream_local_ports()
    assert len(upstream) == 1, upstream
    stats = {"examples": 0, "connections": 0, "skipped": 0, "failures": 0}
    deadline = time.monotonic() + BUDGET_S

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(hostiles(), min_size=1, max_size=4))
    def hostile_example(batch: list[Hostile]) -> None:
        if time.monotonic() > deadline and not stats["failures"]:
            stats["skipped"] += 1  # over budget: the remaining examples are not run
            return
        stats["examples"] += 1
        errors_before = len(honest.errors)
        log.new_text()  # what earlier examples caused is not this one's
        try:
            conns = [HostileConnection(p.port, vhost, h) for h in batch]
            for c in conns:
                c.start()
            for c in conns:  # all are sent before any is read: they overlap in the proxy
                c.send()
            outcomes = [c.finish() for c in conns]
            stats["connections"] += len(conns)
            for out in outcomes:
                check_outcome(out)
            # only what this example did counts (so that hypothesis can shrink a failure)
            sentinel.check()
            assert honest.errors[errors_before:] == []
            logged = log.new_text()
            assert "Traceback" not in logged, logged[-3000:]
        except BaseException:
            stats["failures"] += 1
            raise

    with RssSampler(p, interval=0.2) as rss:
        try:
            hostile_example()
        finally:
            sentinel.close()
            honest.finish()

    print(
        f"fuzz: {stats}, honest messages {len(honest.confirmed)}, "
        f"max confirm latency {honest.max_confirm_latency * 1000:.0f} ms, "
        f"RSS +{rss.growth / 2**20:.1f} MiB"
    )
    assert stats["connections"] >= MIN_CONNECTIONS, stats
    assert honest.errors == []
    assert len(honest.confirmed) > 100
    assert sorted(honest.received) == sorted(honest.confirmed), "lost or duplicated messages"
    assert honest.max_confirm_latency < 5.0
    # the one upstream connection is still the one of the start (probes have gone)
    wait_for(lambda: p.upstream_local_ports() == upstream, 10, what="only the first upstream")
    status, body = http_request(p.http_port, "/pools")
    assert status == 200
    pools = [e for e in json.loads(body) if e["vhost"] == vhost]
    assert [(e["user"], e["upstream_connections"]) for e in pools] == [("guest", 1)], pools
    assert rss.growth < RSS_GROWTH_LIMIT, f"worker RSS grew by {rss.growth / 2**20:.1f} MiB"
    logged = p.log_text()
    assert "Traceback" not in logged, logged[-3000:]
    # hostile clients left no exclusive queue behind on the shared connection
    deadline = time.monotonic() + 10
    while left := exclusive_queues(vhost):
        assert time.monotonic() < deadline, f"exclusive queues outlived their clients: {left}"
        time.sleep(0.2)


def test_poison_always_ends_in_a_frame_error() -> None:
    """The helper the fuzz test relies on to end every hostile stream."""
    cases = [
        b"",
        raw_frame(1, 1, b"abcd"),
        raw_frame(1, 1, b"abcd")[:5],
        struct.pack(">BHI", 3, 1, 131064),
        struct.pack(">BHI", 3, 1, 20) + b"x" * 5,
    ]
    for stream in cases:
        data = stream + poison_for(stream)
        pos = 0
        while True:
            assert len(data) - pos >= 7, stream
            size = struct.unpack_from(">I", data, pos + 3)[0]
            if size > FRAME_MAX - 8:
                break
            end = pos + 7 + size
            assert end < len(data), stream
            if data[end] != 0xCE:
                break
            pos = end + 1
