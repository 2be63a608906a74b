"""AMQP 0-9-1 as the proxy needs it: method ids, reply codes and fixed payloads, defined once.

Method ids and the fixed payloads come from pamqp's definitions, never typed by hand.
"""

from __future__ import annotations

import struct
from typing import Final

from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.base import Frame

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
#: The channel_max the proxy offers its clients.
CHANNEL_MAX: Final = 2047

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
QUEUE_BIND: Final = commands.Queue.Bind.index
QUEUE_UNBIND: Final = commands.Queue.Unbind.index
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
BASIC_REJECT: Final = B.Reject.index
BASIC_NACK: Final = B.Nack.index
BASIC_RECOVER: Final = B.Recover.index
BASIC_RECOVER_ASYNC: Final = B.RecoverAsync.index
BASIC_RECOVER_OK: Final = B.RecoverOk.index
TX_SELECT: Final = commands.Tx.Select.index
CONFIRM_SELECT: Final = commands.Confirm.Select.index
CONFIRM_SELECT_OK: Final = commands.Confirm.SelectOk.index
#: The methods after which a channel holds state only its upstream channel has: consumers,
#: unacked deliveries, a transaction (the client's channel cannot move to another one).
PINNING_METHODS: Final = frozenset((B.Consume.index, B.Get.index, commands.Tx.Select.index))

# Reply codes (AMQP 0-9-1 constants, as RabbitMQ uses them).
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
#: Not a reply code: the broker drops the socket without a Connection.Close.
DROP: Final = 0

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

_INDEX_BY_NAME: Final = {m.name: i for i, m in commands.INDEX_MAPPING.items()}  # type: ignore[attr-defined]
#: Every broker method that answers a client's synchronous request on a channel. Replies come
#: in the order of their requests, which is how the proxy knows what the broker has processed.
#: (Channel.CloseOk is not among them: it ends the channel.)
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
#: Client methods the broker answers (unless nowait).
SYNCHRONOUS: Final = frozenset(
    index
    for index, method in commands.INDEX_MAPPING.items()
    if method.synchronous  # type: ignore[attr-defined]
)
#: Position of `nowait` among each method's arguments, where it has one.
NOWAIT_ARGUMENT: Final = {
    index: method.__slots__.index("nowait")  # type: ignore[attr-defined]
    for index, method in commands.INDEX_MAPPING.items()
    if "nowait" in method.__slots__  # type: ignore[attr-defined]
}

#: Basic.Ack, Basic.Nack, Basic.Reject: the hottest client methods, checked by size only
#: (method id, a 64-bit delivery tag, one octet of flags).
DELIVERY_ACKS: Final = frozenset((BASIC_ACK, BASIC_NACK, BASIC_REJECT))
DELIVERY_ACK_SIZE: Final = 4 + 8 + 1


def payload_of(method: Frame) -> bytes:
    """A method's frame payload (no frame header or end), for the frames sent unchanged."""
    return bytes(pamqp_frame.marshal(method, 0))[7:-1]


# Payloads the proxy sends as they are (on any channel).
#: Channel.Open and its OpenOk with an empty out_of_band and channel_id, as RabbitMQ's own
#: clients send them (pamqp refuses to encode those).
CHANNEL_OPEN_PAYLOAD: Final = struct.pack(">IB", CHANNEL_OPEN, 0)
CHANNEL_OPEN_OK_PAYLOAD: Final = struct.pack(">II", CHANNEL_OPEN_OK, 0)  # (and channel_id)
CHANNEL_CLOSE_OK_PAYLOAD: Final = payload_of(commands.Channel.CloseOk())
BASIC_QOS_OK_PAYLOAD: Final = payload_of(B.QosOk())
RECOVER_PAYLOAD: Final = payload_of(B.Recover(requeue=True))
#: The proxy's own Confirm.Select (no reply): the broker confirms each publish after it.
CONFIRM_SELECT_NOWAIT_PAYLOAD: Final = payload_of(commands.Confirm.Select(nowait=True))
CONFIRM_SELECT_PAYLOAD: Final = payload_of(commands.Confirm.Select())
#: Exchange.Declare(amq.direct, passive): a request with no effect, to learn that the broker
#: has processed everything before it.
MARKER_PAYLOAD: Final = payload_of(
    commands.Exchange.Declare(exchange="amq.direct", exchange_type="direct", passive=True)
)

# Connection-level frames the proxy sends as they are.
CONNECTION_OPEN_OK_FRAME: Final = bytes(pamqp_frame.marshal(C.OpenOk(), 0))
CONNECTION_CLOSE_OK_FRAME: Final = bytes(pamqp_frame.marshal(C.CloseOk(), 0))
CONNECTION_UPDATE_SECRET_OK_FRAME: Final = bytes(pamqp_frame.marshal(C.UpdateSecretOk(), 0))
