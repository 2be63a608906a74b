"""Encoding and decoding of the AMQP methods the proxy decodes or originates.

Constants are in `spec`; everything else crosses the proxy as opaque
bytes. Methods are encoded (with pamqp) only when the proxy itself is the speaker:
handshakes, closes, heartbeats. Frames from clients are read with `validate`, which reads
them as the broker does; frames from the broker are decoded with pamqp.
"""

from __future__ import annotations

import functools
import struct

from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.base import Frame as Method

from amqproxy_mp.amqp.frames import METHOD, METHOD_ID, FrameError, amqp_error_text, frame
from amqproxy_mp.amqp.spec import CHANNEL_CLOSE, CONNECTION_CLOSE, EXCHANGE_DECLARE
from amqproxy_mp.amqp.validate import check_table, method_arguments, table_entries

__all__ = [
    "FrameError",
    "Method",
    "client_capabilities",
    "close_frame",
    "commands",
    "decode_broker_method",
    "encode_method",
    "method_arguments",
    "parse_sasl_response",
]


def method_name(index: int) -> str:
    method = commands.INDEX_MAPPING.get(index)
    if method is None:
        return f"unknown method {index >> 16}.{index & 0xFFFF}"
    return str(method.name)  # type: ignore[attr-defined]


def decode_broker_method(payload: bytes | memoryview) -> Method:
    """Decode a method the broker sent (trusted to be well-formed)."""
    index = METHOD_ID.unpack_from(payload)[0]
    method: Method = commands.INDEX_MAPPING[index]()
    method.unmarshal(bytes(payload[4:]))
    return method


def encode_method(channel: int, method: Method) -> bytes:
    """Encode a method the proxy originates as one frame."""
    return bytes(pamqp_frame.marshal(method, channel))


def close_frame(channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0) -> bytes:
    """Connection.Close (channel 0) or Channel.Close, with any reply text (cut as RabbitMQ
    cuts it; bytes that were not UTF-8 in a name the text quotes go out as they came)."""
    raw = amqp_error_text(text).encode("utf-8", "surrogateescape")
    index = CONNECTION_CLOSE if channel == 0 else CHANNEL_CLOSE
    payload = struct.pack(">IHB", index, code, len(raw)) + raw
    payload += struct.pack(">HH", class_id, method_id)
    return frame(1, channel, payload)


def passive_exchange_declare(channel: int, exchange: bytes) -> bytes:
    """Exchange.Declare(exchange, passive) for a name as a client sent it: pamqp refuses
    names with characters RabbitMQ accepts (a publish only looks the exchange up)."""
    payload = (
        EXCHANGE_DECLARE.to_bytes(4, "big") + b"\x00\x00" + bytes([len(exchange)]) + exchange
        + b"\x00\x01\x00\x00\x00\x00"  # type "", flags: passive, arguments: none
    )  # fmt: skip
    return frame(METHOD, channel, payload)


def client_capabilities(
    start_ok_arguments: list[object], payload: bytes | memoryview
) -> frozenset[str]:
    """The capabilities a client announced as true in Connection.StartOk's client_properties."""
    properties = start_ok_arguments[0]
    assert isinstance(properties, tuple)
    start, end = properties
    return _capabilities(bytes(payload[start:end]))


@functools.lru_cache(maxsize=64)  # each client library sends the same properties every time
def _capabilities(payload: bytes) -> frozenset[str]:
    for key, tag, value_start, value_end in table_entries(payload, 0, len(payload)):
        if key == b"capabilities" and tag == ord("F"):
            return frozenset(
                name.decode("utf-8", "replace")
                for name, ctag, at, _ in table_entries(payload, value_start + 4, value_end)
                if ctag == ord("t") and payload[at]
            )
    return frozenset()


class WrongSaslType(ValueError):
    """An AMQPLAIN LOGIN or PASSWORD that is not a string: refused like a wrong password."""


def parse_sasl_response(mechanism: str, response: bytes) -> tuple[str, str]:
    """Extract (user, password) from a PLAIN or AMQPLAIN StartOk response, as RabbitMQ reads
    them: any bytes (kept through surrogate escapes), in AMQPLAIN long strings or binaries.

    Raises ValueError when the response is unusable (RabbitMQ drops such a client), and
    WrongSaslType for a LOGIN or PASSWORD of another type. Nothing is allocated in proportion
    to a length the client claims: every length was checked against the bytes that arrived.
    """
    if mechanism == "PLAIN":
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise ValueError("malformed PLAIN response")
        user, password = parts[1], parts[2]
    elif mechanism == "AMQPLAIN":
        # AMQPLAIN is a field table without its 4-byte length prefix
        try:
            check_table(response, 0, len(response))
        except Exception:
            raise ValueError("malformed AMQPLAIN response") from None
        fields = {key: (tag, a, b) for key, tag, a, b in table_entries(response, 0, len(response))}
        if b"LOGIN" not in fields or b"PASSWORD" not in fields:
            raise ValueError("AMQPLAIN response lacks LOGIN or PASSWORD")
        values = []
        for key in (b"LOGIN", b"PASSWORD"):
            tag, start, end = fields[key]
            if tag not in (ord("S"), ord("x")):
                raise WrongSaslType(f"AMQPLAIN {key.decode()} is not a string")
            values.append(response[start + 4 : end])
        user, password = values
    else:
        raise ValueError(f"unsupported mechanism {mechanism!r}")
    return user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")
