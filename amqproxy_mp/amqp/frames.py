"""AMQP 0-9-1 framing: just enough to route frames without decoding them.

The data path never builds objects for the frames it forwards: it reads the
7-byte header in place and rewrites the channel number. Methods the proxy
must understand are decoded with pamqp (see `methods`).
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"

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
    """The peer sent bytes that are not a valid frame; `code` is the AMQP reply code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


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


def method_id(payload: bytes | memoryview) -> int:
    """The combined class/method id (class << 16 | method) of a method frame's payload."""
    if len(payload) < 4:
        raise FrameError(502, "SYNTAX_ERROR - method frame too short")
    return int(METHOD_ID.unpack_from(payload)[0])
