"""The AMQP methods the proxy recognises, decodes or originates.

Method ids come from pamqp's definitions; everything else crosses the proxy as opaque
bytes. Methods are encoded (with pamqp) only when the proxy itself is the speaker:
handshakes, closes, heartbeats. Frames from clients are read with `validate`, which reads
them as the broker does; frames from the broker are decoded with pamqp.
"""

from __future__ import annotations

import struct
from typing import Final

from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.base import Frame as Method

from amqproxy_mp.amqp.frames import METHOD_ID, FrameError, amqp_error_text, frame
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

C, B = commands.Connection, commands.Basic

CONNECTION_START: Final = C.Start.index
CONNECTION_START_OK: Final = C.StartOk.index
CONNECTION_TUNE: Final = C.Tune.index
CONNECTION_TUNE_OK: Final = C.TuneOk.index
CONNECTION_OPEN: Final = C.Open.index
CONNECTION_OPEN_OK: Final = C.OpenOk.index
CONNECTION_CLOSE: Final = C.Close.index
CONNECTION_CLOSE_OK: Final = C.CloseOk.index
CONNECTION_BLOCKED: Final = C.Blocked.index
CONNECTION_UNBLOCKED: Final = C.Unblocked.index
CONNECTION_UPDATE_SECRET: Final = C.UpdateSecret.index
CHANNEL_OPEN: Final = commands.Channel.Open.index
CHANNEL_OPEN_OK: Final = commands.Channel.OpenOk.index
CHANNEL_FLOW: Final = commands.Channel.Flow.index
CHANNEL_CLOSE: Final = commands.Channel.Close.index
CHANNEL_CLOSE_OK: Final = commands.Channel.CloseOk.index
EXCHANGE_DECLARE: Final = commands.Exchange.Declare.index
QUEUE_DECLARE: Final = commands.Queue.Declare.index
QUEUE_DECLARE_OK: Final = commands.Queue.DeclareOk.index
QUEUE_DELETE: Final = commands.Queue.Delete.index
QUEUE_PURGE: Final = commands.Queue.Purge.index
BASIC_QOS: Final = B.Qos.index
BASIC_QOS_OK: Final = B.QosOk.index
BASIC_CONSUME: Final = B.Consume.index
BASIC_CONSUME_OK: Final = B.ConsumeOk.index
BASIC_CANCEL: Final = B.Cancel.index
BASIC_CANCEL_OK: Final = B.CancelOk.index
BASIC_PUBLISH: Final = B.Publish.index
BASIC_RETURN: Final = B.Return.index
BASIC_DELIVER: Final = B.Deliver.index
BASIC_GET: Final = B.Get.index
BASIC_GET_OK: Final = B.GetOk.index
BASIC_ACK: Final = B.Ack.index
BASIC_RECOVER: Final = B.Recover.index
BASIC_RECOVER_ASYNC: Final = B.RecoverAsync.index
BASIC_RECOVER_OK: Final = B.RecoverOk.index
TX_SELECT: Final = commands.Tx.Select.index
#: Basic.Publish's flags octet: bit 1 is `immediate`, which RabbitMQ does not implement.
PUBLISH_IMMEDIATE: Final = 0x02

#: Methods a client may send on an open channel, besides the channel class (checked apart).
#: Anything else (a server-only method, an unknown id) would make RabbitMQ close the whole
#: upstream connection, so it never leaves the proxy.
CLIENT_CHANNEL_METHODS: Final = frozenset(
    method.index
    for method in (
        commands.Exchange.Declare, commands.Exchange.Delete, commands.Exchange.Bind,
        commands.Exchange.Unbind, commands.Queue.Declare, commands.Queue.Bind,
        commands.Queue.Purge, commands.Queue.Delete, commands.Queue.Unbind, B.Qos,
        B.Consume, B.Cancel, B.Publish, B.Get, B.Ack, B.Reject, B.RecoverAsync, B.Recover,
        B.Nack, commands.Confirm.Select, commands.Tx.Select, commands.Tx.Commit,
        commands.Tx.Rollback,
    )
)  # fmt: skip

#: Every broker method that answers a client's synchronous request on a channel. Replies come
#: in the order of their requests, which is how the proxy knows what the broker has processed.
#: (Channel.CloseOk is not among them: it ends the channel, see `channels`.)
_INDEX_BY_NAME: Final = {m.name: i for i, m in commands.INDEX_MAPPING.items()}  # type: ignore[attr-defined]
REPLIES: Final = frozenset(
    _INDEX_BY_NAME[name]
    for index, method in commands.INDEX_MAPPING.items()
    if index >> 16 != 10
    for name in getattr(method, "valid_responses", ())
    if name != "Channel.CloseOk"
)

#: For each request, the methods that answer it.
ANSWERS: Final = {
    index: frozenset(_INDEX_BY_NAME[name] for name in method.valid_responses)  # type: ignore[attr-defined]
    for index, method in commands.INDEX_MAPPING.items()
    if getattr(method, "valid_responses", None)
}

#: Basic.Ack, Basic.Nack, Basic.Reject: the hottest client methods, checked by size only
#: (method id, a 64-bit delivery tag, one octet of flags).
DELIVERY_ACKS: Final = frozenset((B.Ack.index, B.Nack.index, B.Reject.index))
DELIVERY_ACK_SIZE: Final = 4 + 8 + 1


def method_name(index: int) -> str:
    method = commands.INDEX_MAPPING.get(index)
    if method is None:
        return f"unknown method {index >> 16}.{index & 0xFFFF}"
    return str(method.name)  # type: ignore[attr-defined]


# AMQP reply codes.
REPLY_SUCCESS: Final = 200
CONNECTION_FORCED: Final = 320
ACCESS_REFUSED: Final = 403
NOT_FOUND: Final = 404
RESOURCE_LOCKED: Final = 405
PRECONDITION_FAILED: Final = 406
FRAME_ERROR: Final = 501
SYNTAX_ERROR: Final = 502
COMMAND_INVALID: Final = 503
CHANNEL_ERROR: Final = 504
UNEXPECTED_FRAME: Final = 505
RESOURCE_ERROR: Final = 506
NOT_ALLOWED: Final = 530
NOT_IMPLEMENTED: Final = 540
INTERNAL_ERROR: Final = 541


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


def client_capabilities(start_ok_arguments: list[object], payload: bytes | memoryview) -> set[str]:
    """The capabilities a client announced as true in Connection.StartOk's client_properties."""
    properties = start_ok_arguments[0]
    assert isinstance(properties, tuple)
    start, end = properties
    for key, tag, value_start, value_end in table_entries(payload, start, end):
        if key == b"capabilities" and tag == ord("F"):
            return {
                name.decode("utf-8", "replace")
                for name, ctag, at, _ in table_entries(payload, value_start + 4, value_end)
                if ctag == ord("t") and payload[at]
            }
    return set()


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
