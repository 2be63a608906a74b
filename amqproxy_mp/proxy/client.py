"""A client connection's channels: each mapped onto a shared upstream channel.

What the client sends on a channel is checked so that nothing it does can make the broker
close a connection that other clients share; where the broker would, the client alone gets
the broker's answer. The connection class and the handshake are the base class's
(client_connection.py); a channel's state is its link's (channels.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import (
    BODY,
    CONTENT_HEADER,
    HEADER,
    HEARTBEAT,
    METHOD,
    OVERHEAD,
    FrameError,
    amqp_error_text,
    body_frames,
    frame,
    frame_snippet,
    method_id,
)
from amqproxy_mp.amqp.validate import check_content_header
from amqproxy_mp.metrics import Disconnect
from amqproxy_mp.proxy import exclusive, prefetch
from amqproxy_mp.proxy.channels import ChannelLink
from amqproxy_mp.proxy.client_connection import ENDING, ClientConnection, Phase, refuse_method
from amqproxy_mp.proxy.confirms import Unconfirmed
from amqproxy_mp.proxy.context import ProxyContext
from amqproxy_mp.proxy.login import UpstreamError
from amqproxy_mp.proxy.publishing import NO_CONTENT, Step, order_error
from amqproxy_mp.proxy.requests import Request
from amqproxy_mp.proxy.upstream import UpstreamConnection

log = logging.getLogger(__name__)

#: Basic.Cancel's flags octet (its last): bit 0 is nowait.
CANCEL_NOWAIT_BIT: Final = 0x01


class ClientSession(ClientConnection):
    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        #: The upstream connection this client's channels go to, so that they share its
        #: exclusive queues (set by its first channel).
        self.home: UpstreamConnection | None = None
        #: Channels with auto-ack deliveries to ack once the client's socket has them.
        self._acks_due: set[ChannelLink[UpstreamConnection]] = set()
        #: The broker's answer about an unreadable message's exchange (see _unreadable).
        self._verdict: asyncio.Future[None] | None = None

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
                spec.FRAME_ERROR,
                amqp_error_text(
                    f"FRAME_ERROR - {frame_snippet(frame_type, payload)}: unknown_frame"
                ),
            )
        if self.phase in ENDING:
            return
        # a heartbeat on a channel, content on channel 0, a channel before Connection.OpenOk
        raise FrameError(
            spec.UNEXPECTED_FRAME,
            amqp_error_text(f"UNEXPECTED_FRAME - {frame_snippet(frame_type, payload)}"),
        )

    def _forward(
        self, link: ChannelLink[UpstreamConnection], frame_type: int, payload: memoryview
    ) -> None:
        """Route one frame of an open channel upstream; publishes go out only when complete."""
        incoming = link.incoming
        if frame_type == METHOD:
            incoming.check_method()
            mid = method_id(payload)
            if mid == spec.BASIC_PUBLISH:
                incoming.start(payload, link.upstream_number)
                return
            if mid in spec.DELIVERY_ACKS:
                link.not_reusable(pinned=False)  # (what it acks came after a pinning method)
                if len(payload) != spec.DELIVERY_ACK_SIZE:
                    m.method_arguments(mid, payload)  # raises the broker's FRAME_ERROR
                if link.auto_acks is None or link.auto_acks.client_acked(payload):
                    link.send(frame(METHOD, link.upstream_number, payload))
                return
            if mid in spec.CLIENT_CHANNEL_METHODS:
                self._channel_method(link, mid, payload)
            elif mid >> 16 == 20:
                self._channel_class_method(link, mid, payload)
            else:
                refuse_method(mid)
            return
        if frame_type == HEADER:
            max_size = self.settings.max_message_size
            step = incoming.header(payload, link.upstream_number, max_size)
        else:
            step = incoming.body(payload, link.upstream_number, link.upstream.frame_max)
        if step is Step.COMPLETE:
            self.stats.published += 1
            link.publish()
        elif step is Step.UNREADABLE:
            self._unreadable(link)
        elif step is Step.TOO_LARGE:
            link.error_found(
                spec.PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - message size {incoming.size} is larger than configured "
                f"max size {self.settings.max_message_size}",
                spec.BASIC_PUBLISH,
            )

    def _unreadable(self, link: ChannelLink[UpstreamConnection]) -> None:
        """A complete message whose properties RabbitMQ could not read. It would look up the
        exchange first (404 on the channel when it is missing), then fail to read them (541
        on the connection). So the proxy asks the broker about the exchange, in order on the
        channel, and reads nothing more from the client until it has answered."""
        publish = link.incoming.last_publish
        exchange = publish[7 : 7 + publish[6]]  # (its name as sent: RabbitMQ looks it up so)
        if not exchange:  # the default exchange is always there
            self.close_with(spec.INTERNAL_ERROR, "INTERNAL_ERROR", kind=Disconnect.PROTOCOL_ERROR)
            return
        passive = m.passive_exchange_declare(link.upstream_number, exchange)
        self._verdict = self.loop.create_future()
        link.send_request(passive, spec.EXCHANGE_DECLARE, Request.UNREADABLE)
        self.run_paused(self._await_verdict(self._verdict))

    @staticmethod
    async def _await_verdict(verdict: asyncio.Future[None]) -> None:
        await verdict

    def unreadable_answered(
        self, link: ChannelLink[UpstreamConnection], exchange_found: bool
    ) -> None:
        """The broker answered about the exchange of a message it could not have read."""
        if self._verdict is not None and not self._verdict.done():
            self._verdict.set_result(None)
        if exchange_found and self.phase is Phase.ACTIVE:
            self.close_with(spec.INTERNAL_ERROR, "INTERNAL_ERROR", kind=Disconnect.PROTOCOL_ERROR)

    # --- channel methods ------------------------------------------------------------------

    def _channel_class_method(
        self, link: ChannelLink[UpstreamConnection], mid: int, payload: memoryview
    ) -> None:
        if mid not in (spec.CHANNEL_CLOSE, spec.CHANNEL_FLOW, spec.CHANNEL_OPEN):
            refuse_method(mid)
        arguments = m.method_arguments(mid, payload)
        if mid == spec.CHANNEL_CLOSE:
            self._written()  # what it has read is acked, not requeued by the close
            settings = self.settings
            wait = settings.wait_for_broker or not link.safe
            if link.client_close(payload, wait, False, settings.wait_for_confirms):
                self._channel_closed(link)
        elif mid == spec.CHANNEL_OPEN:
            raise FrameError(
                spec.CHANNEL_ERROR, "CHANNEL_ERROR - second 'channel.open' seen", 20, 10
            )
        elif mid == spec.CHANNEL_FLOW:
            if not arguments[0]:
                # RabbitMQ does not implement stopping a channel's flow (540)
                raise FrameError(spec.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - active=false", 20, 20)
            link.not_reusable(pinned=False)
            link.send_request(frame(METHOD, link.upstream_number, payload), mid)

    def _channel_closed(self, link: ChannelLink[UpstreamConnection]) -> None:
        """The client's Channel.Close is answered at once."""
        del self.channels[link.client_number]
        self.send(frame(METHOD, link.client_number, spec.CHANNEL_CLOSE_OK_PAYLOAD))

    def close_synced(self, link: ChannelLink[UpstreamConnection]) -> None:
        """A close of this client's that waited for the broker is answered (see ChannelLink)."""
        if self.phase is Phase.CLIENT_CLOSING:
            self._closes_pending -= 1
            if self._closes_pending <= 0:
                self._connection_closed()
        elif not link.awaits_close_ok:
            self.channels.pop(link.client_number, None)

    def _channel_method(
        self, link: ChannelLink[UpstreamConnection], mid: int, payload: memoryview
    ) -> None:
        """Look at a method before it goes upstream (the few whose meaning the proxy must
        know) and send it, unless the proxy answers it itself."""
        arguments = m.method_arguments(mid, payload)
        kind = Request.FORWARD
        if mid in exclusive.QUEUE_METHODS:
            locked = link.upstream.exclusive.locks_out(self, mid, arguments)
            if locked is not None:
                if mid == spec.QUEUE_BIND or mid == spec.QUEUE_UNBIND:
                    self.run_paused(self._bind_locked(link, mid, bytes(payload), arguments))
                else:
                    text = exclusive.locked_text(locked, self.vhost)
                    link.error_found(spec.RESOURCE_LOCKED, text, mid)
                return
            # what RabbitMQ would close the whole (shared) connection for, refused here
            self.ctx.queue_types.check(self.vhost, mid, arguments)
        if mid == spec.BASIC_QOS:
            if prefetch.answer_qos(link, *arguments):
                self.send(frame(METHOD, link.client_number, spec.BASIC_QOS_OK_PAYLOAD))
            return
        elif mid == spec.BASIC_RECOVER or mid == spec.BASIC_RECOVER_ASYNC:
            if not arguments[0]:
                raise FrameError(
                    spec.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - requeue=false", 60, mid & 0xFFFF
                )
            if link.auto_acks is not None:
                link.auto_acks.recover()
                if mid == spec.BASIC_RECOVER_ASYNC:  # the proxy must see where the requeue ends
                    payload = memoryview(spec.RECOVER_PAYLOAD)
                    mid, kind = spec.BASIC_RECOVER, Request.DROP
        elif mid == spec.CONFIRM_SELECT and not link.transactional:
            # the proxy numbers the client's publishes itself: the channel stays reusable
            link.select_confirms(nowait=bool(arguments[0]))
            self._send_method(link, mid, payload, arguments)
            return
        elif mid == spec.TX_SELECT:
            if link.confirms is not None and link.client_confirms is None:
                self._select_tx_elsewhere(link, payload)
                return
            link.select_tx()
        elif mid == spec.BASIC_CONSUME:
            queue = str(arguments[1])
            stream = self.ctx.queue_types.get(self.vhost, queue) == "stream"
            prefetch.consume(
                link,
                payload,
                arguments,
                self.settings.consumer_window,
                stream,
                lambda kind: self._send_method(link, mid, payload, arguments, kind),
            )
            return
        elif mid == spec.BASIC_CANCEL:
            cancel = link.cancel_kind(str(arguments[0]), arguments[1])
            if cancel is not None:  # the proxy must see where its deliveries end
                payload[-1] &= ~CANCEL_NOWAIT_BIT
                arguments[1] = False
                kind = cancel
        elif mid == spec.QUEUE_DECLARE:
            if not arguments[2]:
                types = self.ctx.queue_types
                types.declared(self.vhost, str(arguments[1]), payload, arguments[7])
            kind = exclusive.declare_request(link.upstream.exclusive, self, payload, arguments)
            if kind is not Request.FORWARD:  # (the name, locked if the client leaves first)
                link.not_reusable(pinned=False)
                self._send_method(link, mid, payload, arguments, kind, str(arguments[1]))
                return
        elif mid == spec.QUEUE_DELETE:
            queue = str(arguments[1])
            if not (arguments[2] or arguments[3]):
                self.ctx.queue_types.deleted(self.vhost, queue)
            deleting = exclusive.delete_request(link.upstream.exclusive, self, payload, arguments)
            if deleting is not None:
                self._send_method(link, mid, payload, arguments, deleting, queue)
                return
        elif (
            mid == spec.EXCHANGE_DECLARE
            and not arguments[3]  # passive
            and str(arguments[2]) not in self.ctx.exchange_types.known
        ):
            self.run_paused(self._new_exchange_type(link, str(arguments[2]), bytes(payload)))
            return
        if not (mid == spec.BASIC_GET and arguments[2]):
            link.not_reusable(pinned=mid in spec.PINNING_METHODS)
        self._send_method(link, mid, payload, arguments, kind)

    def _send_method(
        self,
        link: ChannelLink[UpstreamConnection],
        mid: int,
        payload: bytes | memoryview,
        arguments: list[Any],
        kind: Request = Request.FORWARD,
        subject: str = "",
    ) -> None:
        data = frame(METHOD, link.upstream_number, payload)
        nowait = spec.NOWAIT_ARGUMENT.get(mid)
        if mid in spec.SYNCHRONOUS and (nowait is None or not arguments[nowait]):
            link.send_request(data, mid, kind, subject)
        else:
            link.send_nowait(data)

    def _select_tx_elsewhere(
        self, link: ChannelLink[UpstreamConnection], payload: memoryview
    ) -> None:
        """Tx.Select on an upstream channel in the proxy's confirm mode, which RabbitMQ
        refuses (406). Once the broker has answered everything before it, the client's
        channel moves to a new upstream channel on the same connection (its only state, a
        prefetch, is set there again); the old one parks once its publishes are confirmed.
        A channel with more state (consumers, deliveries...) cannot move: 406, documented."""
        if link.pinned:
            link.error_found(
                spec.PRECONDITION_FAILED,
                "PRECONDITION_FAILED - cannot switch from confirm to tx mode (amqproxy-mp "
                "confirms this channel's publishes upstream: select tx before publishing on a "
                "channel that also consumes or gets)",
                spec.TX_SELECT,
            )
            return
        self.run_paused(self._move_for_tx(link, bytes(payload)))

    async def _move_for_tx(self, link: ChannelLink[UpstreamConnection], payload: bytes) -> None:
        if not await link.when_synced() or link.client is not self or not link.client_open:
            return  # the channel closed meanwhile: the broker would drop this
        number = link.client_number
        moved = link.upstream.allocate(self, number)
        if moved is None:
            link.error_found(
                spec.PRECONDITION_FAILED,
                "PRECONDITION_FAILED - cannot switch from confirm to tx mode (no upstream "
                "channel free to move to)",
                spec.TX_SELECT,
            )
            return
        moved.took_over(link, [])
        self.channels[number] = moved
        link.client_left()
        moved.select_tx()
        moved.not_reusable()
        self._send_method(moved, spec.TX_SELECT, payload, [])

    async def _bind_locked(
        self, link: ChannelLink[UpstreamConnection], mid: int, payload: bytes, arguments: list[Any]
    ) -> None:
        """Queue.Bind or Unbind of an exclusive queue another client of this upstream
        connection owns. RabbitMQ checks the exchange (404), the binding's arguments (406)
        and, for an unbind, whether the binding exists (UnbindOk if not) before exclusivity:
        the method is put, once the channel has caught up, to a disposable connection, which
        gets exactly what the client's own connection would."""
        assert self.pool is not None
        nowait = mid == spec.QUEUE_BIND and arguments[4]
        trial = bytearray(payload)
        if nowait:  # the trial needs the answer (the octet before the arguments table)
            trial[arguments[-1][0] - 5] &= ~1
        if not await link.when_synced() or link.client is not self or not link.client_open:
            return  # the channel closed meanwhile: the broker would drop this
        try:
            method = frame(METHOD, 1, bytes(trial))
            refusal: tuple[int, str, bool] | None = await self.pool.trial(
                method, purpose="exclusive check"
            )
        except UpstreamError as exc:
            # no second connection to be had (a connection limit, a broker gone): the
            # queue is still locked, as the proxy answered before it asked the broker
            log.warning("client %s: exclusive check not possible: %s", self.peer, exc.text)
            refusal = (spec.RESOURCE_LOCKED, exclusive.locked_text(arguments[1], self.vhost), False)
        if link.client is not self or not link.client_open:
            return
        if refusal is None:
            if not nowait:
                ok = (
                    m.commands.Queue.BindOk()
                    if mid == spec.QUEUE_BIND
                    else m.commands.Queue.UnbindOk()
                )
                self.send(m.encode_method(link.client_number, ok))
        elif refusal[2]:
            self.close_with(refusal[0], refusal[1], mid >> 16, mid & 0xFFFF)
        else:
            link.error_found(refusal[0], refusal[1], mid)

    async def _new_exchange_type(
        self, link: ChannelLink[UpstreamConnection], exchange_type: str, payload: bytes
    ) -> None:
        """An Exchange.Declare of a type the proxy has not seen the broker accept: tried on
        a disposable connection first (see ExchangeTypes), then sent, or refused as the
        broker would refuse it (on the whole connection)."""
        assert self.pool is not None
        try:
            refusal = await self.ctx.exchange_types.trial(self.pool, exchange_type, payload)
        except UpstreamError as exc:
            self.close_with(exc.code, exc.text, 40, 10)
            return
        if refusal is not None:
            code, text = refusal
            log.warning(
                "client %s (user=%r vhost=%r) declared an exchange of type %r, which the broker "
                "refuses: %s %s",
                self.peer, self.user, self.vhost, exchange_type, code, text,
            )  # fmt: skip
            self.close_with(code, text, 40, 10, kind=Disconnect.PROTOCOL_ERROR)
            return
        if link.client is self and link.client_open:
            arguments = m.method_arguments(spec.EXCHANGE_DECLARE, payload)
            self._send_method(link, spec.EXCHANGE_DECLARE, payload, arguments)

    # --- deliveries the proxy acks for the client ------------------------------------------

    def acks_due(self, link: ChannelLink[UpstreamConnection]) -> None:
        self._acks_due.add(link)

    def _written(self) -> None:
        """Ack upstream what the client's socket has taken of its auto-ack deliveries."""
        transport = self.transport
        if self._acks_due and transport is not None and not transport.get_write_buffer_size():
            for link in self._acks_due:
                if link.auto_acks is not None:
                    link.auto_acks.flush()
            self._acks_due.clear()

    def resume_writing(self) -> None:
        self._written()

    # --- channels opened and closed -------------------------------------------------------

    def channel_error_due(self, link: ChannelLink[UpstreamConnection]) -> None:
        """Send the Channel.Close for an error the proxy found (see ChannelLink.error_found):
        the upstream channel is given back, and the client's stays closed until it confirms."""
        assert link.error_due is not None
        code, text, mid = link.error_due
        number = link.client_number
        link.client_left()
        self.channels[number] = ChannelLink.closed_for_client(self, number, link.upstream)
        self.send(m.close_frame(number, code, text, mid >> 16, mid & 0xFFFF))

    def _channel_not_open(
        self,
        frame_type: int,
        channel: int,
        payload: memoryview,
        link: ChannelLink[UpstreamConnection] | None,
    ) -> None:
        """A frame on a channel that is not (or no longer) open."""
        mid = method_id(payload) if frame_type == METHOD else 0
        if link is None:
            if frame_type != METHOD:
                raise order_error(NO_CONTENT)
            if mid not in m.commands.INDEX_MAPPING:
                refuse_method(mid)
            m.method_arguments(mid, payload)
            if mid == spec.CHANNEL_OPEN:
                self._open_channel(channel)
                return
            raise FrameError(
                spec.CHANNEL_ERROR,
                "CHANNEL_ERROR - expected 'channel.open'",
                mid >> 16,
                mid & 0xFFFF,
            )
        if link.error_due:
            return  # the client does not know it yet: as after an error, the broker drops it
        if link.awaits_close_ok:
            # The channel is closed on the client's side too: as the broker's closing channel,
            # answer a Close and wait for the CloseOk; drop everything else.
            if mid == spec.CHANNEL_CLOSE:
                self.send(frame(METHOD, channel, spec.CHANNEL_CLOSE_OK_PAYLOAD))
            elif mid == spec.CHANNEL_CLOSE_OK and link.client_close_ok():
                del self.channels[channel]
        # owes_close_ok: the client awaits our CloseOk; what it sends meanwhile is dropped

    def _open_channel(self, number: int) -> None:
        if number > self.channel_max:
            raise FrameError(
                spec.CHANNEL_ERROR,
                f"CHANNEL_ERROR - channel {number} exceeds channel_max {self.channel_max}",
            )
        assert self.pool is not None
        link = self.pool.take_channel(self, number, self.live_home)
        if link is not None:
            self._attach(link)
        else:
            self.run_paused(self._open_channel_later(number))

    async def _open_channel_later(self, number: int) -> None:
        assert self.pool is not None
        try:
            link = await self.pool.acquire_channel(self, number, self.live_home)
        except UpstreamError as exc:
            self.close_with(exc.code, exc.text, 20, 10)
            return
        if self.phase is not Phase.ACTIVE:
            link.client_left()
            return
        self._attach(link)

    @property
    def live_home(self) -> UpstreamConnection | None:
        """The connection the client's channels go to, while it takes channels (one that
        closed, as idle or to rebalance, while the client had no channel there, is not)."""
        home = self.home
        return home if home is not None and home.is_open else None

    def _attach(self, link: ChannelLink[UpstreamConnection]) -> None:
        """The client's side of a new channel: answered at once, whatever happens upstream."""
        number = link.client_number
        upstream = link.upstream
        if self.live_home is None:
            self.home = upstream
        self.channels[number] = link
        self.send(frame(METHOD, number, spec.CHANNEL_OPEN_OK_PAYLOAD))
        if upstream.blocked is not None:
            self.upstream_blocked(upstream)
        if upstream.write_paused:
            upstream.hold(self)

    # --- moving to another upstream connection ---------------------------------------------

    def movable(self, upstream: UpstreamConnection) -> bool:
        """The client could go on through another upstream connection without noticing
        (only published, declared and the like there: see ChannelLink.movable)."""
        return (
            (self.phase is Phase.ACTIVE or self.phase is Phase.CLIENT_CLOSING)
            and not self._parsing_paused
            and self.pool is not None
            and all(
                link.upstream is upstream and link.movable
                for link in self.channels.values()
                if link.client is self  # (not a channel it left, closing, for the next client)
            )
        )

    def move_from(
        self,
        upstream: UpstreamConnection,
        moving: list[tuple[Any, list[Any]]],
        close: tuple[int, str, int, int],
    ) -> None:
        """The upstream connection ended: the client's channels go on through another one
        (a new one if none takes channels, on a node that is up), where what the broker had
        not confirmed is published again first. Nothing is read from the client meanwhile.
        `moving`: each of its links, with what the broker had not confirmed on it; `close`:
        what the client is told if no connection is to be had (the broker's Close)."""
        self.run_paused(self._move(upstream, moving, close))

    async def _move(
        self,
        upstream: UpstreamConnection,
        moving: list[tuple[ChannelLink[UpstreamConnection], list[Unconfirmed]]],
        close: tuple[int, str, int, int],
    ) -> None:
        assert self.pool is not None
        pool = self.pool
        count = sum(len(messages) for _, messages in moving)
        try:
            conn = await pool.usable_connection(len(moving))
        except UpstreamError as exc:
            log.info("client %s could not move from %s: %s", self.peer, upstream.name, exc.text)
            self.close_with(*close)
            return
        finally:
            # (the client went meanwhile, or cannot move: its messages are sent again)
            if self.phase is not Phase.ACTIVE and self.phase is not Phase.CLIENT_CLOSING:
                unsent = [messages for _, messages in moving if messages]
                moving = []
                if unsent:
                    pool.resend(unsent, f"{upstream.name} (client {self.peer})")
        if not moving:
            return
        self.home = conn
        for old, messages in moving:
            new = conn.allocate(self, old.client_number)
            assert new is not None  # (usable_connection found room for them all)
            new.took_over(old, messages)
            self.channels[old.client_number] = new
        self.stats.clients_moved += 1
        log.info(
            "client %s (user=%r vhost=%r) moved from %s to %s with %d channels, %d messages "
            "sent again",
            self.peer, self.user, self.vhost, upstream.name, conn.name, len(moving), count,
        )  # fmt: skip
        if conn.blocked is not None:
            self.upstream_blocked(conn)
        if conn.write_paused:
            conn.hold(self)

    # --- frames from the broker -----------------------------------------------------------

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None:
        """Send a frame that arrived upstream to this client, split to its frame_max."""
        if self.phase is Phase.CLIENT_CLOSING and (
            frame_type != METHOD or method_id(payload) != spec.CHANNEL_CLOSE
        ):
            return  # it discards all but a channel's close now (AMQP 0-9-1, 1.4.2.5)
        if frame_type == BODY and len(payload) + OVERHEAD > self.frame_max:
            for part in body_frames(channel, payload, self.frame_max):
                self.send(part)
        else:
            self.send(frame(frame_type, channel, payload))

    # --- flow control from the broker ------------------------------------------------------

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

    # --- the client leaves ---------------------------------------------------------------

    def _close_channels(self) -> int:
        pending = 0
        if self.settings.wait_for_broker:
            for link in list(self.channels.values()):
                if link.owes_close_ok:
                    pending += 1  # its Channel.Close is under way: that answer comes first
                elif (link.client_open or link.error_due) and not link.client_close(
                    None, True, True, self.settings.wait_for_confirms
                ):
                    pending += 1
        return pending

    def _release_channels(self) -> list[asyncio.Future[bool]]:
        deletes = []
        if self.pool is not None:
            links = self.channels.values()
            for upstream in self.pool.connections:
                deletes += upstream.exclusive.client_gone(self, links)
        for link in self.channels.values():
            if link.client is self:
                link.client_left()
        self.channels.clear()
        return deletes
