"""Upstream connection pools, one per exact (user, password, vhost).

Keying by the password too means a client is only ever served by a connection
that the broker opened for exactly its credentials: authentication is never
inferred from someone else's login.

A pool owns its park list: upstream channels whose client left, each clean (the broker
has answered everything sent on it, so nothing an earlier client did can still close it)
and on a connection that takes new channels. Only `park` puts a channel there; it leaves
through `take_channel`, or is closed when idle or when its connection retires or ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from amqproxy_mp.amqp.methods import RESOURCE_ERROR
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.upstream import (
    Login,
    UpstreamConnection,
    UpstreamError,
    UpstreamSettings,
    complete_upstream,
    open_upstream,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from amqproxy_mp.proxy.channels import ChannelLink
    from amqproxy_mp.proxy.client import ClientSession

log = logging.getLogger(__name__)

Credentials = tuple[str, str, str]  # user, password, vhost


class Pool:
    def __init__(self, pools: Pools, credentials: Credentials) -> None:
        self.pools = pools
        self.user, self.password, self.vhost = credentials
        self.credentials = credentials
        self.connections: list[UpstreamConnection] = []
        #: Client sessions authenticated through this pool.
        self.clients = 0
        self._opening: asyncio.Future[UpstreamConnection] | None = None
        #: Clean upstream channels whose clients left, most recently parked last.
        self.parked: list[ChannelLink] = []

    async def authenticate(self, tuned: UpstreamConnection | None = None) -> None:
        """Succeed when the broker lets these credentials open this vhost (a pooled
        connection proves it). `tuned`: a connection whose login the broker accepted, to
        open the vhost on rather than asking the broker to check the login again."""
        if any(conn.is_usable for conn in self.connections):
            if tuned is not None:
                tuned.abort()
            return
        await self.open_connection(tuned)

    def park(self, link: ChannelLink) -> None:
        """Keep a clean channel whose client left for the next client of the pool."""
        link.touch_parked()
        self.parked.append(link)

    def take_channel(self, client: ClientSession, number: int) -> ChannelLink | None:
        """An upstream channel for a client channel, without waiting: a parked one if there
        is one (no broker round trip at all), else a new one. A client's channels all go to
        its first channel's connection (its home), where its exclusive queues are."""
        home = client.home
        parked = self.parked
        for i in range(len(parked) - 1, -1, -1):
            # The most recently parked first: a client that follows another (the PHP-FPM
            # pattern) gets the same upstream channel.
            link = parked[i]
            if home is None or link.upstream is home:
                del parked[i]
                link.reuse(client, number)
                self.pools.stats.channels_reused += 1
                return link
        if home is not None and home.is_open and (new := home.allocate(client, number)):
            return new
        limit = self.pools.settings.max_channels
        for conn in self.connections:
            if conn.is_usable and (not limit or conn.numbers.in_use < limit):
                new = conn.allocate(client, number)
                if new is not None:
                    return new
        return None

    async def acquire_channel(self, client: ClientSession, number: int) -> ChannelLink:
        """Like take_channel, opening another upstream connection when all are full."""
        while (link := self.take_channel(client, number)) is None:
            limit = self.pools.max_connections
            if limit and len(self.connections) >= limit and self._opening is None:
                raise UpstreamError(
                    RESOURCE_ERROR,
                    f"RESOURCE_ERROR - all {limit} upstream connections of this pool are full "
                    f"(max_upstream_connections)",
                )
            await self.open_connection()
        return link

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
        try:
            if tuned is not None:
                conn = await complete_upstream(tuned, self)
            else:
                login = Login(self.user, self.password)
                conn = await open_upstream(pools.loop, pools.settings, pools.stats, login, self)
            self.connections.append(conn)
            return conn
        finally:
            self._opening = None
            self.pools.forget_if_unused(self)

    def _unpark(self, condition: object) -> None:
        """Close the parked channels for which `condition(link)` holds."""
        keep = []
        for link in self.parked:
            if condition(link):  # type: ignore[operator]
                link.close_parked()
            else:
                keep.append(link)
        self.parked = keep

    def connection_gone(self, conn: UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self.parked = [link for link in self.parked if link.upstream is not conn]

    def close_idle(self, now: float, idle_timeout: float, max_lifetime: float) -> None:
        """Retire connections older than max_lifetime (no new channels; closed once empty),
        and close connections without channels for idle_timeout, keeping one per pool."""
        for conn in self.connections:
            if max_lifetime and not conn.retired and now - conn.opened_at >= max_lifetime:
                conn.retired = True
                log.info(
                    "upstream connection %s reached its max lifetime (%g s): retiring it",
                    conn.name,
                    max_lifetime,
                )
        if self.parked:
            self._unpark(
                lambda link: link.upstream.retired or now - link.parked_since >= idle_timeout
            )
        for conn in [c for c in self.connections if c.retired and not c.channels]:
            conn.close(f"max lifetime of {max_lifetime:g} s reached")
        idle = [c for c in self.connections if c.is_usable and not c.channels]
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
        self.task = asyncio.ensure_future(
            open_upstream(pools.loop, pools.settings, pools.stats, login, None)
        )
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
        self,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        settings: UpstreamSettings,
        max_connections: int = 0,
        max_lifetime: float = 0.0,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.settings = settings
        #: Upstream connections per pool (0: no limit).
        self.max_connections = max_connections
        #: Seconds after which an upstream connection takes no new channels (0: never).
        self.max_lifetime = max_lifetime
        self._pools: dict[Credentials, Pool] = {}
        #: Logins being checked, by (user, password).
        self.logins: dict[tuple[str, str], PendingLogin] = {}

    def verified(self, user: str, password: str) -> bool:
        """A live upstream connection was opened with exactly these credentials."""
        return any(
            pool.user == user
            and pool.password == password
            and any(conn.is_usable for conn in pool.connections)
            for pool in self._pools.values()
        )

    def login(self, login: Login) -> PendingLogin:
        """The check of a login by the broker, shared with the clients already waiting."""
        pending = self.logins.get((login.user, login.password))
        if pending is None:
            pending = self.logins[login.user, login.password] = PendingLogin(self, login)
        pending.holders += 1
        return pending

    def get(self, credentials: Credentials) -> Pool:
        pool = self._pools.get(credentials)
        if pool is None:
            pool = self._pools[credentials] = Pool(self, credentials)
        return pool

    def forget_if_unused(self, pool: Pool) -> None:
        """Drop a pool that serves nobody (e.g. after a failed login) so pools cannot pile up."""
        unused = not pool.connections and not pool.clients and pool._opening is None
        if unused and self._pools.get(pool.credentials) is pool:
            del self._pools[pool.credentials]

    def __iter__(self) -> Iterator[Pool]:
        return iter(list(self._pools.values()))

    def __len__(self) -> int:
        return len(self._pools)

    def connections(self) -> Iterator[UpstreamConnection]:
        for pool in self:
            yield from list(pool.connections)

    def close_idle(self, idle_timeout: float) -> None:
        now = time.monotonic()
        for pool in self:
            pool.close_idle(now, idle_timeout, self.max_lifetime)
