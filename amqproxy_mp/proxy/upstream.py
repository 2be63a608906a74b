"""One AMQP connection from the proxy to the broker, shared by many client channels.

The proxy is the client on this hop: it runs the handshake with the client's
credentials, answers the broker's heartbeats itself, and demultiplexes frames
to the client channels by upstream channel number.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import ssl
import time
from typing import Final

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import HEARTBEAT, METHOD, FrameError, frame, method_id
from amqproxy_mp.amqp.methods import commands
from amqproxy_mp.amqp.transport import DEFAULT_FRAME_MAX, FramedProtocol
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.channel_numbers import ChannelNumbers
from amqproxy_mp.proxy.channels import ChannelLink
from amqproxy_mp.proxy.confirms import Unconfirmed, UnconfirmedBuffer
from amqproxy_mp.proxy.exclusive import ExclusiveQueues
from amqproxy_mp.proxy.login import Login, UpstreamError, UpstreamSettings
from amqproxy_mp.proxy.nodes import Node, Nodes
from amqproxy_mp.proxy.publishing import NO_CONTENT
from amqproxy_mp.proxy.sides import ClientSide, PoolSide

log = logging.getLogger(__name__)

#: Bytes queued towards the broker above which its publishing clients are paused.
UPSTREAM_WRITE_BUFFER: Final = 4 * 1024 * 1024


#: The texts of RabbitMQ's 320 when the node itself goes: a shutdown, a maintenance drain.
_NODE_GOING: Final = re.compile(r"shutdown|maintenance", re.I)


class State(enum.Enum):
    """Where an upstream connection is in its life."""

    HANDSHAKE = "handshake"
    #: Takes new clients' channels, and parks channels.
    OPEN = "open"
    #: Past max_upstream_lifetime: its clients keep their channels (and may open more), new
    #: clients go elsewhere, nothing parks here; closed once it has no channels.
    RETIRED = "retired"
    #: The proxy sent Connection.Close.
    CLOSING = "closing"
    CLOSED = "closed"


class UpstreamConnection(FramedProtocol):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: UpstreamSettings,
        node: Node,
        nodes: Nodes,
        stats: Stats,
        login: Login,
        pool: PoolSide | None,
    ) -> None:
        super().__init__(loop)
        self.settings = settings
        #: The broker node it goes to, and what to tell when that node fails.
        self.node = node
        self.nodes = nodes
        #: Counted in node.connections (from its OpenOk or Tune to its end).
        self._counted = False
        self.login = login
        #: The pool it belongs to, once a vhost is open on it (see open_vhost).
        self.pool: PoolSide | None = pool
        self.frame_max = DEFAULT_FRAME_MAX  # until Tune says otherwise
        self.state = State.HANDSHAKE
        #: The broker accepted the login (its Tune arrived).
        self.tuned: asyncio.Future[None] = loop.create_future()
        #: The vhost is open (OpenOk).
        self.ready: asyncio.Future[None] = loop.create_future()
        self._tune_ok = b""
        self.channels: dict[int, ChannelLink[UpstreamConnection]] = {}
        self.numbers = ChannelNumbers(0)
        #: Reason given by Connection.Blocked while the broker blocks publishers, else None.
        self.blocked: str | None = None
        #: The transport's buffer towards the broker is over its high-water mark.
        self.write_paused = False
        self.idle_since = self.opened_at = time.monotonic()
        self.local_port: int | None = None
        self.stats = stats
        #: How log lines name this connection.
        self.name = f"{node.name} (user={login.user!r})"
        if pool is not None:
            self.name = f"{node.name} (user={pool.user!r} vhost={pool.vhost!r})"
        #: What clients' error texts add so that they name the node, when there are several.
        self.where = f" (node {node.name})" if nodes.several else ""
        #: Exclusive queues declared through this connection, and the client that owns each.
        self.exclusive = ExclusiveQueues(self, self._spare_link)
        #: Clients told that this connection is blocked (told again when it is unblocked,
        #: whether or not they still have a channel here, as a direct connection would be).
        self.blocked_clients: set[ClientSide] = set()
        #: Clients not read while the broker does not read this connection.
        self.held_clients: set[ClientSide] = set()
        #: A disposable connection's one trial method (see `probe`).
        self._probe: asyncio.Future[tuple[int, str, bool] | None] | None = None
        self._handshake_step = spec.CONNECTION_START
        #: The broker said it refuses a login with Connection.Close, not by dropping the socket.
        self._refuses_with_close = False
        self._close_reason = ""

    # --- connection lifecycle -------------------------------------------------------------

    def count_received(self, size: int) -> None:
        self.stats.upstream_bytes_in += size

    def count_sent(self, size: int) -> None:
        self.stats.upstream_bytes_out += size

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Pause the clients only when the broker really stops reading, not between two large
        # messages (uvloop's default high-water mark is 64 KiB).
        transport.set_write_buffer_limits(high=UPSTREAM_WRITE_BUFFER)  # type: ignore[attr-defined]
        sockname = transport.get_extra_info("sockname")
        self.local_port = sockname[1] if sockname else None
        self.send(spec.PROTOCOL_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = State.CLOSED
        self.closed = True
        self._uncount()
        if was is State.HANDSHAKE:
            self._handshake_failed(self._handshake_failure(exc))
            return
        self._leave_pool()
        if was is State.OPEN or was is State.RETIRED:
            self.stats.upstream_errors["lost"] += 1
            reason = f"connection lost: {exc}" if exc else "connection closed by broker"
            log.warning(
                "upstream connection to %s %s",
                self.name,
                reason,
            )
            self.nodes.failed(self.node, reason)
            self._close_clients(
                spec.CONNECTION_FORCED,
                f"CONNECTION_FORCED - upstream connection lost{self.where}",
                0,
                0,
            )
        elif was is State.CLOSING:
            log.info(
                "upstream connection to %s closed: %s",
                self.name,
                self._close_reason or "closed",
            )

    def _handshake_failure(self, exc: Exception | None) -> Exception:
        if isinstance(exc, ssl.SSLError):
            return exc
        if self._handshake_step == spec.CONNECTION_TUNE and not self._refuses_with_close:
            # A broker without authentication_failure_close drops the socket on bad
            # credentials; one with it (RabbitMQ) has failed, not refused the login.
            return UpstreamError(spec.ACCESS_REFUSED, "ACCESS_REFUSED - login refused by upstream")
        detail = f": {exc}" if exc else ""
        return UpstreamError(
            spec.CONNECTION_FORCED,
            f"CONNECTION_FORCED - upstream {self.node.name} closed the connection "
            f"during the handshake{detail}",
        )

    def close(self, reason: str) -> None:
        """Close gracefully (idle timeout, shutdown); clients must already be gone."""
        if not self.is_open:
            return
        self.state = State.CLOSING
        self._close_reason = reason
        self._uncount()  # (a closing connection is not the node's any more: see rebalancing)
        self._leave_pool()
        self._channels_gone(reason)
        self._let_clients_go()
        self.send(m.encode_method(0, commands.Connection.Close(spec.REPLY_SUCCESS, reason, 0, 0)))
        self.loop.call_later(5.0, self.abort)

    def drop(self, reason: str) -> None:
        """Drop the socket now, on purpose (a quick stop): not the node's failure."""
        if self.is_open:
            self.state = State.CLOSING
            self._close_reason = reason
        self.abort()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.node.connections -= 1

    @property
    def is_open(self) -> bool:
        """Open for channels (a retired connection still takes its clients' further ones)."""
        return self.state is State.OPEN or self.state is State.RETIRED

    @property
    def retired(self) -> bool:
        return self.state is State.RETIRED

    def retire(self, max_lifetime: float) -> None:
        """Past max_lifetime: no new clients, closed once empty (see Pool.close_idle)."""
        self.state = State.RETIRED
        log.info(
            "upstream connection %s reached its max lifetime (%g s): retiring it",
            self.name,
            max_lifetime,
        )

    @property
    def is_usable(self) -> bool:
        """Open, and young enough to take new channels (and to vouch for credentials)."""
        return self.state is State.OPEN

    # --- flow control -------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The broker stopped reading (alarm, Connection.Blocked): stop reading from the
        clients that publish here, so their data waits in their sockets, not in memory."""
        self.write_paused = True
        log.info(
            "upstream %s is not reading; pausing its clients",
            self.name,
        )
        for client in self.clients():
            self.hold(client)

    def resume_writing(self) -> None:
        self.write_paused = False
        log.info(
            "upstream %s reads again; resuming its clients",
            self.name,
        )
        self._release_held()

    def _let_clients_go(self) -> None:
        """The connection ends: it no longer holds (stops reading) or blocks anyone, not
        even a client with no channel left here (which would wait for an Unblocked)."""
        self._release_held()
        blocked, self.blocked_clients = self.blocked_clients, set()
        for client in blocked:
            client.upstream_unblocked(self)

    def _release_held(self) -> None:
        for client in self.held_clients:
            client.release_reading(self)
        self.held_clients.clear()

    # --- frames from the broker -----------------------------------------------------------

    def frame_received(self, frame_type: int, channel: int, payload: memoryview) -> None:
        if self._probe is not None and channel == 1 and frame_type == METHOD:
            self._probe_answer(payload)
            return
        if channel:
            link = self.channels.get(channel)
            if link is None:
                return  # a frame for a channel already given back: nothing to do
            if frame_type == METHOD:
                link.broker_method(method_id(payload), payload)
            elif link.forwarding and link.client is not None:
                link.client.deliver(frame_type, link.client_number, payload)
                if link.delivery_left != NO_CONTENT:
                    link.content_forwarded(frame_type, payload)
            return
        if frame_type == METHOD:
            if self.state is State.HANDSHAKE:
                self._handshake(m.decode_broker_method(payload))
            else:
                self._connection_method(payload)
        elif frame_type != HEARTBEAT:
            raise FrameError(spec.UNEXPECTED_FRAME, "UNEXPECTED_FRAME - content on channel 0")

    def protocol_error(self, exc: FrameError) -> None:
        log.error("upstream %s sent an invalid frame: %s", self.node.name, exc.text)
        self._fail(
            spec.INTERNAL_ERROR, f"INTERNAL_ERROR - upstream sent an invalid frame: {exc.text}"
        )

    def _handshake(self, method: m.Method) -> None:
        index = method.index
        if index == spec.CONNECTION_CLOSE:
            assert isinstance(method, commands.Connection.Close)
            self.send(m.encode_method(0, commands.Connection.CloseOk()))
            self.close_transport()
            self._handshake_failed(UpstreamError(method.reply_code or 0, method.reply_text))
            return
        if index != self._handshake_step:
            raise FrameError(spec.COMMAND_INVALID, f"COMMAND_INVALID - unexpected {method.name}")
        if isinstance(method, commands.Connection.Start):
            capabilities = (method.server_properties or {}).get("capabilities")
            self._refuses_with_close = isinstance(capabilities, dict) and bool(
                capabilities.get("authentication_failure_close")
            )
            self.send(self.login.start_ok())
            self._handshake_step = spec.CONNECTION_TUNE
        elif isinstance(method, commands.Connection.Tune):
            # max_upstream_channels is applied when placing new clients (see Pool): a
            # client's further channels stay on its connection, up to the broker's limit
            channel_max = method.channel_max or 65535
            self.numbers = ChannelNumbers(channel_max)
            self.frame_max = method.frame_max or DEFAULT_FRAME_MAX
            self.heartbeat = self.settings.heartbeat
            self._tune_ok = m.encode_method(
                0,
                commands.Connection.TuneOk(
                    channel_max=channel_max, frame_max=self.frame_max, heartbeat=self.heartbeat
                ),
            )
            self._handshake_step = spec.CONNECTION_OPEN_OK
            self.tuned.set_result(None)
            if self.pool is not None:
                self.open_vhost(self.pool)
        elif isinstance(method, commands.Connection.OpenOk):
            self.state = State.OPEN
            self.idle_since = time.monotonic()
            if not self.ready.done():
                self.ready.set_result(None)

    def joined_node(self) -> None:
        """The handshake went through: the connection counts on its node (spread policy)."""
        if not self._counted and not self.closed:
            self._counted = True
            self.node.connections += 1
            self.nodes.succeeded(self.node)

    def _leave_pool(self) -> None:
        if self.pool is not None:
            self.pool.connection_gone(self)

    def open_vhost(self, pool: PoolSide) -> None:
        """The login is accepted: finish the handshake with the pool's vhost."""
        self.pool = pool
        self.name = f"{self.node.name} (user={pool.user!r} vhost={pool.vhost!r})"
        if self.tuned.done() and not self.closed:
            self.send(self._tune_ok)
            self.send(m.encode_method(0, commands.Connection.Open(virtual_host=pool.vhost)))

    def _handshake_failed(self, exc: Exception) -> None:
        for future in (self.tuned, self.ready):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # (retrieved: only the first one is awaited)

    def _connection_method(self, payload: memoryview) -> None:
        mid = method_id(payload)
        if mid == spec.CONNECTION_CLOSE:
            close = m.decode_broker_method(payload)
            assert isinstance(close, commands.Connection.Close)
            self.send(m.encode_method(0, commands.Connection.CloseOk()))
            self.stats.upstream_errors["closed_by_broker"] += 1
            log.warning(
                "upstream %s closed by broker: %s %s",
                self.name,
                close.reply_code,
                close.reply_text,
            )
            self._close_reason = f"closed by broker: {close.reply_code} {close.reply_text}"
            if close.reply_code == spec.CONNECTION_FORCED and _NODE_GOING.search(
                close.reply_text
            ):  # (not a connection closed by an operator, or a user deleted)
                self.nodes.failed(self.node, self._close_reason)
            self.state = State.CLOSED
            self._leave_pool()
            self._close_clients(
                close.reply_code or 0,
                close.reply_text + self.where,
                close.class_id or 0,
                close.method_id or 0,
                move=close.reply_code == spec.CONNECTION_FORCED,
            )
            self.close_transport()
        elif mid == spec.CONNECTION_CLOSE_OK:
            self.close_transport()
        elif mid == spec.CONNECTION_BLOCKED:
            blocked = m.decode_broker_method(payload)
            assert isinstance(blocked, commands.Connection.Blocked)
            self.blocked = blocked.reason or "blocked"
            log.warning(
                "upstream %s blocked by broker: %s",
                self.name,
                self.blocked,
            )
            for client in self.clients():
                client.upstream_blocked(self)
        elif mid == spec.CONNECTION_UNBLOCKED:
            self.blocked = None
            log.info(
                "upstream %s unblocked",
                self.name,
            )
            for client in list(self.blocked_clients):
                client.upstream_unblocked(self)
            self.blocked_clients.clear()

    async def probe(self, method_frame: bytes) -> tuple[int, str, bool] | None:
        """On a disposable connection: open channel 1, send one method, and return None when
        the broker answers it, or (code, text, connection_level) when it refuses."""
        self._probe = self.loop.create_future()
        self.send(frame(METHOD, 1, spec.CHANNEL_OPEN_PAYLOAD))
        self.send(method_frame)
        return await self._probe

    def _probe_answer(self, payload: memoryview) -> None:
        assert self._probe is not None
        mid = method_id(payload)
        if mid == spec.CHANNEL_OPEN_OK or self._probe.done():
            return
        if mid == spec.CHANNEL_CLOSE:
            close = m.decode_broker_method(payload)
            assert isinstance(close, commands.Channel.Close)
            self.send(frame(METHOD, 1, spec.CHANNEL_CLOSE_OK_PAYLOAD))
            self._probe.set_result((close.reply_code or 0, close.reply_text, False))
        else:
            self._probe.set_result(None)

    def _end_probe(self, code: int, text: str) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.set_result((code, text, True))

    def missed_heartbeats(self) -> None:
        self.stats.upstream_errors["heartbeat"] += 1
        log.warning(
            "upstream %s missed heartbeats (heartbeat %s s)",
            self.name,
            self.heartbeat,
        )
        self.nodes.failed(self.node, "missed heartbeats")
        self._fail(
            spec.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream missed heartbeats{self.where}"
        )

    def _fail(self, code: int, text: str) -> None:
        """Give up on this connection: tell its clients, then drop it."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._leave_pool()
        self._close_clients(code, text, 0, 0)
        self.abort()

    def _close_clients(
        self, code: int, text: str, class_id: int, method_id: int, move: bool = True
    ) -> None:
        """The connection ended under its clients. Those that only published (and the like)
        here go on through another connection (`move`); the others, with a channel here or
        exclusive queues it takes with it, are closed with the broker's code and text (a
        client with neither loses nothing: it carries on elsewhere)."""
        self._end_probe(code, text)
        closing = {id(c): c for c in self.exclusive.owners()}
        moving: dict[int, list[tuple[ChannelLink[UpstreamConnection], list[Unconfirmed]]]] = {}
        movers = []
        for client in self.clients():
            if id(client) in closing:
                continue
            if move and client.movable(self):
                moving[id(client)] = []
                movers.append(client)
            else:
                closing[id(client)] = client
        for link in self.channels.values():
            if link.client is not None and id(link.client) in moving:
                moving[id(link.client)].append((link, link.take_unconfirmed()))
        self._channels_gone(text)
        self._let_clients_go()
        for client in movers:
            client.move_from(self, moving[id(client)], (code, text, class_id, method_id))
        for client in closing.values():
            client.close_with(code, text, class_id, method_id)

    def clients(self) -> list[ClientSide]:
        """The distinct client sessions with a channel on this connection."""
        seen: dict[int, ClientSide] = {}
        for link in self.channels.values():
            if link.client is not None:
                seen[id(link.client)] = link.client
        return list(seen.values())

    # --- channels -------------------------------------------------------------------------

    @property
    def can_park(self) -> bool:
        """Channels whose client left may wait here for the next client of the pool."""
        return self.state is State.OPEN

    def allocate(
        self, client: ClientSide | None, number: int
    ) -> ChannelLink[UpstreamConnection] | None:
        """A new upstream channel for a client channel (the client is answered already)."""
        upstream_number = self.numbers.allocate()
        if upstream_number is None:
            return None
        link = ChannelLink(client, number, self, upstream_number)
        if upstream_number in self.channels:
            log.error("BUG: upstream channel %d handed out twice on %r", upstream_number, self)
        self.channels[upstream_number] = link
        self.stats.upstream_channel_opens += 1
        link.open_upstream()
        return link

    def release_number(self, link: ChannelLink[UpstreamConnection]) -> None:
        if self.channels.get(link.upstream_number) is link:
            del self.channels[link.upstream_number]
            self.numbers.release(link.upstream_number)
            if not self.channels:
                self.idle_since = time.monotonic()

    def _spare_link(self) -> ChannelLink[UpstreamConnection] | None:
        """A channel of the proxy's own, given back once its requests are answered."""
        return self.allocate(None, 0) if self.is_open else None

    def _channels_gone(self, why: str) -> None:
        """The connection ends: its channels with it. What the broker had not confirmed on
        them goes to the pool, to be sent again through another connection (the clients
        still here are told after this: their next connection's publishes come after it)."""
        unconfirmed = []
        for link in self.channels.values():
            if messages := link.take_unconfirmed():
                unconfirmed.append(messages)
            link.upstream_gone()
        self.channels.clear()
        if unconfirmed and self.pool is not None:
            self.pool.resend(unconfirmed, f"{self.name}: {why}")

    @property
    def unconfirmed(self) -> UnconfirmedBuffer:
        assert self.pool is not None  # (channels exist only once the vhost is open)
        return self.pool.unconfirmed

    def hold(self, client: ClientSide) -> None:
        """Stop reading a client that publishes here while the broker does not read."""
        self.held_clients.add(client)
        client.hold_reading(self)

    def forget(self, client: object) -> None:
        """A client is gone: nothing here may keep a reference to it."""
        self.held_clients.discard(client)
        self.blocked_clients.discard(client)

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.name} port={self.local_port} channels={len(self.channels)}>"
        )
