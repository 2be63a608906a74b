"""AMQP 0-9-1 framing: just enough to route frames without decoding them.

The data path never builds objects for the frames it forwards: it reads the
7-byte header in place and rewrites the channel number. Methods the proxy
must understand are read in place by `validate` (a client's) or decoded with pamqp (the
broker's, see `methods`).
"""

from __future__ import annotations

import struct
from typing import Final

from amqproxy_mp.amqp.spec import FRAME_ERROR

METHOD: Final = 1
HEADER: Final = 2
BODY: Final = 3
HEARTBEAT: Final = 8

FRAME_END: Final = 0xCE
FRAME_END_BYTE: Final = b"\xce"
HEADER_SIZE: Final = 7
#: Bytes a frame adds around its payload: the header and the frame-end octet.
OVERHEAD: Final = HEADER_SIZE + 1
#: The smallest frame_max a peer may negotiate (AMQP 0-9-1, 4.2.1).
MIN_FRAME_MAX: Final = 4096

FRAME_HEADER = struct.Struct(">BHI")
METHOD_ID = struct.Struct(">I")
#: class-id, weight, body-size at the start of a content header payload.
CONTENT_HEADER = struct.Struct(">HHQ")
CHANNEL_NUMBER = struct.Struct(">H")

HEARTBEAT_FRAME: Final = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class FrameError(Exception):
    """The peer sent something the broker would refuse on the whole connection: `code`,
    `text`, `class_id` and `method_id` are the broker's Connection.Close; code 0 means the
    broker would drop the socket without one."""

    def __init__(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.class_id = class_id
        self.method_id = method_id


def amqp_error_text(text: str) -> str:
    """A reply text cut as RabbitMQ cuts it: 252 bytes and "..." when over 255."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= 255:
        return text
    return raw[:252].decode("utf-8", "ignore") + "..."


_PRINTABLE_ESCAPES: Final = {
    0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v", 0x08: "\\b", 0x0C: "\\f",
    0x1B: "\\e", 0x22: '\\"', 0x5C: "\\\\",
}  # fmt: skip


def erlang_binary_p(data: bytes | memoryview) -> str:
    """A binary as Erlang's ``~p`` prints it: as a string when it is printable Latin-1."""
    raw = bytes(data)
    if raw and all(32 <= b <= 126 or b >= 160 or b in _PRINTABLE_ESCAPES for b in raw):
        text = "".join(_PRINTABLE_ESCAPES.get(b, chr(b)) for b in raw)
        return f'<<"{text}">>'
    return "<<" + ",".join(map(str, raw)) + ">>"


def frame_snippet(frame_type: int, payload: bytes | memoryview) -> str:
    """How RabbitMQ's reader quotes a frame in its FRAME_ERROR and UNEXPECTED_FRAME texts."""
    if len(payload) <= 16:
        return f"type {frame_type}, all octets = {erlang_binary_p(payload)}"
    return f"type {frame_type}, first 16 octets = {erlang_binary_p(payload[:16])}"


def frame(frame_type: int, channel: int, payload: bytes | memoryview) -> bytes:
    """Encode one frame."""
    return b"".join((FRAME_HEADER.pack(frame_type, channel, len(payload)), payload, FRAME_END_BYTE))


def body_frames(channel: int, body: bytes | memoryview, frame_max: int) -> list[bytes]:
    """Encode a message body as body frames that each fit the peer's frame_max."""
    limit = frame_max - OVERHEAD
    if len(body) <= limit:
        return [frame(BODY, channel, body)]
    view = memoryview(body)
    return [frame(BODY, channel, view[i : i + limit]) for i in range(0, len(view), limit)]


def renumbered(data: bytes, channel: int, frame_max: int) -> bytes:
    """Complete frames moved to another channel, bodies re-split to another peer's frame_max."""
    parts = []
    position = 0
    while position < len(data):
        frame_type, _, size = FRAME_HEADER.unpack_from(data, position)
        start = position + HEADER_SIZE
        payload = memoryview(data)[start : start + size]
        if frame_type == BODY and size + OVERHEAD > frame_max:
            parts.extend(body_frames(channel, payload, frame_max))
        else:
            parts.append(frame(frame_type, channel, payload))
        position = start + size + 1
    return b"".join(parts)


def method_id(payload: bytes | memoryview) -> int:
    """The combined class/method id (class << 16 | method) of a method frame's payload."""
    if len(payload) < 4:
        raise FrameError(
            FRAME_ERROR,
            amqp_error_text(f"FRAME_ERROR - {frame_snippet(METHOD, payload)}: unknown_frame"),
        )
    return int(METHOD_ID.unpack_from(payload)[0])
