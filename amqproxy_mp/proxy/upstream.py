"""One AMQP connection from the proxy to the broker, shared by many client channels.

The proxy is the client on this hop: it runs the handshake with the client's
credentials, answers the broker's heartbeats itself, and demultiplexes frames
to the client channels by upstream channel number.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import ssl
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pamqp import encode
from pamqp.common import FieldTable

from amqproxy_mp import __version__
from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp.frames import HEARTBEAT, METHOD, FrameError, frame, method_id
from amqproxy_mp.amqp.methods import commands
from amqproxy_mp.amqp.transport import DEFAULT_FRAME_MAX, FramedProtocol
from amqproxy_mp.proxy.channels import (
    CHANNEL_CLOSE_OK_PAYLOAD,
    CHANNEL_OPEN_PAYLOAD,
    NO_CONTENT,
    ChannelLink,
    ChannelNumbers,
    ClientSide,
    Request,
    Up,
)

if TYPE_CHECKING:
    from amqproxy_mp.metrics import Stats
    from amqproxy_mp.proxy.pool import Pool

log = logging.getLogger(__name__)

#: Bytes queued towards the broker above which its publishing clients are paused.
UPSTREAM_WRITE_BUFFER: Final = 4 * 1024 * 1024

CLIENT_PROPERTIES: Final[FieldTable] = {
    "product": "amqproxy-mp",
    "version": __version__,
    "platform": f"Python {platform.python_version()}",
    "connection_name": "amqproxy-mp",
    "capabilities": {
        "authentication_failure_close": True,
        "basic.nack": True,
        "connection.blocked": True,
        "consumer_cancel_notify": True,
        "exchange_exchange_bindings": True,
        "publisher_confirms": True,
    },
}

CLIENT_PROPERTIES_TABLE: Final = encode.field_table(CLIENT_PROPERTIES)

# Connection states.
HANDSHAKE, READY, CLOSING, CLOSED = range(4)


class UpstreamError(Exception):
    """The broker refused or lost a connection; code/text are what the client is told."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class UpstreamSettings:
    """How to reach the broker: the part of the config this module needs."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    heartbeat: int
    max_channels: int  # 0 = the broker's channel_max

    @property
    def address(self) -> str:
        scheme = "amqps" if self.ssl_context else "amqp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Login:
    """Who an upstream connection logs in as: the client's own credentials and mechanism."""

    user: str
    password: str
    mechanism: str = "PLAIN"

    def response(self) -> bytes:
        if self.mechanism == "AMQPLAIN":
            return b"".join(
                bytes([len(key)]) + key + b"S" + struct.pack(">I", len(value)) + value
                for key, value in (
                    (b"LOGIN", self.user.encode("utf-8", "surrogateescape")),
                    (b"PASSWORD", self.password.encode("utf-8", "surrogateescape")),
                )
            )
        return f"\0{self.user}\0{self.password}".encode("utf-8", "surrogateescape")

    def start_ok(self) -> bytes:
        """Connection.StartOk with the response's exact bytes (pamqp would re-encode them)."""
        mechanism = self.mechanism.encode()
        response = self.response()
        payload = b"".join(
            (
                struct.pack(">I", m.CONNECTION_START_OK),
                CLIENT_PROPERTIES_TABLE,
                bytes([len(mechanism)]), mechanism,
                struct.pack(">I", len(response)), response,
                b"\x05en_US",
            )
        )  # fmt: skip
        return frame(METHOD, 0, payload)


async def open_upstream(
    loop: asyncio.AbstractEventLoop,
    settings: UpstreamSettings,
    stats: Stats,
    login: Login,
    pool: Pool | None,
) -> UpstreamConnection:
    """Connect and run the handshake within the connect timeout, or raise UpstreamError:
    through Connection.OpenOk for `pool`'s vhost, or, without a pool, only until the broker
    has accepted the login (its Tune); `complete_upstream` then opens a vhost on it."""
    started = time.monotonic()
    conn: UpstreamConnection | None = None
    vhost = pool.vhost if pool is not None else None
    try:
        async with asyncio.timeout(settings.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(loop, settings, stats, login, pool),
                settings.host,
                settings.port,
                ssl=settings.ssl_context,
                server_hostname=settings.host if settings.ssl_context else None,
            )
            await (conn.tuned if pool is None else conn.ready)
    except BaseException as exc:
        raise _failure(settings, stats, login.user, vhost, exc, conn) from None
    if pool is not None:
        _opened(conn, started)
    return conn


async def complete_upstream(conn: UpstreamConnection, pool: Pool) -> UpstreamConnection:
    """Open `pool`'s vhost on a connection whose login the broker accepted."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(conn.settings.connect_timeout):
            conn.open_vhost(pool)
            await conn.ready
    except BaseException as exc:
        raise _failure(conn.settings, conn.stats, pool.user, pool.vhost, exc, conn) from None
    _opened(conn, started)
    return conn


def _opened(conn: UpstreamConnection, started: float) -> None:
    elapsed = time.monotonic() - started
    conn.stats.upstream_connect_seconds.append(elapsed)
    log.info(
        "upstream connection opened to %s (local port %s, %.1f ms)",
        conn.name,
        conn.local_port,
        elapsed * 1000,
    )


def _failure(
    settings: UpstreamSettings,
    stats: Stats,
    user: str,
    vhost: str | None,
    exc: BaseException,
    conn: UpstreamConnection | None,
) -> BaseException:
    """The error a failed connection attempt raises, counted and logged."""
    if isinstance(exc, UpstreamError):
        refused = exc.code in (m.ACCESS_REFUSED, m.NOT_ALLOWED)
        stats.upstream_errors["refused" if refused else "closed_by_broker"] += 1
        return exc
    if isinstance(exc, TimeoutError):
        kind, reason = "timeout", f"did not answer within {settings.connect_timeout:g} s"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        kind, reason = "tls", f"certificate verification failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        kind, reason = "tls", f"TLS handshake failed: {exc.reason or exc}"
    elif isinstance(exc, OSError):
        kind, reason = "unreachable", f"unreachable: {exc.strerror or exc}"
    else:  # cancelled (the client left), or a bug
        if conn is not None:
            conn.abort()
        return exc
    if conn is not None:
        conn.abort()
    stats.upstream_errors[kind] += 1
    who = f"user={user!r}" if vhost is None else f"user={user!r} vhost={vhost!r}"
    log.error("upstream %s for %s: %s", settings.address, who, reason)
    return UpstreamError(
        m.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream {settings.address} {reason}"
    )


class UpstreamConnection(FramedProtocol):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: UpstreamSettings,
        stats: Stats,
        login: Login,
        pool: Pool | None,
    ) -> None:
        super().__init__(loop)
        self.settings = settings
        self.login = login
        #: The pool it belongs to, once a vhost is open on it (see open_vhost).
        self.pool: Pool | None = pool
        self.frame_max = DEFAULT_FRAME_MAX  # until Tune says otherwise
        self.state = HANDSHAKE
        #: The broker accepted the login (its Tune arrived).
        self.tuned: asyncio.Future[None] = loop.create_future()
        #: The vhost is open (OpenOk).
        self.ready: asyncio.Future[None] = loop.create_future()
        self._tune_ok = b""
        self.channels: dict[int, ChannelLink] = {}
        self.numbers = ChannelNumbers(0)
        #: Reason given by Connection.Blocked while the broker blocks publishers, else None.
        self.blocked: str | None = None
        #: The transport's buffer towards the broker is over its high-water mark.
        self.write_paused = False
        self.idle_since = self.opened_at = time.monotonic()
        #: Past max_upstream_lifetime: takes no new channels, closes when empty.
        self.retired = False
        self.local_port: int | None = None
        self.stats = stats
        #: How log lines name this connection.
        self.name = f"{settings.address} (user={login.user!r})"
        if pool is not None:
            self.name = f"{settings.address} (user={pool.user!r} vhost={pool.vhost!r})"
        #: Exclusive queues declared through this connection, and the client that owns each.
        self.exclusive_owners: dict[str, ClientSide] = {}
        #: Clients told that this connection is blocked (told again when it is unblocked,
        #: whether or not they still have a channel here, as a direct connection would be).
        self.blocked_clients: set[ClientSide] = set()
        #: Clients not read while the broker does not read this connection.
        self.held_clients: set[ClientSide] = set()
        #: A disposable connection's one trial method (see `probe`).
        self._probe: asyncio.Future[tuple[int, str, bool] | None] | None = None
        self._handshake_step = m.CONNECTION_START
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
        self.send(b"AMQP\x00\x00\x09\x01")

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = CLOSED
        self.closed = True
        if was == HANDSHAKE:
            self._handshake_failed(self._handshake_failure(exc))
            return
        self._leave_pool()
        if was == READY:
            self.stats.upstream_errors["lost"] += 1
            reason = f"connection lost: {exc}" if exc else "connection closed by broker"
            log.warning(
                "upstream connection to %s %s",
                self.name,
                reason,
            )
            self._close_clients(
                m.CONNECTION_FORCED, "CONNECTION_FORCED - upstream connection lost", 0, 0
            )
        elif was == CLOSING:
            log.info(
                "upstream connection to %s closed: %s",
                self.name,
                self._close_reason or "closed",
            )

    def _handshake_failure(self, exc: Exception | None) -> Exception:
        if isinstance(exc, ssl.SSLError):
            return exc
        if self._handshake_step == m.CONNECTION_TUNE:
            # An old broker drops the socket instead of sending Close on bad credentials.
            return UpstreamError(m.ACCESS_REFUSED, "ACCESS_REFUSED - login refused by upstream")
        detail = f": {exc}" if exc else ""
        return UpstreamError(
            m.CONNECTION_FORCED,
            f"CONNECTION_FORCED - upstream {self.settings.address} closed the connection "
            f"during the handshake{detail}",
        )

    def close(self, reason: str) -> None:
        """Close gracefully (idle timeout, shutdown); clients must already be gone."""
        if self.state != READY:
            return
        self.state = CLOSING
        self._close_reason = reason
        self._leave_pool()
        self.send(m.encode_method(0, commands.Connection.Close(m.REPLY_SUCCESS, reason, 0, 0)))
        self.loop.call_later(5.0, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def is_open(self) -> bool:
        """Open for channels (a retired connection still takes its clients' further ones)."""
        return self.state == READY

    @property
    def is_usable(self) -> bool:
        """Open, and young enough to take new channels (and to vouch for credentials)."""
        return self.state == READY and not self.retired

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
            if self.state == HANDSHAKE:
                self._handshake(m.decode_broker_method(payload))
            else:
                self._connection_method(payload)
        elif frame_type != HEARTBEAT:
            raise FrameError(m.UNEXPECTED_FRAME, "UNEXPECTED_FRAME - content on channel 0")

    def protocol_error(self, exc: FrameError) -> None:
        log.error("upstream %s sent an invalid frame: %s", self.settings.address, exc.text)
        self._fail(m.INTERNAL_ERROR, f"INTERNAL_ERROR - upstream sent an invalid frame: {exc.text}")

    def _handshake(self, method: m.Method) -> None:
        index = method.index
        if index == m.CONNECTION_CLOSE:
            assert isinstance(method, commands.Connection.Close)
            self.send(m.encode_method(0, commands.Connection.CloseOk()))
            self.close_transport()
            self._handshake_failed(UpstreamError(method.reply_code or 0, method.reply_text))
            return
        if index != self._handshake_step:
            raise FrameError(m.COMMAND_INVALID, f"COMMAND_INVALID - unexpected {method.name}")
        if isinstance(method, commands.Connection.Start):
            self.send(self.login.start_ok())
            self._handshake_step = m.CONNECTION_TUNE
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
            self._handshake_step = m.CONNECTION_OPEN_OK
            self.tuned.set_result(None)
            if self.pool is not None:
                self.open_vhost(self.pool)
        elif isinstance(method, commands.Connection.OpenOk):
            self.state = READY
            self.idle_since = time.monotonic()
            if not self.ready.done():
                self.ready.set_result(None)

    def _leave_pool(self) -> None:
        if self.pool is not None:
            self.pool.connection_gone(self)

    def open_vhost(self, pool: Pool) -> None:
        """The login is accepted: finish the handshake with the pool's vhost."""
        self.pool = pool
        self.name = f"{self.settings.address} (user={pool.user!r} vhost={pool.vhost!r})"
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
        if mid == m.CONNECTION_CLOSE:
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
            self.state = CLOSED
            self._leave_pool()
            self._close_clients(
                close.reply_code or 0, close.reply_text, close.class_id or 0, close.method_id or 0
            )
            self.close_transport()
        elif mid == m.CONNECTION_CLOSE_OK:
            self.close_transport()
        elif mid == m.CONNECTION_BLOCKED:
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
        elif mid == m.CONNECTION_UNBLOCKED:
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
        self.send(frame(METHOD, 1, CHANNEL_OPEN_PAYLOAD))
        self.send(method_frame)
        return await self._probe

    def _probe_answer(self, payload: memoryview) -> None:
        assert self._probe is not None
        mid = method_id(payload)
        if mid == m.CHANNEL_OPEN_OK or self._probe.done():
            return
        if mid == m.CHANNEL_CLOSE:
            close = m.decode_broker_method(payload)
            assert isinstance(close, commands.Channel.Close)
            self.send(frame(METHOD, 1, CHANNEL_CLOSE_OK_PAYLOAD))
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
        self._fail(m.CONNECTION_FORCED, "CONNECTION_FORCED - upstream missed heartbeats")

    def _fail(self, code: int, text: str) -> None:
        """Give up on this connection: tell its clients, then drop it."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._leave_pool()
        self._close_clients(code, text, 0, 0)
        self.abort()

    def _close_clients(self, code: int, text: str, class_id: int, method_id: int) -> None:
        self._end_probe(code, text)
        # those with a channel here, and those whose exclusive queues it takes with it (a
        # client with neither loses nothing: it carries on elsewhere)
        clients = {id(c): c for c in self.exclusive_owners.values()}
        clients.update((id(c), c) for c in self.clients())
        for link in self.channels.values():
            link.upstream_gone()
        self.channels.clear()
        self._release_held()
        self.blocked_clients.clear()
        for client in clients.values():
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
        return self.state == READY and not self.retired

    def allocate(self, client: ClientSide, number: int) -> ChannelLink | None:
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

    def release_number(self, link: ChannelLink) -> None:
        if self.channels.get(link.upstream_number) is link:
            del self.channels[link.upstream_number]
            self.numbers.release(link.upstream_number)
            if not self.channels:
                self.idle_since = time.monotonic()

    def delete_queues(
        self, queues: set[str], client: ClientSide | None, links: Iterable[ChannelLink]
    ) -> None:
        """Delete a departing client's exclusive queues, on one of its open channels here
        or else on a channel opened for just that. The deletes are requests, so that the
        channel is parked (or closed) only once they are done."""
        if self.state != READY:
            return
        link = next(
            (
                x
                for x in links
                if x.client is client and x.upstream is self and x.up is Up.OPEN and x.client_open
            ),
            None,
        )
        temporary = link is None
        if link is None:
            link = self.allocate(None, 0)  # type: ignore[arg-type]
            if link is None:
                log.warning("no free channel to delete exclusive queues %s", sorted(queues))
                return
        for queue in sorted(queues):
            delete = commands.Queue.Delete(queue=queue)
            link.send_request(
                m.encode_method(link.upstream_number, delete), m.QUEUE_DELETE, Request.DROP
            )
        if temporary:
            link.client_left()

    def hold(self, client: ClientSide) -> None:
        """Stop reading a client that publishes here while the broker does not read."""
        self.held_clients.add(client)
        client.hold_reading(self)

    def forget(self, client: ClientSide) -> None:
        """A client is gone: nothing here may keep a reference to it."""
        self.held_clients.discard(client)
        self.blocked_clients.discard(client)

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.name} port={self.local_port} channels={len(self.channels)}>"
        )
