"""One client connection: the server side of the AMQP handshake and the client half of routing.

The session answers the handshake itself, authenticates the client through its
pool (an upstream connection for exactly its credentials) before Connection.OpenOk,
maps each client channel onto a shared upstream channel, and checks what the client
sends so that nothing it does can make the broker close a connection that other
clients share. Where the broker would close the connection, the client alone gets
the broker's answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any, Final, NoReturn

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp.frames import (
    BODY,
    CONTENT_HEADER,
    HEADER,
    HEARTBEAT,
    METHOD,
    MIN_FRAME_MAX,
    OVERHEAD,
    PROTOCOL_HEADER,
    FrameError,
    amqp_error_text,
    body_frames,
    frame,
    frame_snippet,
    method_id,
)
from amqproxy_mp.amqp.transport import DEFAULT_FRAME_MAX, FramedProtocol
from amqproxy_mp.amqp.validate import DROP, check_content_header
from amqproxy_mp.proxy.channels import (
    CHANNEL_CLOSE_OK_PAYLOAD,
    HEADER_EXPECTED,
    NO_CONTENT,
    WEDGED,
    ChannelLink,
    Request,
    Up,
)
from amqproxy_mp.proxy.upstream import Login, UpstreamError

if TYPE_CHECKING:
    from amqproxy_mp.proxy.pool import PendingLogin, Pool
    from amqproxy_mp.proxy.upstream import UpstreamConnection
    from amqproxy_mp.worker import Worker

log = logging.getLogger(__name__)

CHANNEL_MAX: Final = 2047
CHANNEL_OPEN_OK_PAYLOAD: Final = b"\x00\x14\x00\x0b\x00\x00\x00\x00"
# Constant frames of the handshake, encoded once.
CONNECTION_OPEN_OK: Final = m.encode_method(0, m.commands.Connection.OpenOk())
CONNECTION_CLOSE_OK: Final = m.encode_method(0, m.commands.Connection.CloseOk())
CONNECTION_UPDATE_SECRET_OK: Final = m.encode_method(0, m.commands.Connection.UpdateSecretOk())
BASIC_QOS_OK_PAYLOAD: Final = b"\x00\x3c\x00\x0b"
#: Bytes queued for a client above which it counts as not reading (see resume_writing).
CLIENT_WRITE_BUFFER: Final = 256 * 1024
#: How long a client gets to answer our Connection.Close before its socket is closed.
CLOSE_OK_TIMEOUT: Final = 5.0
#: Where Queue.Declare's and Basic.Consume's flags octet starts after the queue name (method
#: id, ticket, the queue name's length octet), and Basic.Consume's after its tag as well.
NOWAIT_BIT: Final = 0x10
#: Basic.Consume's flags octet: no_local 0x01, no_ack 0x02, exclusive 0x04, nowait 0x08.
CONSUME_NO_ACK_BIT: Final = 0x02
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
CONSUME_NOWAIT_BIT: Final = 0x08
RECOVER_PAYLOAD: Final = m.encode_method(0, m.commands.Basic.Recover(requeue=True))[7:-1]
#: Basic.Cancel's flags octet (its last): bit 0 is nowait.
CANCEL_NOWAIT_BIT: Final = 0x01
#: Queue.Delete's flags octet (its last): if_unused 0x01, if_empty 0x02, nowait 0x04.
DELETE_NOWAIT_BIT: Final = 0x04
#: The argument that names a queue, in every method that names one (for exclusivity).
QUEUE_METHODS: Final = frozenset(
    method.index
    for method in (
        m.commands.Queue.Declare, m.commands.Queue.Bind, m.commands.Queue.Unbind,
        m.commands.Queue.Purge, m.commands.Queue.Delete, m.commands.Basic.Consume,
        m.commands.Basic.Get,
    )
)  # fmt: skip
#: Position of `nowait` among each method's arguments, where it has one.
NOWAIT_ARGUMENT: Final = {
    index: method.__slots__.index("nowait")  # type: ignore[attr-defined]
    for index, method in m.commands.INDEX_MAPPING.items()
    if "nowait" in method.__slots__  # type: ignore[attr-defined]
}
#: Client methods the broker answers (unless nowait).
SYNCHRONOUS: Final = frozenset(
    index
    for index, method in m.commands.INDEX_MAPPING.items()
    if method.synchronous  # type: ignore[attr-defined]
)


def refuse_method(mid: int) -> NoReturn:
    """A method no client may send here: RabbitMQ's answer (a method id it does not know
    crashes its parser, which drops the socket)."""
    if mid not in m.commands.INDEX_MAPPING:
        raise FrameError(DROP, f"unknown method {mid >> 16}.{mid & 0xFFFF}")
    raise FrameError(
        m.COMMAND_INVALID, "COMMAND_INVALID - unimplemented method", mid >> 16, mid & 0xFFFF
    )


def _content_expected(expected: int) -> tuple[str, int, int]:
    """RabbitMQ's text, class and method for a frame out of order with a message's content."""
    if expected == NO_CONTENT:
        return "UNEXPECTED_FRAME - expected method frame, got non method frame instead", 0, 0
    if expected == HEADER_EXPECTED:
        text = "expected content header for class 60, got non content header frame instead"
    else:
        text = "expected content body, got non content body frame instead"
    return f"UNEXPECTED_FRAME - {text}", 60, 40


class Phase(enum.Enum):
    """Where a client connection is in its life."""

    HEADER = "awaiting the protocol header"
    START_OK = "awaiting Connection.StartOk"
    TUNE_OK = "awaiting Connection.TuneOk"
    OPEN = "awaiting Connection.Open"
    OPENING = "authenticating"
    ACTIVE = "open"
    #: The client sent Connection.Close; its CloseOk waits for the broker (close_policy).
    CLIENT_CLOSING = "closing at the client's request"
    #: The proxy sent Connection.Close and awaits the client's CloseOk.
    CLOSING = "closing"
    CLOSED = "closed"


#: Before these, nothing has been tuned: a protocol error just closes the socket.
BEFORE_TUNE: Final = frozenset((Phase.HEADER, Phase.START_OK))
HANDSHAKE: Final = frozenset((Phase.HEADER, Phase.START_OK, Phase.TUNE_OK, Phase.OPEN))
ENDING: Final = frozenset((Phase.CLIENT_CLOSING, Phase.CLOSING, Phase.CLOSED))


class ClientSession(FramedProtocol):
    def __init__(self, worker: Worker) -> None:
        super().__init__(worker.loop)
        self.worker = worker
        self.phase = Phase.HEADER
        self.peer = "?"
        self.connected_at = time.monotonic()
        self.user = ""
        self.vhost = ""
        self._password = ""
        self.capabilities: set[str] = set()
        self.pool: Pool | None = None
        #: The broker's check of this client's login, until its Connection.Open.
        self._login: PendingLogin | None = None
        #: Why that check could not be made (answered at Connection.Open).
        self._upstream_failure: UpstreamError | None = None
        self.channels: dict[int, ChannelLink] = {}
        #: The upstream connection this client's channels go to, so that they share its
        #: exclusive queues (set by its first channel).
        self.home: UpstreamConnection | None = None
        self.channel_max = CHANNEL_MAX
        self.frame_max = DEFAULT_FRAME_MAX
        #: Upstream connections that told us they block publishers.
        self._blocked_by: set[UpstreamConnection] = set()
        #: Exclusive queues this client declared, per upstream connection that owns them.
        self.exclusive_queues: dict[UpstreamConnection, set[str]] = {}
        #: Channels whose close must be answered by the broker before Connection.CloseOk.
        self._closes_pending = 0
        #: Channels with auto-ack deliveries to ack once the client's socket has them.
        self._acks_due: set[ChannelLink] = set()
        #: The broker's answer about an unreadable message's exchange (see _unreadable).
        self._verdict: asyncio.Future[None] | None = None
        self._close_reason = ""
        #: The reason label for the disconnect metric.
        self._close_kind = ""
        self.stats = worker.stats
        self.max_buffer = worker.config.client_max_buffer
        self.max_message_size = worker.config.max_message_size
        self.wait_for_broker = worker.config.close_policy == "processed"
        self._tasks: set[asyncio.Task[None]] = set()

    # --- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # resume_writing comes when everything written has left: auto-ack deliveries are due
        transport.set_write_buffer_limits(high=CLIENT_WRITE_BUFFER, low=0)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
            self.peer = f"{host}:{peer[1]}"
        self.worker.sessions.add(self)
        log.debug("client %s connected", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._close_reason:
            self._close_reason = f"connection lost: {exc}" if exc else "client closed the socket"
        self.stats.client_disconnects[self._close_kind or "socket_closed"] += 1
        self.phase = Phase.CLOSED
        self.closed = True
        self._release_channels()
        for upstream in self._blocked_by | self._read_holds:
            upstream.forget(self)
        self._blocked_by.clear()
        for task in self._tasks:
            task.cancel()
        self.worker.sessions.discard(self)
        self._release_login()
        if self.pool is not None:
            self.pool.clients -= 1
            self.worker.active_sessions -= 1
            self.worker.pools.forget_if_unused(self.pool)
            log.info(
                "client %s (user=%r vhost=%r) connected for %.1f s, disconnected: %s",
                self.peer,
                self.user,
                self.vhost,
                time.monotonic() - self.connected_at,
                self._close_reason,
            )
        else:
            log.info("client %s disconnected during handshake: %s", self.peer, self._close_reason)

    def _ending(self, kind: str, reason: str) -> None:
        """Why this connection ends: `kind` labels the disconnect metric, `reason` the log."""
        self._close_kind = kind
        self._close_reason = reason

    def flush(self) -> None:
        super().flush()
        transport = self.transport
        if self._acks_due:
            self._ack_written()
        if transport is not None and transport.get_write_buffer_size() > self.max_buffer:
            log.warning(
                "client %s (user=%r vhost=%r) is not reading: over %d bytes waiting for it; "
                "disconnecting it",
                self.peer,
                self.user,
                self.vhost,
                self.max_buffer,
            )
            self._ending("slow_client", f"too slow: more than {self.max_buffer} bytes unsent")
            self.abort()

    def count_received(self, size: int) -> None:
        self.stats.client_bytes_in += size

    def count_sent(self, size: int) -> None:
        self.stats.client_bytes_out += size

    def data_received(self, data: bytes) -> None:
        if self.phase is not Phase.HEADER:
            super().data_received(data)
            return
        self.count_received(len(data))
        self._buf += data
        got = bytes(self._buf[:8])
        if got != PROTOCOL_HEADER[: len(got)]:
            self._ending("protocol_error", f"bad protocol header {got!r}")
            self.send(PROTOCOL_HEADER)
            self.phase = Phase.CLOSED
            self.close_transport()
            return
        if len(got) < 8:
            return
        del self._buf[:8]
        self.phase = Phase.START_OK
        self.frame_max = MIN_FRAME_MAX  # until Tune
        self.send(self.worker.connection_start)
        super().data_received(b"")

    def close_with(
        self,
        code: int,
        text: str,
        class_id: int = 0,
        method_id: int = 0,
        close_ok_timeout: float | None = CLOSE_OK_TIMEOUT,
        kind: str = "upstream_closed",
    ) -> None:
        """Send Connection.Close to the client, give its channels back, await CloseOk."""
        if self.phase is Phase.CLOSING or self.phase is Phase.CLOSED:
            return
        self._ending(kind, f"closed by proxy: {code} {text}")
        self._release_channels()
        self.send(m.close_frame(0, code, text, class_id, method_id))
        self.phase = Phase.CLOSING
        if self._parsing_paused:
            self.resume_parsing()
        if close_ok_timeout is not None:
            self.loop.call_later(close_ok_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self.closed:
            self._close_reason += " (no CloseOk in time)"
            self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def protocol_error(self, exc: FrameError) -> None:
        if self.phase in ENDING:
            # Already closing: the rest of what it sent is discarded. Closing the socket now,
            # with unread bytes, would reset it and could destroy our Connection.Close.
            return
        log.warning("client %s (user=%r) protocol error: %s", self.peer, self.user, exc.text)
        if self.phase in BEFORE_TUNE or exc.code == DROP:
            # as the broker: no Connection.Close before Tune, none when its parser crashes
            self._ending("protocol_error", f"protocol error: {exc.text}")
            self._release_channels()
            self.phase = Phase.CLOSED
            self.close_transport()
        else:
            self.close_with(exc.code, exc.text, exc.class_id, exc.method_id, kind="protocol_error")

    def check_heartbeat(self, now: float, handshake_timeout: float) -> None:
        if self._acks_due:
            self._ack_written()
        if (self.phase in HANDSHAKE or self.phase is Phase.OPENING) and (
            now - self.connected_at > handshake_timeout
        ):
            self._ending(
                "handshake_timeout", f"handshake not completed within {handshake_timeout:g} s"
            )
            self.abort()
        elif not self.send_heartbeat_if_due(now):
            self._ending("heartbeat", f"missed heartbeats (heartbeat {self.heartbeat} s)")
            self.abort()

    # --- frames from the client -----------------------------------------------------------

    def frame_received(self, frame_type: int, channel: int, payload: memoryview) -> None:
        if METHOD <= frame_type <= BODY:  # (1, 2, 3)
            if channel and self.phase is Phase.ACTIVE:
                link = self.channels.get(channel)
                if link is not None and link.client_open:
                    self._forward(link, frame_type, payload)
                else:
                    self._channel_not_open(frame_type, channel, payload, link)
                return
            if frame_type == METHOD and not channel:
                self._connection_method(payload)
                return
            if frame_type == HEADER and len(payload) < CONTENT_HEADER.size:
                check_content_header(payload)  # too short to be one: RabbitMQ's FRAME_ERROR
        elif frame_type == HEARTBEAT and not channel:
            return
        elif frame_type != HEARTBEAT:
            raise FrameError(
                m.FRAME_ERROR,
                amqp_error_text(
                    f"FRAME_ERROR - {frame_snippet(frame_type, payload)}: unknown_frame"
                ),
            )
        if self.phase in ENDING:
            return
        # a heartbeat on a channel, content on channel 0, a channel before Connection.OpenOk
        raise FrameError(
            m.UNEXPECTED_FRAME,
            amqp_error_text(f"UNEXPECTED_FRAME - {frame_snippet(frame_type, payload)}"),
        )

    def _forward(self, link: ChannelLink, frame_type: int, payload: memoryview) -> None:
        """Route one frame of an open channel upstream; publishes go out only when complete."""
        upstream = link.upstream
        number = link.upstream_number
        expected = link.content_expected
        if frame_type == METHOD:
            if expected != NO_CONTENT:
                raise FrameError(m.UNEXPECTED_FRAME, *_content_expected(expected))
            mid = method_id(payload)
            if mid == m.BASIC_PUBLISH:
                if payload != link.last_publish:  # a publisher repeats itself: check once
                    m.method_arguments(mid, payload)
                    if payload[-1] & m.PUBLISH_IMMEDIATE:
                        raise FrameError(
                            m.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true", 60, 40
                        )
                    link.last_publish = bytes(payload)
                link.content_parts.append(frame(METHOD, number, payload))
                link.content_expected = HEADER_EXPECTED
                return
            if mid in m.DELIVERY_ACKS:
                link.safe = False
                if len(payload) != m.DELIVERY_ACK_SIZE:
                    m.method_arguments(mid, payload)  # raises the broker's FRAME_ERROR
                if link.auto_ack_tags is None or link.client_acked(payload):
                    link.send(frame(METHOD, number, payload))
                return
            if mid in m.CLIENT_CHANNEL_METHODS:
                self._channel_method(link, mid, payload)
            elif mid >> 16 == 20:
                self._channel_class_method(link, mid, payload)
            else:
                refuse_method(mid)
        elif frame_type == HEADER:
            if expected != HEADER_EXPECTED:
                raise FrameError(m.UNEXPECTED_FRAME, *_content_expected(expected))
            try:
                size = check_content_header(payload)
            except FrameError as exc:
                if exc.code != m.INTERNAL_ERROR:
                    raise
                # RabbitMQ reads a message's properties only when it publishes it (and its
                # exchange exists): that is when this one is answered (see _unreadable)
                size = CONTENT_HEADER.unpack_from(payload)[2]
                link.content_parts.clear()
                link.unreadable = True
            if link.unreadable:
                link.content_expected = size
                if size == 0:
                    self._unreadable(link)
                return
            if size > self.max_message_size:
                link.content_parts.clear()
                link.content_expected = NO_CONTENT
                self._close_channel(
                    link,
                    m.PRECONDITION_FAILED,
                    f"PRECONDITION_FAILED - message size {size} is larger than configured max "
                    f"size {self.max_message_size}",
                    m.BASIC_PUBLISH,
                )
                return
            link.content_parts.append(frame(HEADER, number, payload))
            link.content_expected = size
            if size == 0:
                self._publish(link)
        elif frame_type == BODY:
            if expected < 0:
                raise FrameError(m.UNEXPECTED_FRAME, *_content_expected(expected))
            if len(payload) > expected:
                # RabbitMQ counts below zero and waits for the rest forever: the message is
                # never published, and the next method on the channel is an UNEXPECTED_FRAME
                link.content_parts.clear()
                link.content_expected = WEDGED
                return
            if expected == WEDGED:
                return
            if link.unreadable:
                link.content_expected = expected - len(payload)
                if link.content_expected == 0:
                    self._unreadable(link)
                return
            if len(payload) + OVERHEAD <= upstream.frame_max:
                link.content_parts.append(frame(BODY, number, payload))
            else:
                link.content_parts.extend(body_frames(number, payload, upstream.frame_max))
            link.content_expected = expected - len(payload)
            if link.content_expected == 0:
                self._publish(link)

    def _unreadable(self, link: ChannelLink) -> None:
        """A complete message whose properties RabbitMQ could not read. It would look up the
        exchange first (404 on the channel when it is missing), then fail to read them (541
        on the connection). So the proxy asks the broker about the exchange, in order on the
        channel, and reads nothing more from the client until it has answered."""
        link.unreadable = False
        link.content_expected = NO_CONTENT
        exchange = str(m.method_arguments(m.BASIC_PUBLISH, link.last_publish)[1])
        if not exchange:  # the default exchange is always there
            self.close_with(m.INTERNAL_ERROR, "INTERNAL_ERROR", kind="protocol_error")
            return
        passive = m.encode_method(
            link.upstream_number, m.commands.Exchange.Declare(exchange=exchange, passive=True)
        )
        self._verdict = self.loop.create_future()
        link.send_request(passive, m.EXCHANGE_DECLARE, Request.UNREADABLE)
        self.run_paused(self._await_verdict(self._verdict))

    @staticmethod
    async def _await_verdict(verdict: asyncio.Future[None]) -> None:
        await verdict

    def unreadable_answered(self, link: ChannelLink, exchange_found: bool) -> None:
        """The broker answered about the exchange of a message it could not have read."""
        if self._verdict is not None and not self._verdict.done():
            self._verdict.set_result(None)
        if exchange_found and self.phase is Phase.ACTIVE:
            self.close_with(m.INTERNAL_ERROR, "INTERNAL_ERROR", kind="protocol_error")

    def _publish(self, link: ChannelLink) -> None:
        self.stats.published += 1
        link.publish(b"".join(link.content_parts))
        link.content_parts.clear()
        link.content_expected = NO_CONTENT

    def _channel_class_method(self, link: ChannelLink, mid: int, payload: memoryview) -> None:
        if mid not in (m.CHANNEL_CLOSE, m.CHANNEL_FLOW, m.CHANNEL_OPEN):
            refuse_method(mid)
        arguments = m.method_arguments(mid, payload)
        if mid == m.CHANNEL_CLOSE:
            self._ack_written()  # what it has read is acked, not requeued by the close
            if link.client_close(payload, self.wait_for_broker or not link.safe, False):
                self._channel_closed(link)
        elif mid == m.CHANNEL_OPEN:
            raise FrameError(m.CHANNEL_ERROR, "CHANNEL_ERROR - second 'channel.open' seen", 20, 10)
        elif mid == m.CHANNEL_FLOW:
            if not arguments[0]:
                # RabbitMQ does not implement stopping a channel's flow (540)
                raise FrameError(m.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - active=false", 20, 20)
            link.safe = False
            link.send_request(frame(METHOD, link.upstream_number, payload), mid)

    def _channel_closed(self, link: ChannelLink) -> None:
        """The client's Channel.Close is answered at once."""
        del self.channels[link.client_number]
        self.send(frame(METHOD, link.client_number, CHANNEL_CLOSE_OK_PAYLOAD))

    def close_synced(self, link: ChannelLink) -> None:
        """A close of this client's that waited for the broker is answered (see ChannelLink)."""
        if self.phase is Phase.CLIENT_CLOSING:
            self._closes_pending -= 1
            if self._closes_pending <= 0:
                self._connection_closed()
        elif not link.awaits_close_ok:
            self.channels.pop(link.client_number, None)

    def channel_gone(self, link: ChannelLink) -> None:
        self.channels.pop(link.client_number, None)

    def _channel_method(self, link: ChannelLink, mid: int, payload: memoryview) -> None:
        """Look at a method before it goes upstream (the few whose meaning the proxy must
        know) and send it, unless the proxy answers it itself."""
        arguments = m.method_arguments(mid, payload)
        kind = Request.FORWARD
        if mid in QUEUE_METHODS:
            if not self._queue_accessible(link, mid, arguments):
                return
            # what RabbitMQ would close the whole (shared) connection for, refused here
            self.worker.queue_types.check(self.vhost, mid, arguments)
        if mid == m.BASIC_QOS:
            self._qos(link, *arguments)
            return
        elif mid == m.BASIC_RECOVER or mid == m.BASIC_RECOVER_ASYNC:
            if not arguments[0]:
                raise FrameError(
                    m.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - requeue=false", 60, mid & 0xFFFF
                )
            if link.auto_ack_tags is not None:
                link.recover()
                if mid == m.BASIC_RECOVER_ASYNC:  # the proxy must see where the requeue ends
                    payload = memoryview(RECOVER_PAYLOAD)
                    mid, kind = m.BASIC_RECOVER, Request.DROP
        elif mid == m.TX_SELECT:
            link.settle_auto_acks()
            link.transactional = True
        elif mid == m.BASIC_CONSUME:
            self._consume(link, payload, arguments)
            return
        elif mid == m.BASIC_CANCEL:
            cancel = link.cancel_kind(str(arguments[0]), arguments[1])
            if cancel is not None:  # the proxy must see where its deliveries end
                payload[-1] &= ~CANCEL_NOWAIT_BIT
                arguments[1] = False
                kind = cancel
        elif mid == m.QUEUE_DECLARE:
            if not arguments[2]:
                types = self.worker.queue_types
                types.declared(self.vhost, str(arguments[1]), payload, arguments[7])
            kind = self._queue_declare(link, payload, arguments)
        elif mid == m.QUEUE_DELETE:
            queue = str(arguments[1])
            if not (arguments[2] or arguments[3]):
                self.worker.queue_types.deleted(self.vhost, queue)
            if link.upstream.exclusive_owners.get(queue) is self:
                # its name is free again (for others too, as directly) once it is deleted
                kind = Request.DELETE_EXCLUSIVE
                if arguments[4]:  # nowait: the proxy asks for the reply (and drops it)
                    payload[-1] &= ~DELETE_NOWAIT_BIT
                    arguments[4] = False
                    kind = Request.DELETE_EXCLUSIVE_UNASKED
                self._send_method(link, mid, payload, arguments, kind, queue)
                return
        elif (
            mid == m.EXCHANGE_DECLARE
            and not arguments[3]  # passive
            and not self.worker.exchange_types.check(self, link, str(arguments[2]), payload)
        ):
            return
        if not (mid == m.BASIC_GET and arguments[2]):
            link.safe = False
        self._send_method(link, mid, payload, arguments, kind)

    def _send_method(
        self,
        link: ChannelLink,
        mid: int,
        payload: bytes | memoryview,
        arguments: list[Any],
        kind: Request = Request.FORWARD,
        subject: str = "",
    ) -> None:
        data = frame(METHOD, link.upstream_number, payload)
        nowait = NOWAIT_ARGUMENT.get(mid)
        if mid in SYNCHRONOUS and (nowait is None or not arguments[nowait]):
            link.send_request(data, mid, kind, subject)
        else:
            link.send(data)

    def send_declare(self, link: ChannelLink, payload: bytes) -> None:
        """An Exchange.Declare whose type the broker was just seen to accept."""
        arguments = m.method_arguments(m.EXCHANGE_DECLARE, payload)
        self._send_method(link, m.EXCHANGE_DECLARE, payload, arguments)

    def _queue_accessible(self, link: ChannelLink, mid: int, arguments: list[Any]) -> bool:
        """An exclusive queue is its declaring connection's; here that connection is shared,
        so the proxy refuses it to the other clients on it, as RabbitMQ would across
        connections."""
        queue = str(arguments[1])
        if not queue or (
            mid == m.QUEUE_DECLARE and not arguments[2] and queue.startswith("amq.")
        ):  # the broker's own answer (403 for a reserved name) comes first
            return True
        owner = link.upstream.exclusive_owners.get(queue)
        if owner is None or owner is self:
            return True
        self._close_channel(
            link,
            m.RESOURCE_LOCKED,
            f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in "
            f"vhost '{self.vhost}'. It could be originally declared on another connection or "
            f"the exclusive property value does not match that of the original declaration.",
            mid,
        )
        return False

    def _qos(self, link: ChannelLink, size: int, count: int, global_: bool) -> None:
        """Answer Basic.Qos here when nothing else is awaited on the channel (its reply
        carries nothing from the broker), and let it follow upstream without the client
        waiting, unless the upstream channel has that prefetch already (a reused channel:
        php-amqp sets the same prefetch on every channel)."""
        if size:
            # RabbitMQ closes the whole connection for this (540): keep it to this client.
            raise FrameError(
                m.NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - prefetch_size!=0 ({size})", 60, 10
            )
        if global_:
            link.global_qos_set = True
            current = link.global_prefetch
        else:
            link.consumer_qos_set = True
            current = link.consumer_prefetch
        if link.awaits_reply:
            # a reply to the client is due first: the broker's QosOk must not overtake it
            link.set_prefetch(count, global_, Request.FORWARD)
            return
        self.send(frame(METHOD, link.client_number, BASIC_QOS_OK_PAYLOAD))
        if count != current:
            link.set_prefetch(count, global_, Request.DROP)

    def _consume(self, link: ChannelLink, payload: memoryview, arguments: list[Any]) -> None:
        """Start a consumer. One the client makes with no_ack is consumed upstream with acks
        (the proxy acks each delivery once it has left for the client's socket) and, like one
        with no prefetch limit, with a window of consumer_window deliveries: a client that
        reads slowly slows the broker down instead of filling the proxy's memory, and a
        client that goes away loses nothing the broker would not have kept for it."""
        queue, tag, nowait = str(arguments[1]), str(arguments[2]), arguments[6]
        # (RabbitMQ pushes direct reply-to replies itself and refuses an acking consumer;
        # on a transactional channel the proxy's acks would wait for the client's commit)
        no_ack = arguments[4] and queue != DIRECT_REPLY_TO and not link.transactional
        link.safe = False
        link.reset_inherited_prefetch()
        tags = link.consumer_tags
        if tag and tags is not None and tag in tags:
            # RabbitMQ closes the whole connection for this: keep it to this client
            raise FrameError(
                m.NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'", 60, 20
            )
        kind = Request.FORWARD
        if tag:
            link.consumer_tag_taken(tag)
        if no_ack:
            kind = Request.NAMED_AUTO_ACK if tag else Request.CONSUME_AUTO_ACK
        elif not (tag or nowait):
            kind = Request.CONSUME
        flags = 4 + 2 + 1 + len(queue.encode("utf-8", "surrogateescape")) + 1
        flags += len(tag.encode("utf-8", "surrogateescape"))
        if no_ack:
            payload[flags] &= ~CONSUME_NO_ACK_BIT
            if nowait:  # the proxy acks from the ConsumeOk on: it asks for one
                payload[flags] &= ~CONSUME_NOWAIT_BIT
                arguments[6] = False
                kind = Request.NAMED_AUTO_ACK_UNASKED if tag else Request.CONSUME_AUTO_ACK_UNASKED
        # (a stream consumer must set its own prefetch: RabbitMQ refuses it one without)
        window = no_ack or not (
            link.consumer_prefetch
            or queue == DIRECT_REPLY_TO
            or self.worker.queue_types.get(self.vhost, queue) == "stream"
        )
        previous = link.consumer_prefetch
        if window:
            link.set_prefetch(self.worker.config.consumer_window, False, Request.DROP)
        self._send_method(link, m.BASIC_CONSUME, payload, arguments, kind)
        if window:
            link.set_prefetch(previous, False, Request.DROP)

    def acks_due(self, link: ChannelLink) -> None:
        self._acks_due.add(link)

    def _ack_written(self) -> None:
        """Ack upstream what the client's socket has taken of its auto-ack deliveries."""
        transport = self.transport
        if self._acks_due and transport is not None and not transport.get_write_buffer_size():
            for link in self._acks_due:
                link.send_auto_acks()
            self._acks_due.clear()

    def resume_writing(self) -> None:
        self._ack_written()

    def _queue_declare(
        self, link: ChannelLink, payload: memoryview, arguments: list[Any]
    ) -> Request:
        """Remember exclusive queues: they belong to the shared upstream connection, which
        outlives this client, so the proxy deletes them when the client goes and refuses
        them to other clients of that connection."""
        queue, passive, exclusive, nowait = arguments[1], arguments[2], arguments[4], arguments[6]
        if not exclusive or passive:
            return Request.FORWARD
        if not nowait:
            return Request.EXCLUSIVE
        if queue:
            self._own_exclusive(link.upstream, queue)
            return Request.FORWARD
        # A server-named queue: the proxy must learn its name, so it asks for the DeclareOk
        # (clearing the nowait bit in place) and keeps it from the client.
        payload[4 + 2 + 1 + len(queue.encode("utf-8", "surrogateescape"))] &= ~NOWAIT_BIT
        arguments[6] = False
        return Request.EXCLUSIVE_UNASKED

    def exclusive_declared(self, link: ChannelLink, queue: str) -> None:
        self._own_exclusive(link.upstream, queue)

    def _own_exclusive(self, upstream: UpstreamConnection, queue: str) -> None:
        self.exclusive_queues.setdefault(upstream, set()).add(queue)
        upstream.exclusive_owners[queue] = self

    def exclusive_deleted(self, link: ChannelLink, queue: str) -> None:
        upstream = link.upstream
        if upstream.exclusive_owners.get(queue) is self:
            del upstream.exclusive_owners[queue]
            self.exclusive_queues[upstream].discard(queue)

    def _close_channel(self, link: ChannelLink, code: int, text: str, mid: int) -> None:
        """Close one channel at the proxy, as the broker would: Channel.Close to the client
        (which must confirm), the upstream channel given back behind it. Like the broker's,
        it comes after the answers to what the client sent before: until then, the client's
        frames on the channel are dropped (see ChannelLink.error_due)."""
        link.error_due = (code, text, mid)
        if link.unanswered:
            if link.unsynced:
                link.sync()
            return
        self.channel_error_due(link)

    def channel_error_due(self, link: ChannelLink) -> None:
        """Send the Channel.Close for an error the proxy found (see _close_channel)."""
        assert link.error_due is not None
        code, text, mid = link.error_due
        number = link.client_number
        link.client_left()
        stub = ChannelLink(self, number, link.upstream, 0)
        stub.up = Up.CLOSED
        stub.awaits_close_ok = True
        self.channels[number] = stub
        self.send(m.close_frame(number, code, text, mid >> 16, mid & 0xFFFF))

    def _channel_not_open(
        self, frame_type: int, channel: int, payload: memoryview, link: ChannelLink | None
    ) -> None:
        """A frame on a channel that is not (or no longer) open."""
        mid = method_id(payload) if frame_type == METHOD else 0
        if link is None:
            if frame_type != METHOD:
                raise FrameError(m.UNEXPECTED_FRAME, *_content_expected(NO_CONTENT))
            if mid not in m.commands.INDEX_MAPPING:
                refuse_method(mid)
            m.method_arguments(mid, payload)
            if mid == m.CHANNEL_OPEN:
                self._open_channel(channel)
                return
            raise FrameError(
                m.CHANNEL_ERROR, "CHANNEL_ERROR - expected 'channel.open'", mid >> 16, mid & 0xFFFF
            )
        if link.error_due:
            return  # the client does not know it yet: as after an error, the broker drops it
        if link.awaits_close_ok:
            # The channel is closed on the client's side too: as the broker's closing channel,
            # answer a Close and wait for the CloseOk; drop everything else.
            if mid == m.CHANNEL_CLOSE:
                self.send(frame(METHOD, channel, CHANNEL_CLOSE_OK_PAYLOAD))
            elif mid == m.CHANNEL_CLOSE_OK and link.client_close_ok():
                del self.channels[channel]
        # owes_close_ok: the client awaits our CloseOk; what it sends meanwhile is dropped

    def _open_channel(self, number: int) -> None:
        if number > self.channel_max:
            raise FrameError(
                m.CHANNEL_ERROR,
                f"CHANNEL_ERROR - channel {number} exceeds channel_max {self.channel_max}",
            )
        assert self.pool is not None
        link = self.pool.take_channel(self, number)
        if link is not None:
            self._attach(link)
        else:
            self.run_paused(self._open_channel_later(number))

    async def _open_channel_later(self, number: int) -> None:
        assert self.pool is not None
        try:
            link = await self.pool.acquire_channel(self, number)
        except UpstreamError as exc:
            self.close_with(exc.code, exc.text, 20, 10)
            return
        if self.phase is not Phase.ACTIVE:
            link.client_left()
            return
        self._attach(link)

    def _attach(self, link: ChannelLink) -> None:
        """The client's side of a new channel: answered at once, whatever happens upstream."""
        number = link.client_number
        upstream = link.upstream
        if self.home is None:
            self.home = upstream
        self.channels[number] = link
        self.send(frame(METHOD, number, CHANNEL_OPEN_OK_PAYLOAD))
        if upstream.blocked is not None:
            self.upstream_blocked(upstream)
        if upstream.write_paused:
            upstream.hold(self)

    def run_paused(self, step: Any) -> None:
        """Run an async step with parsing paused, so later frames wait for it in order."""
        self.pause_parsing()
        task: asyncio.Task[None] = self.loop.create_task(step)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("client %s: internal error", self.peer, exc_info=t.exception())
                self.close_with(
                    m.INTERNAL_ERROR, "INTERNAL_ERROR - proxy error", kind="internal_error"
                )
            if not self.closed:
                self.resume_parsing()

        task.add_done_callback(done)

    # --- connection class -----------------------------------------------------------------

    def _connection_method(self, payload: memoryview) -> None:
        index = method_id(payload)
        if index not in m.commands.INDEX_MAPPING:
            refuse_method(index)
        try:
            arguments = m.method_arguments(index, payload)
        except FrameError:
            # on channel 0 RabbitMQ's reader decodes (and crashes) itself: 541
            raise FrameError(m.INTERNAL_ERROR, "INTERNAL_ERROR") from None
        if index >> 16 != 10 and self.phase is Phase.ACTIVE:
            raise FrameError(
                m.CHANNEL_ERROR,
                "CHANNEL_ERROR - unexpected method in connection state running",
                index >> 16, index & 0xFFFF,
            )  # fmt: skip
        phase = self.phase
        if phase is Phase.CLOSING:
            if index in (m.CONNECTION_CLOSE_OK, m.CONNECTION_CLOSE):
                if index == m.CONNECTION_CLOSE:
                    self.send(CONNECTION_CLOSE_OK)
                self.phase = Phase.CLOSED
                self.close_transport()
            return
        if phase is Phase.CLIENT_CLOSING:
            return  # the client awaits our CloseOk
        if index == m.CONNECTION_CLOSE:
            self._client_connection_close(int(arguments[0]), str(arguments[1]))
        elif phase is Phase.START_OK and index == m.CONNECTION_START_OK:
            self._start_ok(arguments, payload)
        elif phase is Phase.TUNE_OK and index == m.CONNECTION_TUNE_OK:
            self._tune_ok(*arguments)
        elif phase is Phase.OPEN and index == m.CONNECTION_OPEN:
            self.vhost = str(arguments[0])
            self.phase = Phase.OPENING
            self.run_paused(self._authenticate())
        elif phase is Phase.ACTIVE and index == m.CONNECTION_UPDATE_SECRET:
            # The pooled upstream connections keep the secret they were opened with (see
            # docs/differences.md); the client's connection carries on, as it would directly.
            self.send(CONNECTION_UPDATE_SECRET_OK)
        else:
            raise FrameError(
                m.COMMAND_INVALID, f"COMMAND_INVALID - unexpected {m.method_name(index)}"
            )

    def _client_connection_close(self, code: int, text: str) -> None:
        """The client leaves. With close_policy processed, its CloseOk waits until the broker
        has processed what it published on each channel (and any error that caused is passed
        on first, as RabbitMQ does); with local, it is answered at once."""
        self._ending("client_close", "client closed the connection")
        self._ack_written()
        if code != m.REPLY_SUCCESS:
            self._close_reason += f" ({code} {text})"
        self.phase = Phase.CLIENT_CLOSING
        pending = 0
        if self.wait_for_broker:
            for link in list(self.channels.values()):
                if link.owes_close_ok:
                    pending += 1  # its Channel.Close is under way: that answer comes first
                elif (link.client_open or link.error_due) and not link.client_close(
                    None, True, True
                ):
                    pending += 1
        self._closes_pending = pending
        if not pending:
            self._connection_closed()

    def _connection_closed(self) -> None:
        self._release_channels()
        self.send(CONNECTION_CLOSE_OK)
        self.phase = Phase.CLOSED
        self.close_transport()

    def _start_ok(self, arguments: list[Any], payload: memoryview) -> None:
        """Check the login now, as the broker does: a refusal answers StartOk."""
        self.capabilities = m.client_capabilities(arguments, payload)
        mechanism = str(arguments[1])
        try:
            self.user, self._password = m.parse_sasl_response(mechanism, arguments[2])
        except m.WrongSaslType:
            self._refuse_login(
                UpstreamError(
                    m.ACCESS_REFUSED,
                    f"ACCESS_REFUSED - Login was refused using authentication mechanism "
                    f"{mechanism}. For details see the broker logfile.",
                )
            )
            return
        except ValueError as exc:  # RabbitMQ just drops the client
            raise FrameError(DROP, f"login: {exc}") from None
        self.run_paused(self._check_login(Login(self.user, self._password, mechanism)))

    async def _check_login(self, login: Login) -> None:
        """Known-good credentials (a live upstream connection was opened with them) are
        accepted at once; others are put to the broker on an upstream connection that stops
        after Tune, which Connection.Open then completes (see Pools.login)."""
        pools = self.worker.pools
        if not pools.verified(login.user, login.password):
            self._login = pools.login(login)
            try:
                await asyncio.shield(self._login.task)
            except UpstreamError as exc:
                if exc.code == m.ACCESS_REFUSED:
                    self._refuse_login(exc)
                    return
                # Not a refusal (the broker is unreachable...): answered at Connection.Open,
                # where clients expect it, not as if the login had been refused.
                self._upstream_failure = exc
        self.send(self.worker.connection_tune)
        self.phase = Phase.TUNE_OK

    def _refuse_login(self, exc: UpstreamError) -> None:
        self._release_login()
        if exc.code == m.ACCESS_REFUSED:
            self.stats.auth_failures[str(exc.code)] += 1
            log.warning(
                "client %s: authentication failed for user=%r: %s", self.peer, self.user, exc.text
            )
            if "authentication_failure_close" not in self.capabilities:
                # RabbitMQ just drops such a client (it cannot tell a Close from a failure)
                self._ending("auth_failed", f"login refused: {exc.text}")
                self.abort()
                return
        self.close_with(
            exc.code,
            exc.text,
            kind="auth_failed" if exc.code == m.ACCESS_REFUSED else "upstream_closed",
        )

    def _release_login(self) -> None:
        if self._login is not None:
            self._login.release()
            self._login = None

    def _tune_ok(self, channel_max: int, frame_max: int, heartbeat: int) -> None:
        """As RabbitMQ: a value outside what Tune offered (0 meaning no limit) drops the
        connection, with no Connection.Close."""
        for field, value, lowest, offered in (
            ("frame_max", frame_max, MIN_FRAME_MAX, DEFAULT_FRAME_MAX),
            ("channel_max", channel_max, 1, CHANNEL_MAX),
        ):
            if value and value < lowest:
                raise FrameError(
                    DROP,
                    f"negotiated {field} = {value} is lower than the minimum allowed value "
                    f"({lowest})",
                )
            if value == 0 or value > offered:
                detail = " (no limit)" if field == "channel_max" and value == 0 else ""
                raise FrameError(
                    DROP,
                    f"negotiated {field} = {value}{detail} is higher than the maximum allowed "
                    f"value ({offered})",
                )
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = heartbeat
        self.phase = Phase.OPEN

    async def _authenticate(self) -> None:
        """Connection.Open: the client's pool must have a connection open on its vhost, or
        one is opened now (on the connection its login was checked on, if it has one)."""
        limit = self.worker.config.max_client_connections
        if limit and self.worker.active_sessions >= limit:
            log.warning("client %s refused: max_client_connections (%d) reached", self.peer, limit)
            self.close_with(
                m.NOT_ALLOWED,
                f"NOT_ALLOWED - connection limit ({limit} per worker) of amqproxy-mp is reached",
                10, 40, kind="connection_limit",
            )  # fmt: skip
            return
        pools = self.worker.pools
        pool = pools.get((self.user, self._password, self.vhost))
        tuned = self._login.claim() if self._login is not None else None
        self._release_login()
        try:
            if self._upstream_failure is not None:
                raise self._upstream_failure
            await pool.authenticate(tuned)
        except UpstreamError as exc:
            pools.forget_if_unused(pool)
            refused = exc.code in (m.ACCESS_REFUSED, m.NOT_ALLOWED)
            if refused:
                self.stats.auth_failures[str(exc.code)] += 1
                log.warning(
                    "client %s: authentication failed for user=%r vhost=%r: %s %s",
                    self.peer, self.user, self.vhost, exc.code, exc.text,
                )  # fmt: skip
            self.close_with(
                exc.code, exc.text, 10, 40, kind="auth_failed" if refused else "upstream_closed"
            )
            return
        if self.phase is not Phase.OPENING:
            pools.forget_if_unused(pool)
            return
        self.pool = pool
        pool.clients += 1
        self.worker.active_sessions += 1
        self.phase = Phase.ACTIVE
        self.send(CONNECTION_OPEN_OK)
        # one INFO line per client, when it leaves (PHP-FPM opens thousands a second)
        log.debug("client %s connected as user=%r vhost=%r", self.peer, self.user, self.vhost)

    # --- frames from the broker -----------------------------------------------------------

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None:
        """Send a frame that arrived upstream to this client, split to its frame_max."""
        if self.phase is Phase.CLIENT_CLOSING and (
            frame_type != METHOD or method_id(payload) != m.CHANNEL_CLOSE
        ):
            return  # it discards all but a channel's close now (AMQP 0-9-1, 1.4.2.5)
        if frame_type == BODY and len(payload) + OVERHEAD > self.frame_max:
            for part in body_frames(channel, payload, self.frame_max):
                self.send(part)
        else:
            self.send(frame(frame_type, channel, payload))

    def upstream_blocked(self, upstream: UpstreamConnection) -> None:
        first = not self._blocked_by
        self._blocked_by.add(upstream)
        upstream.blocked_clients.add(self)
        if first and "connection.blocked" in self.capabilities:
            reason = upstream.blocked or ""
            self.send(m.encode_method(0, m.commands.Connection.Blocked(reason)))

    def upstream_unblocked(self, upstream: UpstreamConnection) -> None:
        if upstream not in self._blocked_by:
            return
        self._blocked_by.discard(upstream)
        if not self._blocked_by and "connection.blocked" in self.capabilities:
            self.send(m.encode_method(0, m.commands.Connection.Unblocked()))

    def _release_channels(self) -> None:
        for upstream, queues in self.exclusive_queues.items():
            mine = {queue for queue in queues if upstream.exclusive_owners.get(queue) is self}
            for queue in mine:
                del upstream.exclusive_owners[queue]
            if mine:
                upstream.delete_queues(mine, self, self.channels.values())
        self.exclusive_queues.clear()
        for link in self.channels.values():
            if link.client is self:
                link.client_left()
        self.channels.clear()

    def __repr__(self) -> str:
        return f"<ClientSession {self.peer} user={self.user!r} vhost={self.vhost!r}>"
