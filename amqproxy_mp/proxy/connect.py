"""Opening an upstream connection: the handshake within the connect timeout, and the error
a failed attempt raises, counted and logged (what the client is told is its text)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from amqproxy_mp.amqp import spec
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.login import Login, UpstreamError, UpstreamSettings
from amqproxy_mp.proxy.sides import PoolSide
from amqproxy_mp.proxy.upstream import UpstreamConnection

log = logging.getLogger(__name__)


async def open_upstream(
    loop: asyncio.AbstractEventLoop,
    settings: UpstreamSettings,
    stats: Stats,
    login: Login,
    pool: PoolSide | None,
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


async def complete_upstream(conn: UpstreamConnection, pool: PoolSide) -> UpstreamConnection:
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
        refused = exc.code in (spec.ACCESS_REFUSED, spec.NOT_ALLOWED)
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
        spec.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream {settings.address} {reason}"
    )
