"""The few AMQP methods the proxy decodes or originates, through pamqp.

Everything else crosses the proxy as opaque bytes; methods are re-encoded only
when the proxy itself is the speaker (handshakes, closes, heartbeats).
"""

from __future__ import annotations

import struct
from typing import Any, Final

from pamqp import commands, decode
from pamqp import frame as pamqp_frame
from pamqp.base import Frame as Method

from amqproxy_mp.amqp.frames import METHOD_ID, FrameError
from amqproxy_mp.amqp.validate import check_method

__all__ = [
    "Method",
    "commands",
    "decode_method",
    "encode_method",
    "parse_sasl_response",
]

# class << 16 | method, for the methods the data path recognises by id.
CONNECTION_START: Final = 0x000A000A
CONNECTION_TUNE: Final = 0x000A001E
CONNECTION_TUNE_OK: Final = 0x000A001F
CONNECTION_OPEN: Final = 0x000A0028
CONNECTION_OPEN_OK: Final = 0x000A0029
CONNECTION_CLOSE: Final = 0x000A0032
CONNECTION_CLOSE_OK: Final = 0x000A0033
CONNECTION_BLOCKED: Final = 0x000A003C
CONNECTION_UNBLOCKED: Final = 0x000A003D
CONNECTION_UPDATE_SECRET: Final = 0x000A0046
CHANNEL_OPEN: Final = 0x0014000A
CHANNEL_OPEN_OK: Final = 0x0014000B
CHANNEL_FLOW: Final = 0x00140014
CHANNEL_FLOW_OK: Final = 0x00140015
CHANNEL_CLOSE: Final = 0x00140028
CHANNEL_CLOSE_OK: Final = 0x00140029
EXCHANGE_DECLARE_OK: Final = 0x0028000B
BASIC_QOS_OK: Final = 0x003C000B
QUEUE_DECLARE: Final = 0x0032000A
QUEUE_DECLARE_OK: Final = 0x0032000B
BASIC_PUBLISH: Final = 0x003C0028
#: Basic.Publish's flags octet: bit 1 is `immediate`, which RabbitMQ does not implement.
PUBLISH_IMMEDIATE: Final = 0x02
BASIC_DELIVER: Final = 0x003C003C
BASIC_GET_OK: Final = 0x003C0047


#: Methods a client may send on an open channel, besides the channel class (checked apart).
#: Anything else (a server-only method, an unknown id) would make RabbitMQ close the whole
#: upstream connection with 503/540, so it never leaves the proxy.
CLIENT_CHANNEL_METHODS: Final = frozenset(
    index
    for index, method in commands.INDEX_MAPPING.items()
    if method.name  # type: ignore[attr-defined]
    in {
        "Exchange.Declare", "Exchange.Delete", "Exchange.Bind", "Exchange.Unbind",
        "Queue.Declare", "Queue.Bind", "Queue.Purge", "Queue.Delete", "Queue.Unbind",
        "Basic.Qos", "Basic.Consume", "Basic.Cancel", "Basic.Publish", "Basic.Get",
        "Basic.Ack", "Basic.Reject", "Basic.RecoverAsync", "Basic.Recover", "Basic.Nack",
        "Confirm.Select", "Tx.Select", "Tx.Commit", "Tx.Rollback",
    }
)  # fmt: skip


#: Channel-class methods a client may send (their arguments are checked too).
CLIENT_CHANNEL_CLASS_METHODS: Final = frozenset((0x00140028, 0x00140029, 0x00140014))

#: Methods that name a queue whose exclusivity the proxy enforces among its clients.
QUEUE_ACCESS: Final = (
    commands.Queue.Declare, commands.Queue.Bind, commands.Queue.Unbind, commands.Queue.Purge,
    commands.Queue.Delete, commands.Basic.Consume, commands.Basic.Get,
)  # fmt: skip

#: Basic.Ack, Basic.Nack, Basic.Reject: the hottest client methods, checked by size only
#: (method id, a 64-bit delivery tag, one octet of flags).
DELIVERY_ACKS: Final = frozenset((0x003C0050, 0x003C0078, 0x003C005A))
DELIVERY_ACK_SIZE: Final = 4 + 8 + 1


def method_name(index: int) -> str:
    method = commands.INDEX_MAPPING.get(index)
    if method is None:
        return f"unknown method {index >> 16}.{index & 0xFFFF}"
    return str(method.name)  # type: ignore[attr-defined]


# AMQP reply codes the proxy itself sends.
REPLY_SUCCESS: Final = 200
CONNECTION_FORCED: Final = 320
ACCESS_REFUSED: Final = 403
NOT_ALLOWED: Final = 530
FRAME_ERROR: Final = 501
SYNTAX_ERROR: Final = 502
COMMAND_INVALID: Final = 503
CHANNEL_ERROR: Final = 504
UNEXPECTED_FRAME: Final = 505
NOT_IMPLEMENTED: Final = 540
INTERNAL_ERROR: Final = 541
PRECONDITION_FAILED: Final = 406
RESOURCE_LOCKED: Final = 405
RESOURCE_ERROR: Final = 506


def decode_method(payload: bytes | memoryview) -> Method:
    """Decode a method frame's payload; a malformed one is the peer's syntax error."""
    if len(payload) < 4:
        raise FrameError(SYNTAX_ERROR, "SYNTAX_ERROR - method frame too short")
    index = METHOD_ID.unpack_from(payload)[0]
    try:
        method: Method = commands.INDEX_MAPPING[index]()
    except KeyError:
        raise FrameError(
            COMMAND_INVALID, f"COMMAND_INVALID - unknown method {index >> 16}.{index & 0xFFFF}"
        ) from None
    check_method(index, payload)
    try:
        method.unmarshal(bytes(payload[4:]))
    except (struct.error, ValueError, TypeError, IndexError) as exc:
        raise FrameError(SYNTAX_ERROR, f"SYNTAX_ERROR - malformed {method.name}: {exc}") from None
    return method


def encode_method(channel: int, method: Method) -> bytes:
    """Encode a method the proxy originates as one frame."""
    return bytes(pamqp_frame.marshal(method, channel))


def parse_sasl_response(mechanism: str, response: str | bytes) -> tuple[str, str]:
    """Extract (user, password) from a PLAIN or AMQPLAIN StartOk response.

    Raises ValueError with a client-facing reason when the response is unusable.
    """
    raw = response.encode("utf-8") if isinstance(response, str) else bytes(response)
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            raise ValueError("malformed PLAIN response")
        user, password = parts[1], parts[2]
    elif mechanism == "AMQPLAIN":
        # AMQPLAIN is a field table without its 4-byte length prefix.
        table: dict[str, Any]
        try:
            _, table = decode.field_table(struct.pack(">I", len(raw)) + raw)
        except (ValueError, struct.error) as exc:
            raise ValueError(f"malformed AMQPLAIN response: {exc}") from None
        login, secret = table.get("LOGIN"), table.get("PASSWORD")
        if login is None or secret is None:
            raise ValueError("AMQPLAIN response lacks LOGIN or PASSWORD")
        user = login.encode() if isinstance(login, str) else bytes(login)
        password = secret.encode() if isinstance(secret, str) else bytes(secret)
    else:
        raise ValueError(f"unsupported mechanism {mechanism!r}")
    try:
        return user.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("credentials are not valid UTF-8") from None
