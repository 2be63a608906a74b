"""What RabbitMQ's parser accepts, checked before anything reaches a shared connection.

RabbitMQ reads a method's arguments with an exact binary pattern: too few or too many bytes
is a 501 FRAME_ERROR ("cannot decode <<...>>") on the whole connection. It reads the field
tables inside (`rabbit_binary_parser:parse_table/1`) at the same time, and a table it cannot
read (an unknown type tag, an entry that runs past its table, a NaN or an infinity in an
`f` or `d` value, which Erlang's float pattern does not match) crashes the connection
process: the client's socket is simply closed. A content header's properties are read when
the message is published; there a failure is 541 INTERNAL_ERROR on the connection.

On a shared upstream connection any of these would hit every client on it, so the proxy
checks everything it forwards here first and answers the offending client exactly as the
broker would have answered it. The walks are iterative: a table nested 20 000 deep, which
the broker accepts, must not exhaust Python's recursion limit.

The same walk decodes the few arguments the proxy needs (queue names, consumer tags, flags)
without building objects; tables stay bytes and are only skipped.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final

from pamqp import commands

from amqproxy_mp.amqp.frames import CONTENT_HEADER, FrameError, amqp_error_text, frame_snippet
from amqproxy_mp.amqp.spec import DROP, FRAME_ERROR, INTERNAL_ERROR, UNEXPECTED_FRAME

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_INTS: Final = {"octet": _U8, "short": _U16, "long": _U32, "longlong": _U64, "timestamp": _U64}

#: Field-value tags of rabbit_binary_parser with a fixed size ('L' is a signed 64-bit
#: integer there, like 'l'); 'f' and 'd' must also be finite.
_FIXED: Final = {
    ord("t"): 1, ord("b"): 1, ord("B"): 1, ord("s"): 2, ord("u"): 2, ord("I"): 4,
    ord("i"): 4, ord("l"): 8, ord("L"): 8, ord("f"): 4, ord("d"): 8, ord("D"): 5,
    ord("T"): 8, ord("V"): 0,
}  # fmt: skip
_FLOAT: Final = ord("f")
_DOUBLE: Final = ord("d")
_LONG_STRINGS: Final = frozenset((ord("S"), ord("x")))
_TABLE: Final = ord("F")
_ARRAY: Final = ord("A")

#: Methods that carry content: RabbitMQ does not check their short strings are UTF-8.
_CONTENT_METHODS: Final = frozenset(
    (commands.Basic.Publish.index, commands.Basic.Return.index, commands.Basic.Deliver.index,
     commands.Basic.GetOk.index)
)  # fmt: skip
#: Each method's argument types, in wire order (from pamqp's definitions).
_ARGUMENTS: Final[dict[int, tuple[str, ...]]] = {
    index: tuple(getattr(method, "_" + name) for name in method.__slots__)  # type: ignore[attr-defined]
    for index, method in commands.INDEX_MAPPING.items()
}
_PROPERTY_TYPES: Final = tuple(
    (flag, getattr(commands.Basic.Properties, "_" + name))
    for name, flag in commands.Basic.Properties.flags.items()
)


class _Undecodable(Exception):
    """The broker's pattern does not match these bytes."""


def erlang_binary(data: bytes | memoryview) -> str:
    """A binary as Erlang's ``~w`` prints it, the way it appears in RabbitMQ's error texts."""
    return "<<" + ",".join(map(str, bytes(data))) + ">>"


def check_table(data: bytes | memoryview, pos: int, end: int) -> None:
    """The entries of a field table occupying data[pos:end], as parse_table/1 reads them."""
    # (is a table, where it ends): a table's entries have keys, an array's do not
    stack = [(True, end)]
    while stack:
        is_table, limit = stack[-1]
        if pos == limit:
            stack.pop()
            continue
        if is_table:
            pos += 1 + data[pos]  # the key: a short string of any bytes
            if pos >= limit:
                raise _Undecodable  # no room for the value's tag
        tag = data[pos]
        pos += 1
        size = _FIXED.get(tag)
        if size is not None:
            if pos + size > limit:
                raise _Undecodable
            if tag == _DOUBLE and not math.isfinite(_F64.unpack_from(data, pos)[0]):
                raise _Undecodable
            if tag == _FLOAT and not math.isfinite(_F32.unpack_from(data, pos)[0]):
                raise _Undecodable
            pos += size
            continue
        if pos + 4 > limit or (tag not in _LONG_STRINGS and tag not in (_TABLE, _ARRAY)):
            raise _Undecodable
        length = _U32.unpack_from(data, pos)[0]
        pos += 4
        if pos + length > limit:
            raise _Undecodable
        if tag in _LONG_STRINGS:
            pos += length
        else:
            stack.append((tag == _TABLE, pos + length))


#: Arguments of recently read small methods, by method and payload: a PHP-FPM client sends
#: the same TuneOk, Open, Channel.Open, Qos and closes as the request before it. Methods that
#: carry credentials are never kept (a refused password would stay in memory); of those, the
#: field table that costs the time (StartOk's client properties) is kept in _CHECKED_TABLES.
_RECENT: dict[tuple[int, bytes], tuple[Any, ...]] = {}
_RECENT_ENTRIES: Final = 256
_RECENT_PAYLOAD: Final = 512
_SECRET_METHODS: Final = frozenset(
    (commands.Connection.StartOk.index, commands.Connection.SecureOk.index,
     commands.Connection.UpdateSecret.index)
)  # fmt: skip
#: Field tables of at most _RECENT_PAYLOAD bytes that passed check_table.
_CHECKED_TABLES: set[bytes] = set()


def method_arguments(index: int, payload: bytes | memoryview) -> list[Any]:
    """A known method's arguments in wire order: bits as bools, numbers as ints, short
    strings as str (bytes that are not UTF-8 survive as surrogates), long strings as bytes,
    tables as the (start, end) of their entries in the payload, checked but not decoded."""
    if len(payload) > _RECENT_PAYLOAD or index in _SECRET_METHODS:
        return _read_arguments(index, payload)
    key = (index, bytes(payload))
    known = _RECENT.get(key)
    if known is not None:
        return list(known)
    values = _read_arguments(index, payload)  # raises for what the broker refuses
    if len(_RECENT) >= _RECENT_ENTRIES:
        _RECENT.clear()
    _RECENT[key] = tuple(values)
    return values


def _read_arguments(index: int, payload: bytes | memoryview) -> list[Any]:
    values: list[Any] = []
    tables: list[tuple[int, int]] = []
    utf8 = index not in _CONTENT_METHODS
    malformed_utf8 = False
    pos, end = 4, len(payload)
    bit = 8
    octet = 0
    try:
        for kind in _ARGUMENTS[index]:
            if kind == "bit":
                if bit == 8:
                    octet = payload[pos]
                    pos += 1
                    bit = 0
                values.append(bool(octet >> bit & 1))
                bit += 1
                continue
            bit = 8
            if kind == "shortstr":
                stop = pos + 1 + payload[pos]
                if stop > end:
                    raise _Undecodable
                raw = bytes(payload[pos + 1 : stop])
                try:
                    values.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    malformed_utf8 = utf8
                    values.append(raw.decode("utf-8", "surrogateescape"))
                pos = stop
            elif kind in ("longstr", "table"):
                start = pos + 4
                stop = start + _U32.unpack_from(payload, pos)[0]
                if stop > end:
                    raise _Undecodable
                if kind == "table":
                    tables.append((start, stop))
                    values.append((start, stop))
                else:
                    values.append(bytes(payload[start:stop]))
                pos = stop
            else:
                codec = _INTS[kind]
                values.append(codec.unpack_from(payload, pos)[0])
                pos += codec.size
        if pos != end:
            raise _Undecodable
    except (_Undecodable, IndexError, struct.error):
        raise FrameError(
            FRAME_ERROR,
            amqp_error_text(f"FRAME_ERROR - cannot decode {erlang_binary(payload[4:])}"),
            index >> 16,
            index & 0xFFFF,
        ) from None
    # then, in field order, as RabbitMQ's generated decoder does (tables come last in every
    # method): short strings must be UTF-8, tables must parse
    if malformed_utf8:
        raise FrameError(FRAME_ERROR, "FRAME_ERROR - Malformed UTF-8 in shortstr")
    for start, stop in tables:
        table = bytes(payload[start:stop]) if stop - start <= _RECENT_PAYLOAD else None
        if table is not None and table in _CHECKED_TABLES:
            continue
        try:
            check_table(payload, start, stop)
        except (_Undecodable, IndexError, struct.error):
            raise FrameError(DROP, "field table RabbitMQ cannot parse") from None
        if table is not None:
            if len(_CHECKED_TABLES) >= _RECENT_ENTRIES:
                _CHECKED_TABLES.clear()
            _CHECKED_TABLES.add(table)
    return values


def check_method(index: int, payload: bytes | memoryview) -> None:
    """The method's arguments as the broker reads them (see method_arguments)."""
    method_arguments(index, payload)


def table_entries(
    data: bytes | memoryview, start: int, end: int
) -> list[tuple[bytes, int, int, int]]:
    """The top-level entries of a checked table: (key, tag, value start, value end)."""
    entries = []
    pos = start
    while pos < end:
        key = bytes(data[pos + 1 : pos + 1 + data[pos]])
        pos += 1 + data[pos]
        tag = data[pos]
        pos += 1
        size = _FIXED.get(tag)
        if size is None:
            size = 4 + _U32.unpack_from(data, pos)[0]
        entries.append((key, tag, pos, pos + size))
        pos += size
    return entries


def check_content_header(payload: bytes | memoryview) -> int:
    """A Basic content header as RabbitMQ accepts it; returns the body size."""
    if len(payload) < CONTENT_HEADER.size:
        raise FrameError(FRAME_ERROR, f"FRAME_ERROR - {frame_snippet(2, payload)}: unknown_frame")
    class_id, weight, size = CONTENT_HEADER.unpack_from(payload)
    if weight:
        raise FrameError(
            UNEXPECTED_FRAME,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header "
            "frame instead",
            60, 40,
        )  # fmt: skip
    if class_id != 60:
        raise FrameError(
            UNEXPECTED_FRAME,
            f"UNEXPECTED_FRAME - expected content header for class 60, got one for class "
            f"{class_id} instead",
            60, 40,
        )  # fmt: skip
    end = len(payload)
    if end == 14 and payload[12] == payload[13] == 0:
        return int(size)  # no properties at all
    try:
        flags = _U16.unpack_from(payload, 12)[0]
        if flags & 1:
            raise _Undecodable  # RabbitMQ reads no continued property flags
        pos = 14
        for flag, kind in _PROPERTY_TYPES:
            if not flags & flag:
                continue
            if kind == "shortstr":
                pos += 1 + payload[pos]
            elif kind == "table":
                start = pos + 4
                pos = start + _U32.unpack_from(payload, pos)[0]
                if pos > end:
                    raise _Undecodable
                check_table(payload, start, pos)
            else:
                pos += _INTS[kind].size
        if pos != end:
            raise _Undecodable
    except (_Undecodable, IndexError, struct.error):
        raise FrameError(INTERNAL_ERROR, "INTERNAL_ERROR") from None
    return int(size)
