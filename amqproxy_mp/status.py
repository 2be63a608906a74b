"""What the master reports: /healthz, /metrics and /pools, and what feeds them.

`Status` owns the metrics directory the workers export to (PROMETHEUS_MULTIPROC_DIR), the HTTP
server of the three pages and a probe that tries a TCP connection to the broker every few
seconds (workers only connect when clients come, and an operator wants to know before they do).
The pages only read what the master hands them; the /healthz verdict is `amqproxy_mp.health`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Final

from amqproxy_mp import __version__
from amqproxy_mp.config import Config
from amqproxy_mp.health import HealthState, verdict
from amqproxy_mp.http import Response, Route, start_http_server
from amqproxy_mp.metrics_master import (
    MasterMetrics,
    WorkerInfo,
    prepare_directory,
    read_pool_status,
)

log = logging.getLogger(__name__)

#: How often the probe checks that the broker accepts TCP connections.
UPSTREAM_CHECK_INTERVAL: Final = 2.0


class UpstreamProbe:
    """Connects to each broker node every UPSTREAM_CHECK_INTERVAL; logs when a node starts or
    stops failing. `errors` holds why the last try of each failing node failed."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config  # (the running configuration: a reload may change the timeout)
        self.errors: dict[str, str] = {}

    @property
    def nodes(self) -> list[str]:
        return [node.url for node in self._config().upstream.nodes]

    @property
    def error(self) -> str:
        """Why the broker is unreachable: "" while any node answers."""
        nodes = self.nodes
        if any(node not in self.errors for node in nodes):
            return ""
        if len(nodes) == 1:
            return self.errors[nodes[0]]
        return "; ".join(f"{node}: {self.errors[node]}" for node in nodes)

    @property
    def down(self) -> tuple[str, ...]:
        """The nodes that do not answer, with why, while some other node does."""
        if self.error:
            return ()
        return tuple(f"{node} ({error})" for node, error in self.errors.items())

    async def run(self) -> None:
        while True:
            timeout = self._config().upstream_connect_timeout
            nodes = self._config().upstream.nodes
            current = {node.url for node in nodes}  # (a reload may have removed some)
            self.errors = {url: e for url, e in self.errors.items() if url in current}
            results = await asyncio.gather(
                *(self._check(node.host, node.port, timeout) for node in nodes)
            )
            for node, error in zip(nodes, results, strict=True):
                before = self.errors.get(node.url, "")
                if error and error != before:
                    log.error("upstream %s unreachable: %s", node.url, error)
                elif before and not error:
                    log.info("upstream %s reachable again", node.url)
                if error:
                    self.errors[node.url] = error
                else:
                    self.errors.pop(node.url, None)
            await asyncio.sleep(UPSTREAM_CHECK_INTERVAL)

    @staticmethod
    async def _check(host: str, port: int, timeout: float) -> str:
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return ""
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except OSError as exc:
            return exc.strerror or str(exc)


class Status:
    """The master's pages. `health`, `workers` and `reload_error` are asked on every request;
    `restarts` is the master's live counter of worker restarts by reason."""

    def __init__(
        self,
        config: Callable[[], Config],
        health: Callable[[], HealthState],
        workers: Callable[[], list[WorkerInfo]],
        restarts: Mapping[str, int],
        reload_error: Callable[[], str],
    ) -> None:
        self._config = config
        self._health = health
        self._workers = workers
        self._restarts = restarts
        self._reload_error = reload_error
        self.probe = UpstreamProbe(config)
        self.metrics_dir = ""
        self._own_metrics_dir = False
        self._metrics: MasterMetrics | None = None
        self._server: asyncio.Server | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # --- the metrics directory (before the workers start, and after they are all gone) -------

    def open_metrics_dir(self) -> None:
        """$PROMETHEUS_MULTIPROC_DIR, emptied of a previous run's files, or a private temporary
        directory, put in the environment the workers inherit."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        if not directory:
            directory = tempfile.mkdtemp(prefix="amqproxy-metrics-")
            self._own_metrics_dir = True
        prepare_directory(directory)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        self.metrics_dir = directory
        self._metrics = MasterMetrics(directory, __version__, str(self._config().upstream))

    def remove_metrics_dir(self) -> None:
        """Remove the directory if it is the private one."""
        if self._own_metrics_dir:
            with contextlib.suppress(OSError):
                prepare_directory(self.metrics_dir)
                os.rmdir(self.metrics_dir)

    # --- the HTTP server and the probe ------------------------------------------------------

    async def start(self) -> bool:
        """Serve the pages and start the probe; False (logged) if the HTTP port is unusable."""
        config = self._config()
        routes: dict[str, Route] = {
            "/healthz": self._healthz,
            "/metrics": self._metrics_page,
            "/pools": self._pools,
        }
        try:
            self._server = await start_http_server(config.http_address, config.http_port, routes)
        except OSError as exc:
            log.error(
                "cannot serve HTTP on %s port %s: %s",
                config.http_address,
                config.http_port,
                exc.strerror or exc,
            )
            return False
        self._probe_task = asyncio.get_running_loop().create_task(self.probe.run())
        return True

    def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._server is not None:
            self._server.close()

    def _healthz(self) -> Response:
        ok, text = verdict(self._health())
        return (200 if ok else 503), "text/plain; charset=utf-8", (text + "\n").encode()

    def _metrics_page(self) -> Response:
        assert self._metrics is not None
        body = self._metrics.render(self._workers(), self._restarts, not self._reload_error())
        return 200, "text/plain; version=0.0.4; charset=utf-8", body

    def _pools(self) -> Response:
        entries = read_pool_status(self.metrics_dir, [w.pid for w in self._workers()])
        return 200, "application/json", json.dumps(entries, indent=1).encode()
