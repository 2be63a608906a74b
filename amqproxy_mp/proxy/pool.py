"""Upstream connection pools, one per exact (user, password, vhost).

Keying by the password too means a client is only ever served by a connection
that the broker opened for exactly its credentials: authentication is never
inferred from someone else's login.

A pool owns its park list: upstream channels whose client left, each clean (the broker
has answered everything sent on it, so nothing an earlier client did can still close it)
and on a connection that takes new channels. The list follows the links' own state: a link
enters it when it becomes PARKED and leaves it when it stops being PARKED (reused by
`take_channel`, closed when idle or when its connection retires, or gone with its
connection); see ChannelLink._set_up, the only caller of `parked` and `unparked`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from amqproxy_mp.amqp.spec import CONNECTION_FORCED, RESOURCE_ERROR
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.channels import ChannelLink, Up
from amqproxy_mp.proxy.confirms import Unconfirmed, UnconfirmedBuffer
from amqproxy_mp.proxy.connect import CLIENTS_ANSWER, complete_upstream, open_upstream
from amqproxy_mp.proxy.login import Login, UpstreamError, UpstreamSettings
from amqproxy_mp.proxy.nodes import Nodes, NodeState
from amqproxy_mp.proxy.sides import ClientSide
from amqproxy_mp.proxy.upstream import UpstreamConnection

log = logging.getLogger(__name__)

Credentials = tuple[str, str, str]  # user, password, vhost


@dataclass(frozen=True)
class PoolSettings:
    upstream: UpstreamSettings
    #: Channels per upstream connection before new clients go to another (0: the broker's).
    max_channels: int
    #: Upstream connections per pool (0: no limit).
    max_connections: int
    #: Seconds after which an upstream connection takes no new channels (0: never).
    max_lifetime: float
    #: Seconds a parked channel, or an upstream connection without channels, is kept.
    idle_timeout: float
    #: Close connections no client uses on nodes with more than their share (several nodes).
    rebalance: bool = False
    #: Bytes of unconfirmed messages a worker keeps before it holds publishers.
    unconfirmed_buffer: int = 64 * 1024 * 1024


class Pool:
    def __init__(self, pools: Pools, credentials: Credentials) -> None:
        self.pools = pools
        self.user, self.password, self.vhost = credentials
        self.credentials = credentials
        self.connections: list[UpstreamConnection] = []
        #: Client sessions authenticated through this pool.
        self.clients = 0
        self._opening: asyncio.Future[UpstreamConnection] | None = None
        #: Clean upstream channels whose clients left (PARKED), most recently parked last.
        self._parked: dict[ChannelLink[UpstreamConnection], None] = {}
        #: Re-sends under way (see `resend`): the pool is kept until they are done.
        self.resending = 0

    @property
    def has_usable_connection(self) -> bool:
        """A pooled connection proves these credentials may open this vhost."""
        return any(conn.is_usable for conn in self.connections)

    async def authenticate(self, tuned: UpstreamConnection | None = None) -> None:
        """Succeed when the broker lets these credentials open this vhost (a pooled
        connection proves it). `tuned`: a connection whose login the broker accepted, to
        open the vhost on rather than asking the broker to check the login again."""
        if self.has_usable_connection:
            if tuned is not None:
                tuned.abort()
            return
        await self.open_connection(tuned)

    def parked(self, link: ChannelLink[UpstreamConnection]) -> None:
        self._parked[link] = None

    def unparked(self, link: ChannelLink[UpstreamConnection]) -> None:
        self._parked.pop(link, None)

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    def take_channel(
        self, client: ClientSide, number: int, home: UpstreamConnection | None
    ) -> ChannelLink[UpstreamConnection] | None:
        """An upstream channel for a client channel, without waiting: a parked one if there
        is one (no broker round trip at all), else a new one. A client's channels all go to
        its first channel's connection (its home), where its exclusive queues are."""
        for link in reversed(self._parked):
            # The most recently parked first: a client that follows another (the PHP-FPM
            # pattern) gets the same upstream channel.
            if home is None or link.upstream is home:
                link.reuse(client, number)
                self.pools.stats.channels_reused += 1
                return link
        if home is not None and home.is_open and (new := home.allocate(client, number)):
            return new
        for conn in self.connections:
            if self._takes(conn, 1):
                new = conn.allocate(client, number)
                if new is not None:
                    return new
        return None

    def _takes(self, conn: UpstreamConnection, channels: int) -> bool:
        """`conn` takes `channels` more channels: it is usable, and has the numbers for them
        within its channel_max and max_upstream_channels."""
        limit = self.pools.settings.max_channels
        numbers = conn.numbers
        return (
            conn.is_usable
            and numbers.available >= channels
            and (not limit or numbers.in_use + channels <= limit)
        )

    async def acquire_channel(
        self, client: ClientSide, number: int, home: UpstreamConnection | None
    ) -> ChannelLink[UpstreamConnection]:
        """Like take_channel, opening another upstream connection when all are full."""
        while (link := self.take_channel(client, number, home)) is None:
            await self._open_another()
        return link

    async def _open_another(self) -> UpstreamConnection:
        """One more connection, within max_upstream_connections (else RESOURCE_ERROR)."""
        limit = self.pools.settings.max_connections
        if limit and len(self.connections) >= limit and self._opening is None:
            raise UpstreamError(
                RESOURCE_ERROR,
                f"RESOURCE_ERROR - all {limit} upstream connections of this pool are full "
                f"(max_upstream_connections)",
            )
        return await self.open_connection()

    async def open_connection(self, tuned: UpstreamConnection | None = None) -> UpstreamConnection:
        """Open one more upstream connection; concurrent callers share the same attempt."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open(tuned))
        elif tuned is not None:
            tuned.abort()  # another client's attempt is under way already
        opening = self._opening
        return await asyncio.shield(opening)

    async def _open(self, tuned: UpstreamConnection | None) -> UpstreamConnection:
        pools = self.pools
        budget = None
        try:
            conn = None
            if tuned is not None:
                started = time.monotonic()
                try:
                    conn = await complete_upstream(tuned, self)
                except UpstreamError as exc:
                    if exc.code in CLIENTS_ANSWER or not pools.nodes.several:
                        raise
                    # its node failed between the login and the vhost: another node, in
                    # the time the client has left
                    budget = pools.settings.upstream.connect_timeout - (time.monotonic() - started)
            if conn is None:
                conn = await pools.connect(Login(self.user, self.password), self, budget)
            self.connections.append(conn)
            return conn
        finally:
            self._opening = None
            self.pools.forget_if_unused(self)

    async def trial(
        self, method: bytes, then: bytes = b"", purpose: str = "trial"
    ) -> tuple[int, str, bool] | None:
        """Send one method (on channel 1) on a disposable connection with this pool's
        credentials, and `then` after it if it was answered: None when the broker answered
        it, else its refusal (code, text, and whether it closed the connection). This is
        what a client's own connection would get, where the shared one would differ."""
        pools = self.pools
        conn = await pools.connect(Login(self.user, self.password), Pool(pools, self.credentials))
        try:
            async with asyncio.timeout(pools.settings.upstream.connect_timeout):
                result = await conn.probe(method)
            if result is None and then:
                conn.send(then)
            return result
        except TimeoutError:
            raise UpstreamError(
                CONNECTION_FORCED,
                f"CONNECTION_FORCED - upstream {conn.node.name} did not answer "
                f"the {purpose} within {pools.settings.upstream.connect_timeout:g} s",
            ) from None
        finally:
            conn.close(f"{purpose} done")

    async def usable_connection(self, channels: int) -> UpstreamConnection:
        """A connection with room for `channels` more: one of the pool's (with several
        nodes, not one on a node that just failed under another connection), or a new one
        (UpstreamError when none can be had, or max_upstream_connections are open)."""
        several = self.pools.nodes.several
        for conn in self.connections:
            if self._takes(conn, channels) and not (several and conn.node.state is NodeState.DOWN):
                return conn
        return await self._open_another()

    @property
    def unconfirmed(self) -> UnconfirmedBuffer:
        return self.pools.unconfirmed

    def resend(self, channels: list[list[Unconfirmed]], lost: str) -> None:
        """Publish again, each channel's in its order on a channel of its own (an error one
        of them meets, as a publish to an exchange deleted meanwhile, costs only what it
        would have cost on the channel it came from), messages whose upstream connection
        ended before the broker confirmed them: on a connection of this pool, else on a new
        one (on a node that is up), retrying until one is had."""
        count = sum(len(messages) for messages in channels)
        if self.pools.closing:
            self.unconfirmed.removed([m for messages in channels for m in messages])
            log.error(
                "upstream connection %s ended with %d messages unconfirmed while the worker "
                "stops: they may be lost", lost, count,
            )  # fmt: skip
            return
        self.resending += 1
        log.warning(
            "upstream connection %s ended with %d messages unconfirmed: sending them again",
            lost, count,
        )  # fmt: skip
        task = asyncio.ensure_future(self._resend(channels))
        self.pools.tasks.add(task)
        task.add_done_callback(self.pools.tasks.discard)

    async def _resend(self, channels: list[list[Unconfirmed]]) -> None:
        delay = 0.5
        try:
            while channels:
                try:
                    conn = await self.usable_connection(len(channels))
                except UpstreamError as exc:
                    count = sum(len(messages) for messages in channels)
                    if exc.code in CLIENTS_ANSWER:  # the credentials or vhost are gone
                        log.error(
                            "%d unconfirmed messages (user=%r vhost=%r) cannot be sent again: "
                            "%s", count, self.user, self.vhost, exc.text,
                        )  # fmt: skip
                        break
                    log.warning(
                        "cannot send %d unconfirmed messages again yet (user=%r vhost=%r): "
                        "%s; retrying in %g s",
                        count, self.user, self.vhost, exc.text, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                while channels and (link := conn.allocate(None, 0)) is not None:
                    messages = channels.pop(0)
                    link.republish(messages)
                    log.info("sent %d unconfirmed messages again through %s", len(messages),
                             conn.name)  # fmt: skip
        finally:
            self.resending -= 1
            if channels:  # given up, or cancelled (the worker stops): they are lost
                lost = [m for messages in channels for m in messages]
                self.unconfirmed.removed(lost)
                log.error(
                    "%d unconfirmed messages (user=%r vhost=%r) were not sent again",
                    len(lost), self.user, self.vhost,
                )  # fmt: skip
            self.pools.forget_if_unused(self)

    def connection_gone(self, conn: UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)

    def close_idle(self, now: float) -> None:
        """Retire connections older than max_lifetime (no new channels; closed once empty),
        and close connections without channels or exclusive queues for idle_timeout, keeping
        one per pool."""
        settings = self.pools.settings
        idle_timeout, max_lifetime = settings.idle_timeout, settings.max_lifetime
        for conn in self.connections:
            if max_lifetime and conn.is_usable and now - conn.opened_at >= max_lifetime:
                conn.retire(max_lifetime)
        for link in list(self._parked):
            if not link.upstream.can_park or now - link.parked_since >= idle_timeout:
                link.close_parked()
        # (a connection that holds a client's exclusive queues is that client's, channels
        # or not: closing it would delete them)
        unused = [c for c in self.connections if not c.channels and not c.exclusive.owners()]
        for conn in [c for c in unused if c.retired]:
            conn.close(f"max lifetime of {max_lifetime:g} s reached")
        idle = [c for c in unused if c.is_usable]
        keep = 1 if len(idle) == len(self.connections) else 0
        for conn in idle[keep:]:
            if now - conn.idle_since >= idle_timeout:
                conn.close(f"idle for {idle_timeout:g} s")

    def __repr__(self) -> str:
        return f"<Pool user={self.user!r} vhost={self.vhost!r} connections={len(self.connections)}>"


class PendingLogin:
    """The broker is asked, once for all clients presenting the same credentials at the same
    time, whether it accepts a login: an upstream connection whose handshake stops after
    Tune. The first of these clients to send Connection.Open opens its vhost on it."""

    def __init__(self, pools: Pools, login: Login) -> None:
        self.key = (login.user, login.password)
        self.task = asyncio.ensure_future(pools.connect(login, None))
        self.task.add_done_callback(lambda _: pools.logins.pop(self.key, None))
        #: Clients waiting for the verdict or holding it until their Connection.Open.
        self.holders = 0
        self.claimed = False

    def claim(self) -> UpstreamConnection | None:
        """The accepted connection, for the first client that opens a vhost."""
        task = self.task
        if self.claimed or not task.done() or task.cancelled() or task.exception():
            return None
        conn = task.result()
        if conn.closed or conn.ready.done():
            return None
        self.claimed = True
        return conn

    def release(self) -> None:
        """A holder is done with it; the last one closes an unclaimed connection."""
        self.holders -= 1
        if self.holders > 0 or self.claimed:
            return
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled() and not self.task.exception():
            self.task.result().abort()


class Pools:
    """All pools of one worker."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, stats: Stats, settings: PoolSettings, nodes: Nodes
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.settings = settings
        #: The broker's nodes: which are up, and where a new connection goes.
        self.nodes = nodes
        self._pools: dict[Credentials, Pool] = {}
        #: The worker's unconfirmed messages (confirms.py).
        self.unconfirmed = UnconfirmedBuffer(settings.unconfirmed_buffer)
        #: Re-sends under way (see Pool.resend).
        self.tasks: set[asyncio.Future[None]] = set()
        #: The worker stops: nothing is sent again any more.
        self.closing = False
        #: Logins being checked, by (user, password).
        self.logins: dict[tuple[str, str], PendingLogin] = {}

    async def connect(
        self, login: Login, pool: Pool | None, budget: float | None = None
    ) -> UpstreamConnection:
        """A new upstream connection, on the node the policy picks (see open_upstream)."""
        return await open_upstream(
            self.loop, self.settings.upstream, self.nodes, self.stats, login, pool, budget
        )

    def verified(self, user: str, password: str) -> bool:
        """A live upstream connection was opened with exactly these credentials."""
        return any(
            pool.user == user and pool.password == password and pool.has_usable_connection
            for pool in self._pools.values()
        )

    def login(self, login: Login) -> PendingLogin:
        """The check of a login by the broker, shared with the clients already waiting."""
        pending = self.logins.get((login.user, login.password))
        if pending is None:
            pending = self.logins[login.user, login.password] = PendingLogin(self, login)
        pending.holders += 1
        return pending

    def find(self, credentials: Credentials) -> Pool | None:
        return self._pools.get(credentials)

    def get(self, credentials: Credentials) -> Pool:
        pool = self._pools.get(credentials)
        if pool is None:
            pool = self._pools[credentials] = Pool(self, credentials)
        return pool

    def forget_if_unused(self, pool: Pool) -> None:
        """Drop a pool that serves nobody (e.g. after a failed login) so pools cannot pile up."""
        unused = (
            not pool.connections
            and not pool.clients
            and pool._opening is None
            and not pool.resending
        )
        if unused and self._pools.get(pool.credentials) is pool:
            del self._pools[pool.credentials]

    def __iter__(self) -> Iterator[Pool]:
        return iter(list(self._pools.values()))

    def __len__(self) -> int:
        return len(self._pools)

    def connections(self) -> Iterator[UpstreamConnection]:
        for pool in self:
            yield from list(pool.connections)

    def close_idle(self) -> None:
        now = time.monotonic()
        for pool in self:
            pool.close_idle(now)
        if self.settings.rebalance and self.nodes.several:
            self._rebalance()

    def _rebalance(self) -> None:
        """Close one connection that no client uses (only parked channels, no client's
        exclusive queues) on a node the policy would not put it on now: the skew a node
        failure leaves fades as clients come, one connection per tick and worker."""
        for conn in self.connections():
            if (
                conn.is_usable
                and not conn.exclusive.owners()
                and all(link.up is Up.PARKED for link in conn.channels.values())
                and self.nodes.misplaced(conn.node)
            ):
                conn.close(f"rebalancing: node {conn.node.name} has more than its share")
                return
