"""Opening an upstream connection: the nodes tried in turn within the client's budget, the
handshake, and the error a failed attempt raises, counted and logged (what the client is told
is its text).

A refusal of the client's login or vhost is the client's answer, and says nothing about the
node; any other failure marks the node down (nodes.py) and the next node is tried at once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from functools import partial

from amqproxy_mp.amqp import spec
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.login import Login, UpstreamError, UpstreamSettings
from amqproxy_mp.proxy.nodes import Node, Nodes, attempts
from amqproxy_mp.proxy.sides import PoolSide
from amqproxy_mp.proxy.upstream import UpstreamConnection

log = logging.getLogger(__name__)

#: Refusals that are the client's answer (its login, its vhost), not a node's failure.
CLIENTS_ANSWER = (spec.ACCESS_REFUSED, spec.NOT_ALLOWED)


class NodeFailed(Exception):
    """One node could not be used: the attempt goes on with the next one."""

    def __init__(self, kind: str, reason: str, error: UpstreamError | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        #: The broker's own Connection.Close, when that is how it failed.
        self.error = error


async def open_upstream(
    loop: asyncio.AbstractEventLoop,
    settings: UpstreamSettings,
    nodes: Nodes,
    stats: Stats,
    login: Login,
    pool: PoolSide | None,
    budget: float | None = None,
) -> UpstreamConnection:
    """Connect and run the handshake within the connect timeout (or what is left of it:
    `budget`), trying the nodes in turn, or raise UpstreamError: through Connection.OpenOk
    for `pool`'s vhost, or, without a pool, only until the broker has accepted the login
    (its Tune); `complete_upstream` then opens a vhost on it."""
    started = time.monotonic()
    vhost = pool.vhost if pool is not None else None
    failures: list[tuple[Node, NodeFailed]] = []
    #: What a timeout's message names (the time left may be a little less).
    nominal = nodes.node_timeout if nodes.several else settings.connect_timeout
    budget = settings.connect_timeout if budget is None else budget
    await nodes.resolved(loop, budget)
    budget -= time.monotonic() - started
    for node, timeout in attempts(nodes, budget):
        conn: UpstreamConnection | None = None
        node.attempting += 1
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    partial(UpstreamConnection, loop, settings, node, nodes, stats, login, pool),
                    node.address,
                    node.url.port,
                    ssl=node.ssl_context,
                    server_hostname=node.server_hostname,
                )
                await (conn.tuned if pool is None else conn.ready)
        except BaseException as exc:
            cut_short = timeout < nominal - 0.05  # the client's budget, not the node's time
            failure = _failure(round(timeout, 1) if cut_short else nominal, stats, exc, conn)
            if not isinstance(failure, NodeFailed):
                raise failure from None
            if not (cut_short and failure.kind == "timeout"):
                nodes.failed(node, failure.reason)
            failures.append((node, failure))
            continue
        finally:
            node.attempting -= 1
        conn.joined_node()
        if pool is not None:
            _opened(conn, started)
        return conn
    raise _no_node(settings, login.user, vhost, failures)


async def complete_upstream(conn: UpstreamConnection, pool: PoolSide) -> UpstreamConnection:
    """Open `pool`'s vhost on a connection whose login the broker accepted."""
    started = time.monotonic()
    timeout = min(conn.settings.connect_timeout, conn.nodes.node_timeout)
    try:
        async with asyncio.timeout(timeout):
            conn.open_vhost(pool)
            await conn.ready
    except BaseException as exc:
        failure = _failure(timeout, conn.stats, exc, conn)
        if isinstance(failure, NodeFailed):
            conn.nodes.failed(conn.node, failure.reason)
            failure = _no_node(conn.settings, pool.user, pool.vhost, [(conn.node, failure)])
        raise failure from None
    _opened(conn, started)
    return conn


def _opened(conn: UpstreamConnection, started: float) -> None:
    elapsed = time.monotonic() - started
    conn.stats.upstream_connect_seconds.append(elapsed)
    conn.stats.node_connect_seconds.append((conn.node.name, elapsed))
    log.info(
        "upstream connection opened to %s (local port %s, %.1f ms)",
        conn.name,
        conn.local_port,
        elapsed * 1000,
    )


def _failure(
    timeout: float, stats: Stats, exc: BaseException, conn: UpstreamConnection | None
) -> BaseException:
    """What one attempt's failure is: the broker's answer to the client (an UpstreamError
    with its code), a node that failed (NodeFailed), or a cancellation (the client left)."""
    if conn is not None and not isinstance(exc, UpstreamError):
        conn.abort()
    if isinstance(exc, UpstreamError):
        if exc.code in CLIENTS_ANSWER:
            stats.upstream_errors["refused"] += 1
            return exc
        failure = NodeFailed("closed_by_broker", f"closed the connection: {exc.text}", exc)
    elif isinstance(exc, TimeoutError):
        failure = NodeFailed("timeout", f"did not answer within {timeout:g} s")
    elif isinstance(exc, ssl.SSLCertVerificationError):
        failure = NodeFailed("tls", f"certificate verification failed: {exc.verify_message}")
    elif isinstance(exc, ssl.SSLError):
        failure = NodeFailed("tls", f"TLS handshake failed: {exc.reason or exc}")
    elif isinstance(exc, OSError):
        failure = NodeFailed("unreachable", f"unreachable: {exc.strerror or exc}")
    else:
        return exc  # cancelled (the client left), or a bug
    stats.upstream_errors[failure.kind] += 1
    return failure


def _no_node(
    settings: UpstreamSettings,
    user: str,
    vhost: str | None,
    failures: list[tuple[Node, NodeFailed]],
) -> UpstreamError:
    """No node could be used: the error the client gets, counted and logged."""
    who = f"user={user!r}" if vhost is None else f"user={user!r} vhost={vhost!r}"
    if len(failures) == 1:
        node, failure = failures[0]
        if failure.error is not None:  # the broker's own words, as they came
            return failure.error
        log.error("upstream %s for %s: %s", node.name, who, failure.reason)
        return UpstreamError(
            spec.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream {node.name} {failure.reason}"
        )
    tried = "; ".join(f"{node.name} {failure.reason}" for node, failure in failures)
    reason = tried or f"none answered within {settings.connect_timeout:g} s"
    log.error("no upstream node for %s: %s", who, reason)
    return UpstreamError(spec.CONNECTION_FORCED, f"CONNECTION_FORCED - no upstream node: {reason}")
