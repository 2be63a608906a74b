"""A worker: one uvloop event loop that accepts clients and owns its upstream pools.

It holds no module-level state, so a master process can create several; the
listening socket can be handed in (SO_REUSEPORT, opened by the master) or bound here.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

import uvloop

from amqproxy_mp import __version__
from amqproxy_mp.amqp import spec
from amqproxy_mp.config import Config
from amqproxy_mp.logs import reopen_log_file
from amqproxy_mp.metrics import Disconnect, Gauges, Stats, WorkerMetrics
from amqproxy_mp.metrics_master import write_pool_status
from amqproxy_mp.proxy.client import ClientSession
from amqproxy_mp.proxy.context import build_context
from amqproxy_mp.proxy.nodes import NodeState
from amqproxy_mp.tls import listener_tls_context, upstream_tls_context

log = logging.getLogger(__name__)

#: How often heartbeats, handshake deadlines and idle connections are checked.
TICK: Final = 0.5
#: Accept queue of the listening sockets; the kernel caps it at net.core.somaxconn. A
#: connection storm (thousands of PHP workers after a deploy) must queue, not be dropped.
LISTEN_BACKLOG: Final = 65535
#: Fewer clients and upstream channels than at the peak by this many: give freed memory back
#: (see _give_memory_back).
TRIM_AFTER_DROP: Final = 1000


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where there is one."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()

#: Metrics and pool status go to the master every this many ticks.
METRICS_EVERY: Final = 2


class Worker:
    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        tls_sockets: Sequence[socket.socket] = (),
        slot: int = 0,
        beat_fd: int | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.tls_sockets = tls_sockets
        self.slot = slot
        self._beat_fd = beat_fd
        self._master_pid = os.getppid()
        self.stats = Stats()
        self._metrics = WorkerMetrics(metrics_dir, slot) if metrics_dir else None
        self._metrics_dir = metrics_dir
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self.ctx = build_context(config, self.loop, self.stats, upstream_tls_context(config))
        self._servers: list[asyncio.Server] = []
        self._stopping: asyncio.Event | None = None
        self._signals = 0
        self._quick = False
        self._peak_load = 0
        self._retiring = False

    # --- running ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until TERM/INT, then shut down gracefully; returns the exit code."""
        asyncio.set_event_loop(self.loop)
        try:
            return self.loop.run_until_complete(self.serve())
        finally:
            self.loop.close()

    async def serve(self) -> int:
        self._stopping = asyncio.Event()
        try:
            await self._listen()
        except OSError as exc:
            log.error(
                "cannot listen on %s:%s: %s",
                self.config.listen_address,
                self.config.listen_port,
                exc.strerror or exc,
            )
            return 1
        for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT):
            self.loop.add_signal_handler(signum, self._on_signal, signum)
        self.loop.add_signal_handler(signal.SIGUSR1, reopen_log_file)
        self._beat()  # the first beat tells the master this worker accepts
        ticker = self.loop.create_task(self._tick())
        await self._stopping.wait()
        if not self._quick:
            # the ticker goes on while clients drain: beats to the master (or it would kill a
            # long drain), heartbeats on both hops, metrics
            await self.shutdown()
        ticker.cancel()
        self.ctx.pools.nodes.close()
        self._export_metrics()
        return 0

    async def _listen(self) -> None:
        def factory() -> ClientSession:
            return ClientSession(self.ctx)

        # create_server listens again: without the backlog it would shrink the master's to 100
        for sock in self.sockets:
            self._servers.append(
                await self.loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
            )
        if self.tls_sockets:
            context = listener_tls_context(self.config)
            for sock in self.tls_sockets:
                self._servers.append(
                    await self.loop.create_server(
                        factory,
                        sock=sock,
                        backlog=LISTEN_BACKLOG,
                        ssl=context,
                        ssl_handshake_timeout=self.config.client_handshake_timeout,
                    )
                )
        addresses = ", ".join(
            str(sock.getsockname()[:2]) for server in self._servers for sock in server.sockets
        )
        log.info(
            "amqproxy-mp %s listening on %s, upstream %s",
            __version__,
            addresses,
            self.config.upstream,
        )

    def _on_signal(self, signum: int) -> None:
        """TERM: graceful stop; USR2: retire (the same, replaced by a new worker).
        INT, QUIT, or a second TERM: close everything now."""
        self._signals += 1
        assert self._stopping is not None
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGUSR2) and self._signals == 1:
            self._retiring = signum == signal.SIGUSR2
            log.info("received %s: %s", name, "retiring" if self._retiring else "shutting down")
        else:
            log.info("received %s: closing all connections now", name)
            self._quick = True
            for server in self._servers:
                server.close()
            for session in list(self.ctx.sessions):
                session.abort()
            for conn in self.ctx.pools.connections():
                conn.drop(f"received {name}: closing all connections now")
        self._stopping.set()

    async def _tick(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(TICK)
            ticks += 1
            try:
                self._tick_once(ticks)
            except Exception:
                # a bug here must not silently stop heartbeats, timeouts and metrics
                log.exception("internal error in the worker's periodic checks")

    def _tick_once(self, ticks: int) -> None:
        self._beat()
        now = time.monotonic()
        for session in list(self.ctx.sessions):
            session.check_heartbeat(now)
        for conn in self.ctx.pools.connections():
            if not conn.send_heartbeat_if_due(now):
                conn.missed_heartbeats()
        self.ctx.pools.close_idle()
        self.ctx.pools.nodes.tick(self.loop, now)
        if ticks % METRICS_EVERY == 0:
            self._export_metrics()
        self._give_memory_back()

    def _give_memory_back(self) -> None:
        """After a connection storm has passed, hand the freed memory back to the system: the
        allocator keeps it otherwise, and the worker's RSS would stay at its peak. Twice: when
        the clients have left, and when the idle timeout has closed the channels they parked."""
        load = len(self.ctx.sessions) + sum(len(c.channels) for c in self.ctx.pools.connections())
        self._peak_load = max(self._peak_load, load)
        if self._peak_load - load < TRIM_AFTER_DROP:
            return
        self._peak_load = load
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _beat(self) -> None:
        """Tell the master this event loop still turns (gunicorn's worker heartbeat). A master
        that is gone (killed with SIGKILL, so it could not stop us) makes the worker stop
        gracefully: an orphan would keep the port from the master's replacement."""
        if self._beat_fd is None:
            return
        try:
            os.write(self._beat_fd, b".")
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self._master_gone()
            return
        if os.getppid() != self._master_pid:
            self._master_gone()

    def _master_gone(self) -> None:
        assert self._stopping is not None
        if not self._stopping.is_set():
            log.error("the master process is gone: stopping this worker gracefully")
            self._beat_fd = None
            self._stopping.set()

    def _export_metrics(self) -> None:
        if self._metrics is None or self._metrics_dir is None:
            return
        pools = list(self.ctx.pools)
        connections = [conn for pool in pools for conn in pool.connections]
        up = {node.name for node in self.ctx.pools.nodes if node.state is NodeState.UP}
        node_connections: Counter[str] = Counter(conn.node.name for conn in connections)
        node_channels: Counter[str] = Counter()
        for conn in connections:
            node_channels[conn.node.name] += len(conn.channels)
        names = {node.name for node in self.ctx.pools.nodes} | set(node_connections)
        self._metrics.export(
            self.stats,
            Gauges(
                client_connections=len(self.ctx.sessions),
                upstream_connections=len(connections),
                client_channels=sum(len(session.channels) for session in self.ctx.sessions),
                upstream_channels=sum(len(conn.channels) for conn in connections),
                unconfirmed=self.ctx.pools.unconfirmed.count,
                nodes={
                    name: (name in up, node_connections[name], node_channels[name])
                    for name in names
                },
            ),
        )
        write_pool_status(
            self._metrics_dir,
            os.getpid(),
            [
                {
                    "worker": self.slot,
                    "pid": os.getpid(),
                    "user": pool.user,
                    "vhost": pool.vhost,
                    "upstream_connections": len(pool.connections),
                    "nodes": sorted(conn.node.name for conn in pool.connections),
                    "channels_in_use": sum(len(conn.channels) for conn in pool.connections),
                    "clients": pool.clients,
                    "unconfirmed_messages": sum(
                        len(link.confirms)
                        for conn in pool.connections
                        for link in conn.channels.values()
                        if link.confirms is not None
                    ),
                }
                for pool in pools
            ],
        )

    # --- shutting down ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, let clients leave, then close the rest with 320 CONNECTION_FORCED.

        A worker retired by a reload (SIGUSR2) gives its clients at least
        retire_client_close_timeout: its replacement already accepts, and short-lived clients
        (connect, publish, disconnect) should finish rather than fail."""
        config = self.config
        for server in self._servers:
            server.close()
        grace = config.term_client_close_timeout
        if self._retiring:
            grace = max(grace, config.retire_client_close_timeout)
        if self.ctx.sessions and grace > 0:
            log.info(
                "waiting up to %g s for %d clients to disconnect", grace, len(self.ctx.sessions)
            )
            await self._wait_until(lambda: not self.ctx.sessions, grace)
        if self.ctx.sessions:
            log.info("closing %d remaining client connections", len(self.ctx.sessions))
            for session in list(self.ctx.sessions):
                session.close_with(
                    spec.CONNECTION_FORCED,
                    "CONNECTION_FORCED - amqproxy-mp is shutting down",
                    close_ok_timeout=None,
                    kind=Disconnect.SHUTDOWN,
                )
            timeout = config.term_timeout if config.term_timeout >= 0 else None
            await self._wait_until(lambda: not self.ctx.sessions, timeout)
            for session in list(self.ctx.sessions):
                session.abort()
        unconfirmed = self.ctx.pools.unconfirmed
        if unconfirmed.count or self.ctx.pools.tasks:
            log.info("waiting up to 5 s for the broker to confirm %d messages", unconfirmed.count)
            await self._wait_until(lambda: not unconfirmed.count, 5.0)
        self.ctx.pools.closing = True
        if unconfirmed.count:
            log.error(
                "shutting down with %d messages the broker has not confirmed: they may be lost",
                unconfirmed.count,
            )
        upstreams = list(self.ctx.pools.connections())
        for conn in upstreams:
            conn.close("amqproxy-mp is shutting down")
        await self._wait_until(lambda: all(conn.closed for conn in upstreams), 5.0)
        log.info("shut down")

    async def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done() and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
