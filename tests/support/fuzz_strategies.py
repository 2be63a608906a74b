"""Hypothesis strategies of the hostile-client fuzz test (tests/integration/
test_hardening_fuzz.py): method frames well-formed or deliberately wrong, field tables and
content sequences often corrupted, single mutations of valid frames, and ``hostiles()``, the
garbage one hostile connection sends in its phase (instead of the protocol header, during the
handshake, or after it)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from pamqp import commands, frame, header
from pamqp import encode as pencode

from .raw_client import AMQP_HEADER

FRAME_MAX = 131072  # the proxy's (and RabbitMQ's default) frame_max

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


# --------------------------------------------------------------------------- hostiles


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
