"""Connection.Open's pool: looked up in the step that uses it. (A pool got before the step
that opens a connection on it could be forgotten in between, as unused, when its last client
left; the connection opened on it then belonged to no pool: no heartbeats, never closed,
missing from /pools, and the next client opened a second one.)"""

from __future__ import annotations

import asyncio
import socket

from amqproxy_mp.config import Config, Upstream
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.client import ClientSession
from amqproxy_mp.proxy.client_connection import Phase
from amqproxy_mp.proxy.context import ProxyContext, build_context
from amqproxy_mp.proxy.pool import Pool


def registered_pool(ctx: ProxyContext, credentials: tuple[str, str, str]) -> Pool | None:
    return next((pool for pool in ctx.pools if pool.credentials == credentials), None)


def test_open_uses_the_pool_registered_when_its_step_runs() -> None:
    loop = asyncio.new_event_loop()
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    try:
        # a broker that never answers: the attempt stays under way while we look
        port = silent.getsockname()[1]
        config = Config(Upstream("amqp", "127.0.0.1", port), upstream_connect_timeout=5.0)
        ctx = build_context(config, loop, Stats(), None)
        credentials = ("guest", "guest", "/")
        leaving = ctx.pools.get(credentials)
        leaving.clients = 1  # a client of a pool whose connection just ended, being closed

        session = ClientSession(ctx)
        session.user, session._password, session.vhost = credentials
        session.phase = Phase.OPENING
        session._open()  # no usable connection: the Open waits for one, in a task

        leaving.clients -= 1  # that client's socket closes before the task runs
        ctx.pools.forget_if_unused(leaving)
        assert registered_pool(ctx, credentials) is None

        loop.run_until_complete(asyncio.sleep(0.05))  # the task opens a connection
        registered = registered_pool(ctx, credentials)
        assert registered is not None, "the connection is being opened on a forgotten pool"
        assert registered._opening is not None
        assert leaving._opening is None
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        silent.close()
