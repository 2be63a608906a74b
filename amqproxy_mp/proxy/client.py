"""One client connection: the server side of the AMQP handshake and the client half of routing.

The session answers the handshake itself, authenticates the client through its
pool (an upstream connection for exactly its credentials) before Connection.OpenOk,
maps each client channel onto a shared upstream channel, and validates what the
client sends so that nothing it does can make the broker close a connection that
other clients share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp.frames import (
    BODY,
    HEADER,
    HEARTBEAT,
    METHOD,
    MIN_FRAME_MAX,
    OVERHEAD,
    PROTOCOL_HEADER,
    FrameError,
    body_frames,
    frame,
    method_id,
)
from amqproxy_mp.amqp.methods import commands
from amqproxy_mp.amqp.transport import DEFAULT_FRAME_MAX, FramedProtocol
from amqproxy_mp.amqp.validate import check_content_header, check_method
from amqproxy_mp.proxy.channels import (
    BROKER_CLOSED,
    CLIENT_CLOSING,
    HEADER_EXPECTED,
    NO_CONTENT,
    NO_PREFETCH,
    OPEN,
    ChannelLink,
)
from amqproxy_mp.proxy.upstream import UpstreamError

if TYPE_CHECKING:
    from amqproxy_mp.proxy.pool import Pool
    from amqproxy_mp.proxy.upstream import UpstreamConnection
    from amqproxy_mp.worker import Worker

log = logging.getLogger(__name__)

CHANNEL_MAX: Final = 2047
CHANNEL_OPEN_OK_PAYLOAD: Final = b"\x00\x14\x00\x0b\x00\x00\x00\x00"
CHANNEL_CLOSE_OK_PAYLOAD: Final = b"\x00\x14\x00\x29"
# Queue.Declare bookkeeping (ChannelLink.declares): is the queue exclusive, and did the client
# ask for the DeclareOk?
NOT_EXCLUSIVE, EXCLUSIVE, EXCLUSIVE_UNASKED = range(3)
#: Queue.Declare's flags octet: after the method id, ticket and the queue name's length octet.
NOWAIT_OFFSET: Final = 4 + 2 + 1
NOWAIT_BIT: Final = 0x10
# Constant frames of the handshake, encoded once.
CONNECTION_OPEN_OK: Final = m.encode_method(0, commands.Connection.OpenOk())
CONNECTION_CLOSE_OK: Final = m.encode_method(0, commands.Connection.CloseOk())
BASIC_QOS_OK_PAYLOAD: Final = b"\x00\x3c\x00\x0b"
#: How long a client gets to answer our Connection.Close before its socket is closed.
CLOSE_OK_TIMEOUT: Final = 5.0

# Session states.
AWAIT_HEADER, AWAIT_START_OK, AWAIT_TUNE_OK, AWAIT_OPEN, OPENING, ACTIVE, CLOSING, CLOSED = range(8)


class ClientSession(FramedProtocol):
    def __init__(self, worker: Worker) -> None:
        super().__init__(worker.loop)
        self.worker = worker
        self.state = AWAIT_HEADER
        self.peer = "?"
        self.connected_at = time.monotonic()
        self.user = ""
        self.vhost = ""
        self._password = ""
        self.capabilities: dict[str, Any] = {}
        self.pool: Pool | None = None
        self.channels: dict[int, ChannelLink] = {}
        self.channel_max = CHANNEL_MAX
        self.frame_max = DEFAULT_FRAME_MAX
        #: Upstream connections that told us they block publishers.
        self._blocked_by: set[int] = set()
        #: Exclusive queues this client declared, per upstream connection that owns them.
        self.exclusive_queues: dict[UpstreamConnection, set[str]] = {}
        self._close_reason = ""
        #: The reason label for the disconnect metric.
        self._close_kind = ""
        self.stats = worker.stats
        self.max_buffer = worker.config.client_max_buffer
        self.max_message_size = worker.config.max_message_size
        self._tasks: set[asyncio.Task[None]] = set()

    # --- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
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
        self.state = CLOSED
        self.closed = True
        self._release_channels()
        for task in self._tasks:
            task.cancel()
        self.worker.sessions.discard(self)
        if self.pool is not None:
            self.pool.clients -= 1
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
        if self.state != AWAIT_HEADER:
            super().data_received(data)
            return
        self.count_received(len(data))
        self._buf += data
        got = bytes(self._buf[:8])
        if got != PROTOCOL_HEADER[: len(got)]:
            self._ending("protocol_error", f"bad protocol header {got!r}")
            self.send(PROTOCOL_HEADER)
            self.state = CLOSED
            self.close_transport()
            return
        if len(got) < 8:
            return
        del self._buf[:8]
        self.state = AWAIT_START_OK
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
        if self.state in (CLOSING, CLOSED):
            return
        self._ending(kind, f"closed by proxy: {code} {text}")
        self._release_channels()
        self.send(m.encode_method(0, commands.Connection.Close(code, text, class_id, method_id)))
        self.state = CLOSING
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
        if self.state == CLOSING:
            # Already closing: the rest of what it sent is discarded. Closing the socket now,
            # with unread bytes, would reset it and could destroy our Connection.Close.
            return
        log.warning("client %s (user=%r) protocol error: %s", self.peer, self.user, exc.text)
        if self.state < AWAIT_TUNE_OK:
            self._ending("protocol_error", f"protocol error: {exc.text}")
            self.state = CLOSED
            self.close_transport()
        else:
            self.close_with(exc.code, exc.text, kind="protocol_error")

    def check_heartbeat(self, now: float, handshake_timeout: float) -> None:
        if self.state < OPENING and now - self.connected_at > handshake_timeout:
            self._ending(
                "handshake_timeout", f"handshake not completed within {handshake_timeout:g} s"
            )
            self.abort()
        elif not self.send_heartbeat_if_due(now):
            self._ending("heartbeat", f"missed heartbeats (heartbeat {self.heartbeat} s)")
            self.abort()

    # --- frames from the client -----------------------------------------------------------

    def frame_received(self, frame_type: int, channel: int, payload: memoryview) -> None:
        if self.state == ACTIVE and channel:
            link = self.channels.get(channel)
            if link is not None and link.state == OPEN:
                self._forward(link, frame_type, payload)
            else:
                self._channel_not_open(frame_type, channel, payload, link)
        elif frame_type == METHOD:
            if channel:
                self._channel_not_open(frame_type, channel, payload, None)
            else:
                self._connection_method(payload)
        elif frame_type != HEARTBEAT:
            raise FrameError(
                m.UNEXPECTED_FRAME,
                f"UNEXPECTED_FRAME - frame type {frame_type} on channel {channel}",
            )

    def _forward(self, link: ChannelLink, frame_type: int, payload: memoryview) -> None:
        """Route one frame of an open channel upstream; publishes go out only when complete."""
        upstream = link.upstream
        number = link.upstream_number
        expected = link.content_expected
        if frame_type == METHOD:
            if expected != NO_CONTENT:
                raise FrameError(
                    m.UNEXPECTED_FRAME,
                    f"UNEXPECTED_FRAME - method while content on channel "
                    f"{link.client_number} is incomplete",
                )
            mid = method_id(payload)
            if mid == m.BASIC_PUBLISH:
                if payload != link.last_publish:  # a publisher repeats itself: check once
                    check_method(mid, payload)
                    if payload[-1] & m.PUBLISH_IMMEDIATE:
                        raise FrameError(m.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true")
                    link.last_publish = bytes(payload)
                link.content_parts.append(frame(METHOD, number, payload))
                link.content_expected = HEADER_EXPECTED
                return
            if mid in m.DELIVERY_ACKS:
                link.safe = False
                if len(payload) != m.DELIVERY_ACK_SIZE:
                    raise FrameError(
                        m.SYNTAX_ERROR, f"SYNTAX_ERROR - malformed {m.method_name(mid)}"
                    )
            elif mid >> 16 <= 20:  # connection and channel class: only a few are legal here
                self._channel_class_method(link, mid, payload)
                return
            elif mid not in m.CLIENT_CHANNEL_METHODS:
                raise FrameError(
                    m.COMMAND_INVALID,
                    f"COMMAND_INVALID - {m.method_name(mid)} cannot be sent by a client",
                )
            elif not self._inspect(link, m.decode_method(payload), payload):
                return
            link.send(frame(METHOD, number, payload))
        elif frame_type == HEADER:
            if expected != HEADER_EXPECTED:
                raise FrameError(
                    m.UNEXPECTED_FRAME,
                    f"UNEXPECTED_FRAME - content header on channel "
                    f"{link.client_number} without a content method",
                )
            size = check_content_header(payload)
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
                raise FrameError(
                    m.UNEXPECTED_FRAME,
                    f"UNEXPECTED_FRAME - content body on channel "
                    f"{link.client_number} without a content header",
                )
            if len(payload) > expected:
                raise FrameError(
                    m.FRAME_ERROR,
                    f"FRAME_ERROR - content body on channel {link.client_number} "
                    f"is larger than its header announced",
                )
            if len(payload) + OVERHEAD <= upstream.frame_max:
                link.content_parts.append(frame(BODY, number, payload))
            else:
                link.content_parts.extend(body_frames(number, payload, upstream.frame_max))
            link.content_expected = expected - len(payload)
            if link.content_expected == 0:
                self._publish(link)
        else:
            raise FrameError(m.FRAME_ERROR, f"FRAME_ERROR - frame type {frame_type} on a channel")

    def _publish(self, link: ChannelLink) -> None:
        self.stats.published += 1
        link.send(b"".join(link.content_parts))
        link.content_parts.clear()
        link.content_expected = NO_CONTENT

    def _channel_class_method(self, link: ChannelLink, mid: int, payload: memoryview) -> None:
        if mid in m.CLIENT_CHANNEL_CLASS_METHODS:
            check_method(mid, payload)
        if mid == m.CHANNEL_CLOSE:
            if link.safe:
                # Nothing the broker could still say on it matters to this client: answer
                # here and keep the upstream channel for the next client.
                del self.channels[link.client_number]
                self.send(frame(METHOD, link.client_number, CHANNEL_CLOSE_OK_PAYLOAD))
                link.upstream.park(link)
                return
            link.state = CLIENT_CLOSING
            link.send(frame(METHOD, link.upstream_number, payload))
        elif mid == m.CHANNEL_OPEN:
            raise FrameError(
                m.CHANNEL_ERROR,
                f"CHANNEL_ERROR - second 'channel.open' seen on channel {link.client_number}",
            )
        elif mid == m.CHANNEL_CLOSE_OK:
            pass  # nothing of ours awaits it
        elif mid == m.CHANNEL_FLOW:
            if not payload[4] & 1:
                # RabbitMQ does not implement stopping a channel's flow (540)
                raise FrameError(m.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - active=false")
            link.safe = False
            link.send(frame(METHOD, link.upstream_number, payload))
        else:  # Channel.FlowOk (RabbitMQ never asks for it), Channel.OpenOk, connection class
            raise FrameError(
                m.COMMAND_INVALID,
                f"COMMAND_INVALID - {m.method_name(mid)} on channel {link.client_number}",
            )

    def _inspect(self, link: ChannelLink, method: m.Method, payload: memoryview) -> bool:
        """Look at a (decoded, hence well-formed) method before it goes upstream; False when
        the proxy answered it itself."""
        queue = getattr(method, "queue", None)
        reserved = (
            queue
            and queue.startswith("amq.")
            and isinstance(method, commands.Queue.Declare)
            and not method.passive
        )  # the broker's 403 comes first
        if queue and isinstance(method, m.QUEUE_ACCESS) and not reserved:
            owner = link.upstream.exclusive_owners.get(queue)
            if owner is not None and owner is not self:
                # RabbitMQ's answer across connections; here both share one upstream connection
                self._close_channel(
                    link,
                    m.RESOURCE_LOCKED,
                    f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                    f"'{queue}' in vhost '{self.vhost}'. It could be originally declared on "
                    f"another connection or the exclusive property value does not match that "
                    f"of the original declaration.",
                    method.index,
                )
                return False
        if isinstance(method, commands.Basic.Qos):
            return self._qos(link, method, payload)
        if isinstance(method, commands.Basic.Recover | commands.Basic.RecoverAsync):
            if not method.requeue:
                raise FrameError(m.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - requeue=false")
        elif (
            isinstance(method, commands.Basic.Consume)
            and not link.client_qos
            and link.prefetch != NO_PREFETCH
        ):
            # a reused channel: the prefetch an earlier client set is not this client's
            link.upstream.reset_prefetch(link)
        if isinstance(method, commands.Basic.Consume) and method.consumer_tag:
            tags = link.consumer_tags
            if tags is None:
                tags = link.consumer_tags = set()
            elif method.consumer_tag in tags:
                raise FrameError(
                    m.NOT_ALLOWED,
                    f"NOT_ALLOWED - attempt to reuse consumer tag '{method.consumer_tag}'",
                )
            tags.add(method.consumer_tag)
        elif isinstance(method, commands.Basic.Cancel) and link.consumer_tags:
            link.consumer_tags.discard(method.consumer_tag)
        if not (isinstance(method, commands.Basic.Get) and method.no_ack):
            link.safe = False
        if isinstance(method, commands.Queue.Declare):
            self._queue_declare(link, method, payload)
        elif isinstance(method, commands.Exchange.Declare) and not method.passive:
            return self.worker.exchange_types.check(self, link, method, payload)
        return True

    def _qos(self, link: ChannelLink, qos: commands.Basic.Qos, payload: memoryview) -> bool:
        """Answer Basic.Qos here (its reply carries nothing from the broker) and let it follow
        upstream without the client waiting, unless the upstream channel has that prefetch
        already (a reused channel: php-amqp sets the same prefetch on every channel)."""
        if qos.prefetch_size:
            # RabbitMQ closes the whole connection for this (540): keep it to this client.
            raise FrameError(
                m.NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - prefetch_size!=0 ({qos.prefetch_size})"
            )
        self.send(frame(METHOD, link.client_number, BASIC_QOS_OK_PAYLOAD))
        link.client_qos = True
        prefetch = (qos.prefetch_count or 0, bool(qos.global_))
        if prefetch != link.prefetch:
            link.prefetch = prefetch
            link.qos_pending += 1  # its QosOk is dropped
            link.send(frame(METHOD, link.upstream_number, payload))
        return False

    def _queue_declare(
        self, link: ChannelLink, declare: commands.Queue.Declare, payload: memoryview
    ) -> None:
        """Remember exclusive queues: they belong to the shared upstream connection, which
        outlives this client, so the proxy deletes them when the client goes and refuses
        them to other clients of that connection."""
        exclusive = bool(declare.exclusive and not declare.passive)
        kind = EXCLUSIVE if exclusive else NOT_EXCLUSIVE
        if declare.nowait:
            if not exclusive:
                return
            if declare.queue:
                self._own_exclusive(link.upstream, declare.queue)
                return
            # A server-named queue: the proxy must learn its name, so it asks for the
            # DeclareOk (clearing the nowait bit in place) and keeps it from the client.
            payload[NOWAIT_OFFSET + len(declare.queue or "")] &= ~NOWAIT_BIT
            kind = EXCLUSIVE_UNASKED
        if link.declares is None:
            link.declares = []
        link.declares.append(kind)

    def queue_declared(self, link: ChannelLink, payload: memoryview) -> bool:
        """A DeclareOk from the broker on one of this client's channels; False when the
        client did not ask for it (nowait)."""
        assert link.declares
        kind = link.declares.pop(0)
        if kind != NOT_EXCLUSIVE:
            ok = m.decode_method(payload)
            assert isinstance(ok, commands.Queue.DeclareOk)
            self._own_exclusive(link.upstream, ok.queue or "")
        return kind != EXCLUSIVE_UNASKED

    def _own_exclusive(self, upstream: UpstreamConnection, queue: str) -> None:
        self.exclusive_queues.setdefault(upstream, set()).add(queue)
        upstream.exclusive_owners[queue] = self

    def _close_channel(self, link: ChannelLink, code: int, text: str, mid: int) -> None:
        """Close one channel at the proxy: Channel.Close to the client (which must confirm),
        and the upstream channel closed behind it."""
        number = link.client_number
        link.upstream.detach(link)
        stub = ChannelLink(self, number, link.upstream, 0)
        stub.state = BROKER_CLOSED
        self.channels[number] = stub
        close = commands.Channel.Close(code, text, mid >> 16, mid & 0xFFFF)
        self.send(m.encode_method(number, close))

    def _channel_not_open(
        self, frame_type: int, channel: int, payload: memoryview, link: ChannelLink | None
    ) -> None:
        """A frame on a channel that is not (or no longer) open."""
        if self.state == CLOSING:
            return  # after our Connection.Close only CloseOk matters
        if self.state != ACTIVE:
            raise FrameError(
                m.CHANNEL_ERROR, f"CHANNEL_ERROR - channel {channel} used before connection.open"
            )
        mid = method_id(payload) if frame_type == METHOD else 0
        if link is None:
            if mid == m.CHANNEL_OPEN:
                self._open_channel(channel)
                return
            raise FrameError(m.CHANNEL_ERROR, f"CHANNEL_ERROR - channel {channel} is not open")
        if link.state == BROKER_CLOSED:
            # Drop everything until the client confirms the broker's Channel.Close.
            if mid == m.CHANNEL_CLOSE:
                self.send(frame(METHOD, channel, CHANNEL_CLOSE_OK_PAYLOAD))
                del self.channels[channel]
            elif mid == m.CHANNEL_CLOSE_OK:
                del self.channels[channel]
        # CLIENT_CLOSING: the client awaits CloseOk; what it sends meanwhile is dropped.

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
        if self.state != ACTIVE:
            link.upstream.detach(link)
            return
        self._attach(link)

    def _attach(self, link: ChannelLink) -> None:
        """The client's side of a new channel: answered at once, whatever happens upstream."""
        number = link.client_number
        upstream = link.upstream
        self.channels[number] = link
        self.send(frame(METHOD, number, CHANNEL_OPEN_OK_PAYLOAD))
        if upstream.blocked is not None:
            self.upstream_blocked(upstream)
        if upstream.write_paused:
            self.hold_reading(upstream)

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
        method = m.decode_method(payload)
        index = method.index
        if self.state == CLOSING:
            if index in (m.CONNECTION_CLOSE_OK, m.CONNECTION_CLOSE):
                if index == m.CONNECTION_CLOSE:
                    self.send(CONNECTION_CLOSE_OK)
                self.state = CLOSED
                self.close_transport()
            return
        if index == m.CONNECTION_CLOSE:
            assert isinstance(method, commands.Connection.Close)
            self._ending("client_close", "client closed the connection")
            if method.reply_code != m.REPLY_SUCCESS:
                self._close_reason += f" ({method.reply_code} {method.reply_text})"
            self._release_channels()
            self.send(CONNECTION_CLOSE_OK)
            self.state = CLOSED
            self.close_transport()
        elif self.state == AWAIT_START_OK and isinstance(method, commands.Connection.StartOk):
            self._start_ok(method)
        elif self.state == AWAIT_TUNE_OK and isinstance(method, commands.Connection.TuneOk):
            self._tune_ok(method)
        elif self.state == AWAIT_OPEN and isinstance(method, commands.Connection.Open):
            self.vhost = method.virtual_host
            self.state = OPENING
            self.run_paused(self._authenticate())
        elif self.state == ACTIVE and index == m.CONNECTION_UPDATE_SECRET:
            raise FrameError(
                m.NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED - connection.update-secret is not supported through the proxy",
            )
        else:
            raise FrameError(m.COMMAND_INVALID, f"COMMAND_INVALID - unexpected {method.name}")

    def _start_ok(self, method: commands.Connection.StartOk) -> None:
        props = method.client_properties or {}
        capabilities = props.get("capabilities")
        self.capabilities = capabilities if isinstance(capabilities, dict) else {}
        try:
            self.user, self._password = m.parse_sasl_response(method.mechanism, method.response)
        except ValueError as exc:
            log.warning("client %s: authentication failed: %s", self.peer, exc)
            self.close_with(m.ACCESS_REFUSED, f"ACCESS_REFUSED - {exc}", 10, 11, kind="auth_failed")
            return
        self.send(self.worker.connection_tune)
        self.state = AWAIT_TUNE_OK

    def _tune_ok(self, method: commands.Connection.TuneOk) -> None:
        frame_max = method.frame_max or DEFAULT_FRAME_MAX
        if not MIN_FRAME_MAX <= frame_max <= DEFAULT_FRAME_MAX:
            raise FrameError(
                m.SYNTAX_ERROR,
                f"SYNTAX_ERROR - frame_max {frame_max} outside "
                f"{MIN_FRAME_MAX}..{DEFAULT_FRAME_MAX}",
            )
        self.frame_max = frame_max
        self.channel_max = min(method.channel_max or CHANNEL_MAX, CHANNEL_MAX)
        self.heartbeat = method.heartbeat
        self.state = AWAIT_OPEN

    async def _authenticate(self) -> None:
        limit = self.worker.config.max_client_connections
        if limit and len(self.worker.sessions) > limit:
            log.warning("client %s refused: max_client_connections (%d) reached", self.peer, limit)
            self.close_with(
                m.NOT_ALLOWED,
                f"NOT_ALLOWED - connection limit ({limit} per worker) of amqproxy-mp is reached",
                10, 40, kind="connection_limit",
            )  # fmt: skip
            return
        pool = self.worker.pools.get((self.user, self._password, self.vhost))
        try:
            await pool.authenticate()
        except UpstreamError as exc:
            self.worker.pools.forget_if_unused(pool)
            if exc.code in (m.ACCESS_REFUSED, m.NOT_ALLOWED):
                log.warning(
                    "client %s: authentication failed for user=%r vhost=%r: %s %s",
                    self.peer,
                    self.user,
                    self.vhost,
                    exc.code,
                    exc.text,
                )
            refused = exc.code in (m.ACCESS_REFUSED, m.NOT_ALLOWED)
            if refused:
                self.stats.auth_failures[str(exc.code)] += 1
            self.close_with(
                exc.code, exc.text, 10, 40, kind="auth_failed" if refused else "upstream_closed"
            )
            return
        if self.state != OPENING:
            self.worker.pools.forget_if_unused(pool)
            return
        self.pool = pool
        pool.clients += 1
        self.state = ACTIVE
        self.send(CONNECTION_OPEN_OK)
        # one INFO line per client, when it leaves (PHP-FPM opens thousands a second)
        log.debug("client %s connected as user=%r vhost=%r", self.peer, self.user, self.vhost)

    # --- frames from the broker -----------------------------------------------------------

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None:
        """Send a frame that arrived upstream to this client, split to its frame_max."""
        if frame_type == BODY and len(payload) + OVERHEAD > self.frame_max:
            for part in body_frames(channel, payload, self.frame_max):
                self.send(part)
        else:
            self.send(frame(frame_type, channel, payload))

    def channel_lost(self, link: ChannelLink) -> None:
        """Its upstream channel died for an earlier client and could not be replaced."""
        close = commands.Channel.Close(
            m.RESOURCE_ERROR, "RESOURCE_ERROR - upstream channel lost and none free to replace it"
        )
        self.send(m.encode_method(link.client_number, close))

    def channel_closed(self, link: ChannelLink) -> None:
        """The broker confirmed the client's Channel.Close."""
        self.channels.pop(link.client_number, None)
        self.send(frame(METHOD, link.client_number, CHANNEL_CLOSE_OK_PAYLOAD))

    def upstream_blocked(self, upstream: UpstreamConnection) -> None:
        first = not self._blocked_by
        self._blocked_by.add(id(upstream))
        if first and self.capabilities.get("connection.blocked"):
            reason = upstream.blocked or ""
            self.send(m.encode_method(0, commands.Connection.Blocked(reason)))

    def upstream_unblocked(self, upstream: UpstreamConnection) -> None:
        if id(upstream) not in self._blocked_by:
            return
        self._blocked_by.discard(id(upstream))
        if not self._blocked_by and self.capabilities.get("connection.blocked"):
            self.send(m.encode_method(0, commands.Connection.Unblocked()))

    def _release_channels(self) -> None:
        for upstream, queues in self.exclusive_queues.items():
            upstream.delete_queues(queues, self.channels.values())
            for queue in queues:
                if upstream.exclusive_owners.get(queue) is self:
                    del upstream.exclusive_owners[queue]
        self.exclusive_queues.clear()
        for link in self.channels.values():
            if link.safe and link.state == OPEN and link.content_expected == NO_CONTENT:
                link.upstream.park(link)
            else:
                link.content_parts.clear()
                link.upstream.detach(link)
            self.release_reading(link.upstream)
        self.channels.clear()

    def __repr__(self) -> str:
        return f"<ClientSession {self.peer} user={self.user!r} vhost={self.vhost!r}>"
