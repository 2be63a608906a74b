"""Strict structural checks of what a client sends, as RabbitMQ's own parser reads it.

RabbitMQ answers a payload it cannot decode (bytes left over, a bad field-table tag, a
string running past its table) with an error on the whole connection, or its connection
process crashes. On a shared upstream connection that would hit every client on it, so
anything the proxy forwards must pass here first. pamqp is lenient about all of these,
hence this walk over the wire format; pamqp still decodes the values the proxy needs.
"""

from __future__ import annotations

import struct
from typing import Final

from pamqp import commands

from amqproxy_mp.amqp.frames import CONTENT_HEADER, FrameError

SYNTAX_ERROR: Final = 502
FRAME_ERROR: Final = 501
UNEXPECTED_FRAME: Final = 505

_U32 = struct.Struct(">I")
_SIZES: Final = {"octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}
#: Field-value tags RabbitMQ decodes (rabbit_binary_parser), with fixed sizes; None: variable.
_FIELD_SIZES: Final[dict[int, int | None]] = {
    ord("t"): 1, ord("b"): 1, ord("B"): 1, ord("s"): 2, ord("u"): 2, ord("I"): 4,
    ord("i"): 4, ord("l"): 8, ord("f"): 4, ord("d"): 8, ord("D"): 5, ord("T"): 8,
    ord("V"): 0, ord("S"): None, ord("x"): None, ord("F"): None, ord("A"): None,
}  # fmt: skip

#: Each method's argument types, in wire order (from pamqp's definitions).
_ARGUMENTS: Final = {
    index: tuple(getattr(method, "_" + name) for name in method.__slots__)  # type: ignore[attr-defined]
    for index, method in commands.INDEX_MAPPING.items()
}
_PROPERTY_TYPES: Final = tuple(
    (flag, getattr(commands.Basic.Properties, "_" + name))
    for name, flag in commands.Basic.Properties.flags.items()
)


class _Malformed(Exception):
    pass


def _need(data: bytes | memoryview, pos: int, size: int, end: int) -> int:
    if pos + size > end:
        raise _Malformed("truncated")
    return pos + size


def _field_value(data: bytes | memoryview, pos: int, end: int) -> int:
    pos = _need(data, pos, 1, end)
    tag = data[pos - 1]
    if tag not in _FIELD_SIZES:
        raise _Malformed(f"unknown field type {chr(tag)!r}")
    size = _FIELD_SIZES[tag]
    if size is not None:
        return _need(data, pos, size, end)
    if tag == ord("F"):
        return _table(data, pos, end)
    if tag == ord("A"):
        return _array(data, pos, end)
    return _long_string(data, pos, end)


def _long_string(data: bytes | memoryview, pos: int, end: int) -> int:
    pos = _need(data, pos, 4, end)
    return _need(data, pos, _U32.unpack_from(data, pos - 4)[0], end)


def _table(data: bytes | memoryview, pos: int, end: int) -> int:
    pos = _need(data, pos, 4, end)
    table_end = _need(data, pos, _U32.unpack_from(data, pos - 4)[0], end)
    while pos < table_end:
        pos = _need(data, pos, 1, table_end)
        pos = _need(data, pos, data[pos - 1], table_end)  # the key
        pos = _field_value(data, pos, table_end)
    return table_end


def _array(data: bytes | memoryview, pos: int, end: int) -> int:
    pos = _need(data, pos, 4, end)
    array_end = _need(data, pos, _U32.unpack_from(data, pos - 4)[0], end)
    while pos < array_end:
        pos = _field_value(data, pos, array_end)
    return array_end


def _fields(data: bytes | memoryview, pos: int, types: tuple[str, ...], end: int) -> int:
    bits = 0
    for kind in types:
        if kind == "bit":
            if bits % 8 == 0:
                pos = _need(data, pos, 1, end)
            bits += 1
            continue
        bits = 0
        if kind == "shortstr":
            pos = _need(data, pos, 1, end)
            pos = _need(data, pos, data[pos - 1], end)
        elif kind == "longstr":
            pos = _long_string(data, pos, end)
        elif kind == "table":
            pos = _table(data, pos, end)
        else:
            pos = _need(data, pos, _SIZES[kind], end)
    return pos


def check_method(index: int, payload: bytes | memoryview) -> None:
    """The arguments of a known method must fill its frame exactly."""
    try:
        if _fields(payload, 4, _ARGUMENTS[index], len(payload)) != len(payload):
            raise _Malformed("bytes after its arguments")
    except _Malformed as exc:
        name = commands.INDEX_MAPPING[index].name  # type: ignore[attr-defined]
        raise FrameError(SYNTAX_ERROR, f"SYNTAX_ERROR - malformed {name}: {exc}") from None


def check_content_header(payload: bytes | memoryview) -> int:
    """A Basic content header as RabbitMQ accepts it; returns the body size."""
    if len(payload) < CONTENT_HEADER.size + 2:
        raise FrameError(FRAME_ERROR, "FRAME_ERROR - content header frame too short")
    class_id, weight, size = CONTENT_HEADER.unpack_from(payload)
    if class_id != 60 or weight:
        raise FrameError(
            UNEXPECTED_FRAME,
            f"UNEXPECTED_FRAME - content header of class {class_id} weight {weight}",
        )
    flags = int.from_bytes(payload[12:14], "big")
    if not flags and len(payload) == 14:
        return int(size)  # no properties at all
    try:
        if flags & 1:
            raise _Malformed("continued property flags")
        pos, end = 14, len(payload)
        for flag, kind in _PROPERTY_TYPES:
            if flags & flag:
                pos = _fields(payload, pos, (kind,), end)
        if pos != end:
            raise _Malformed("bytes after its properties")
    except _Malformed as exc:
        raise FrameError(SYNTAX_ERROR, f"SYNTAX_ERROR - malformed content header: {exc}") from None
    return int(size)
