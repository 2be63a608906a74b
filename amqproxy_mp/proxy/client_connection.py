"""A client connection: the server side of the AMQP handshake and the connection class.

The session answers the handshake itself and authenticates the client through its pool
(an upstream connection for exactly its credentials) before Connection.OpenOk. Where the
broker would close the connection, the client alone gets the broker's answer. Its channels
are the subclass's (client.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Final, NoReturn

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import MIN_FRAME_MAX, FrameError, method_id
from amqproxy_mp.amqp.transport import DEFAULT_FRAME_MAX, FramedProtocol
from amqproxy_mp.metrics import Disconnect
from amqproxy_mp.proxy.channels import ChannelLink
from amqproxy_mp.proxy.context import ProxyContext
from amqproxy_mp.proxy.login import Login, UpstreamError
from amqproxy_mp.proxy.pool import PendingLogin, Pool
from amqproxy_mp.proxy.upstream import UpstreamConnection

log = logging.getLogger(__name__)

#: Bytes queued for a client above which it counts as not reading (see resume_writing).
CLIENT_WRITE_BUFFER: Final = 256 * 1024
#: How long a client gets to answer our Connection.Close before its socket is closed.
CLOSE_OK_TIMEOUT: Final = 5.0


def refuse_method(mid: int) -> NoReturn:
    """A method no client may send here: RabbitMQ's answer (a method id it does not know
    crashes its parser, which drops the socket)."""
    if mid not in m.commands.INDEX_MAPPING:
        raise FrameError(spec.DROP, f"unknown method {mid >> 16}.{mid & 0xFFFF}")
    raise FrameError(
        spec.COMMAND_INVALID, "COMMAND_INVALID - unimplemented method", mid >> 16, mid & 0xFFFF
    )


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


class ClientConnection(FramedProtocol):
    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx.pools.loop)
        self.ctx = ctx
        self.settings = ctx.settings
        self.stats = ctx.stats
        self.phase = Phase.HEADER
        self.peer = "?"
        self.connected_at = time.monotonic()
        self.user = ""
        self.vhost = ""
        self._password = ""
        self.capabilities: frozenset[str] = frozenset()
        self.pool: Pool | None = None
        #: The broker's check of this client's login, until its Connection.Open.
        self._login: PendingLogin | None = None
        #: Why that check could not be made (answered at Connection.Open).
        self._upstream_failure: UpstreamError | None = None
        self.channel_max = spec.CHANNEL_MAX
        self.frame_max = DEFAULT_FRAME_MAX
        self.channels: dict[int, ChannelLink[UpstreamConnection]] = {}
        #: Upstream connections that told us they block publishers.
        self._blocked_by: set[UpstreamConnection] = set()
        #: Channels whose close must be answered by the broker before Connection.CloseOk.
        self._closes_pending = 0
        self._close_reason = ""
        #: The reason label for the disconnect metric.
        self._close_kind = Disconnect.SOCKET_CLOSED
        self._tasks: set[asyncio.Task[None]] = set()

    # --- what the channels part (ClientSession) provides ----------------------------------

    def _release_channels(self) -> list[asyncio.Future[bool]]:
        """Give every channel back (the client is gone, or is being closed); what it returns
        is done once the broker has deleted the client's exclusive queues."""
        return []

    def _close_channels(self) -> int:
        """The client's Connection.Close closes its channels: how many must wait for the
        broker before Connection.CloseOk."""
        return 0

    def _written(self) -> None:
        """What was queued for the client has gone to its socket."""

    # --- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # resume_writing comes when everything written has left: auto-ack deliveries are due
        transport.set_write_buffer_limits(high=CLIENT_WRITE_BUFFER, low=0)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
            self.peer = f"{host}:{peer[1]}"
        self.ctx.sessions.add(self)
        log.debug("client %s connected", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._close_reason:
            self._close_reason = f"connection lost: {exc}" if exc else "client closed the socket"
        self.stats.client_disconnects[self._close_kind] += 1
        self.phase = Phase.CLOSED
        self.closed = True
        self._release_channels()
        for upstream in self._blocked_by | self._read_holds:
            upstream.forget(self)
        self._blocked_by.clear()
        for task in self._tasks:
            task.cancel()
        self.ctx.sessions.discard(self)
        self._release_login()
        if self.pool is not None:
            self.pool.clients -= 1
            self.ctx.active_sessions -= 1
            self.ctx.pools.forget_if_unused(self.pool)
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

    def _ending(self, kind: Disconnect, reason: str) -> None:
        """Why this connection ends: `kind` labels the disconnect metric, `reason` the log."""
        self._close_kind = kind
        self._close_reason = reason

    def flush(self) -> None:
        super().flush()
        transport = self.transport
        self._written()
        if transport is not None and transport.get_write_buffer_size() > self.settings.max_buffer:
            log.warning(
                "client %s (user=%r vhost=%r) is not reading: over %d bytes waiting for it; "
                "disconnecting it",
                self.peer,
                self.user,
                self.vhost,
                self.settings.max_buffer,
            )
            self._ending(
                Disconnect.SLOW_CLIENT,
                f"too slow: more than {self.settings.max_buffer} bytes unsent",
            )
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
        if got != spec.PROTOCOL_HEADER[: len(got)]:
            self._ending(Disconnect.PROTOCOL_ERROR, f"bad protocol header {got!r}")
            self.send(spec.PROTOCOL_HEADER)
            self.phase = Phase.CLOSED
            self.close_transport()
            return
        if len(got) < 8:
            return
        del self._buf[:8]
        self.phase = Phase.START_OK
        self.frame_max = MIN_FRAME_MAX  # until Tune
        self.send(self.ctx.connection_start)
        super().data_received(b"")

    def close_with(
        self,
        code: int,
        text: str,
        class_id: int = 0,
        method_id: int = 0,
        close_ok_timeout: float | None = CLOSE_OK_TIMEOUT,
        kind: Disconnect = Disconnect.UPSTREAM_CLOSED,
    ) -> None:
        """Send Connection.Close to the client, give its channels back, await CloseOk."""
        if self.phase is Phase.CLOSING or self.phase is Phase.CLOSED:
            return
        self._ending(kind, f"closed by proxy: {code} {text}")
        deletes = self._release_channels()
        self.phase = Phase.CLOSING
        if self._parsing_paused:
            self.resume_parsing()

        def tell_client() -> None:
            self.send(m.close_frame(0, code, text, class_id, method_id))
            if close_ok_timeout is not None:
                self.loop.call_later(close_ok_timeout, self._close_timed_out)

        self._once_deleted(deletes, tell_client)

    def _once_deleted(self, deletes: list[asyncio.Future[bool]], then: Callable[[], None]) -> None:
        """`then` (which ends the connection for the client) once the broker has deleted the
        client's exclusive queues, as RabbitMQ does before it answers a Connection.Close or
        as it sends its own: the client's next connection finds the names free."""
        if not deletes:
            then()
            return

        async def wait() -> None:
            await asyncio.wait(deletes, timeout=CLOSE_OK_TIMEOUT)
            then()

        task = self.loop.create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_timed_out(self) -> None:
        if not self.closed:
            self._close_reason += " (no CloseOk in time)"
            self.abort()

    def protocol_error(self, exc: FrameError) -> None:
        if self.phase in ENDING:
            # Already closing: the rest of what it sent is discarded. Closing the socket now,
            # with unread bytes, would reset it and could destroy our Connection.Close.
            return
        log.warning("client %s (user=%r) protocol error: %s", self.peer, self.user, exc.text)
        if self.phase in BEFORE_TUNE or exc.code == spec.DROP:
            # as the broker: no Connection.Close before Tune, none when its parser crashes
            self._ending(Disconnect.PROTOCOL_ERROR, f"protocol error: {exc.text}")
            self._release_channels()
            self.phase = Phase.CLOSED
            self.close_transport()
        else:
            self.close_with(
                exc.code, exc.text, exc.class_id, exc.method_id, kind=Disconnect.PROTOCOL_ERROR
            )

    def check_heartbeat(self, now: float) -> None:
        self._written()
        handshake_timeout = self.settings.handshake_timeout
        if (self.phase in HANDSHAKE or self.phase is Phase.OPENING) and (
            now - self.connected_at > handshake_timeout
        ):
            self._ending(
                Disconnect.HANDSHAKE_TIMEOUT,
                f"handshake not completed within {handshake_timeout:g} s",
            )
            self.abort()
        elif not self.send_heartbeat_if_due(now):
            self._ending(Disconnect.HEARTBEAT, f"missed heartbeats (heartbeat {self.heartbeat} s)")
            self.abort()

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
                    spec.INTERNAL_ERROR,
                    "INTERNAL_ERROR - proxy error",
                    kind=Disconnect.INTERNAL_ERROR,
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
            raise FrameError(spec.INTERNAL_ERROR, "INTERNAL_ERROR") from None
        if index >> 16 != 10 and self.phase is Phase.ACTIVE:
            raise FrameError(
                spec.CHANNEL_ERROR,
                "CHANNEL_ERROR - unexpected method in connection state running",
                index >> 16, index & 0xFFFF,
            )  # fmt: skip
        phase = self.phase
        if phase is Phase.CLOSING:
            # as RabbitMQ, which ignores a Close of the client's that crossed its own (it may
            # also still be on its way: see close_with)
            if index == spec.CONNECTION_CLOSE_OK:
                self.phase = Phase.CLOSED
                self.close_transport()
            return
        if phase is Phase.CLIENT_CLOSING:
            return  # the client awaits our CloseOk
        if index == spec.CONNECTION_CLOSE:
            self._client_connection_close(int(arguments[0]), str(arguments[1]))
        elif phase is Phase.START_OK and index == spec.CONNECTION_START_OK:
            self._start_ok(arguments, payload)
        elif phase is Phase.TUNE_OK and index == spec.CONNECTION_TUNE_OK:
            self._tune_ok(*arguments)
        elif phase is Phase.OPEN and index == spec.CONNECTION_OPEN:
            self.vhost = str(arguments[0])
            self.phase = Phase.OPENING
            self._open()
        elif phase is Phase.ACTIVE and index == spec.CONNECTION_UPDATE_SECRET:
            # The pooled upstream connections keep the secret they were opened with (see
            # docs/differences.md); the client's connection carries on, as it would directly.
            self.send(spec.CONNECTION_UPDATE_SECRET_OK_FRAME)
        else:
            raise FrameError(
                spec.COMMAND_INVALID, f"COMMAND_INVALID - unexpected {m.method_name(index)}"
            )

    def _client_connection_close(self, code: int, text: str) -> None:
        """The client leaves. With close_policy processed, its CloseOk waits until the broker
        has processed what it published on each channel (and any error that caused is passed
        on first, as RabbitMQ does); with local, it is answered at once."""
        self._ending(Disconnect.CLIENT_CLOSE, "client closed the connection")
        self._written()
        if code != spec.REPLY_SUCCESS:
            self._close_reason += f" ({code} {text})"
        self.phase = Phase.CLIENT_CLOSING
        self._closes_pending = pending = self._close_channels()
        if not pending:
            self._connection_closed()

    def _connection_closed(self) -> None:
        def answer() -> None:
            self.send(spec.CONNECTION_CLOSE_OK_FRAME)
            self.phase = Phase.CLOSED
            self.close_transport()

        self._once_deleted(self._release_channels(), answer)

    def _start_ok(self, arguments: list[Any], payload: memoryview) -> None:
        """Check the login now, as the broker does: a refusal answers StartOk."""
        self.capabilities = m.client_capabilities(arguments, payload)
        mechanism = str(arguments[1])
        try:
            self.user, self._password = m.parse_sasl_response(mechanism, arguments[2])
        except m.WrongSaslType:
            self._refuse_login(
                UpstreamError(
                    spec.ACCESS_REFUSED,
                    f"ACCESS_REFUSED - Login was refused using authentication mechanism "
                    f"{mechanism}. For details see the broker logfile.",
                )
            )
            return
        except ValueError as exc:  # RabbitMQ just drops the client
            raise FrameError(spec.DROP, f"login: {exc}") from None
        if self.ctx.pools.verified(self.user, self._password):
            # Known-good credentials (a live upstream connection was opened with them) are
            # accepted at once, without a task: this is every PHP request after the first.
            self._tune()
        else:
            self.run_paused(self._check_login(Login(self.user, self._password, mechanism)))

    async def _check_login(self, login: Login) -> None:
        """Credentials not known to be good are put to the broker on an upstream connection
        that stops after Tune, which Connection.Open then completes (see Pools.login)."""
        self._login = self.ctx.pools.login(login)
        try:
            await asyncio.shield(self._login.task)
        except UpstreamError as exc:
            if exc.code == spec.ACCESS_REFUSED:
                self._refuse_login(exc)
                return
            # Not a refusal (the broker is unreachable...): answered at Connection.Open,
            # where clients expect it, not as if the login had been refused.
            self._upstream_failure = exc
        self._tune()

    def _tune(self) -> None:
        self.send(self.ctx.connection_tune)
        self.phase = Phase.TUNE_OK

    def _refuse_login(self, exc: UpstreamError) -> None:
        self._release_login()
        if exc.code == spec.ACCESS_REFUSED:
            self.stats.auth_failures[str(exc.code)] += 1
            log.warning(
                "client %s: authentication failed for user=%r: %s", self.peer, self.user, exc.text
            )
            if "authentication_failure_close" not in self.capabilities:
                # RabbitMQ just drops such a client (it cannot tell a Close from a failure)
                self._ending(Disconnect.AUTH_FAILED, f"login refused: {exc.text}")
                self.abort()
                return
        self.close_with(
            exc.code,
            exc.text,
            kind=Disconnect.AUTH_FAILED
            if exc.code == spec.ACCESS_REFUSED
            else Disconnect.UPSTREAM_CLOSED,
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
            ("channel_max", channel_max, 1, spec.CHANNEL_MAX),
        ):
            if value and value < lowest:
                raise FrameError(
                    spec.DROP,
                    f"negotiated {field} = {value} is lower than the minimum allowed value "
                    f"({lowest})",
                )
            if value == 0 or value > offered:
                detail = " (no limit)" if field == "channel_max" and value == 0 else ""
                raise FrameError(
                    spec.DROP,
                    f"negotiated {field} = {value}{detail} is higher than the maximum allowed "
                    f"value ({offered})",
                )
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = heartbeat
        self.phase = Phase.OPEN

    def _open(self) -> None:
        """Connection.Open: the client's pool must have a connection open on its vhost, or
        one is opened now (on the connection its login was checked on, if it has one)."""
        limit = self.settings.max_connections
        if limit and self.ctx.active_sessions >= limit:
            log.warning("client %s refused: max_client_connections (%d) reached", self.peer, limit)
            self.close_with(
                spec.NOT_ALLOWED,
                f"NOT_ALLOWED - connection limit ({limit} per worker) of amqproxy-mp is reached",
                10, 40, kind=Disconnect.CONNECTION_LIMIT,
            )  # fmt: skip
            return
        pool = self.ctx.pools.find((self.user, self._password, self.vhost))
        if (
            pool is not None
            and pool.has_usable_connection
            and self._login is None
            and self._upstream_failure is None
        ):
            self._opened(pool)  # the common case: no task, no pause in reading
        else:
            self.run_paused(self._authenticate())

    async def _authenticate(self) -> None:
        pools = self.ctx.pools
        # (looked up, or made, in the step that uses it: a pool got earlier could have been
        # forgotten as unused meanwhile, and a connection opened on it would be nobody's)
        pool = pools.get((self.user, self._password, self.vhost))
        tuned = self._login.claim() if self._login is not None else None
        self._release_login()
        try:
            if self._upstream_failure is not None:
                raise self._upstream_failure
            await pool.authenticate(tuned)
        except UpstreamError as exc:
            pools.forget_if_unused(pool)
            refused = exc.code in (spec.ACCESS_REFUSED, spec.NOT_ALLOWED)
            if refused:
                self.stats.auth_failures[str(exc.code)] += 1
                log.warning(
                    "client %s: authentication failed for user=%r vhost=%r: %s %s",
                    self.peer, self.user, self.vhost, exc.code, exc.text,
                )  # fmt: skip
            self.close_with(
                exc.code,
                exc.text,
                10,
                40,
                kind=Disconnect.AUTH_FAILED if refused else Disconnect.UPSTREAM_CLOSED,
            )
            return
        if self.phase is not Phase.OPENING:
            pools.forget_if_unused(pool)
            return
        self._opened(pool)

    def _opened(self, pool: Pool) -> None:
        self.pool = pool
        pool.clients += 1
        self.ctx.active_sessions += 1
        self.phase = Phase.ACTIVE
        self.send(spec.CONNECTION_OPEN_OK_FRAME)
        # one INFO line per client, when it leaves (PHP-FPM opens thousands a second)
        log.debug("client %s connected as user=%r vhost=%r", self.peer, self.user, self.vhost)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.peer} user={self.user!r} vhost={self.vhost!r}>"
