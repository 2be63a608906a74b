"""Metrics shared between the worker processes and the master that serves them.

The data path counts in plain integers (`Stats`, `Gauges`); a worker hands the deltas to
prometheus-client's multiprocess mode about once a second (`WorkerMetrics.export`), so no frame
ever pays for a metric call. Each worker writes its own mmap files in the metrics directory; the
master aggregates them on scrape (`MasterMetrics.render`) and folds the files of a dead worker
into archive files (`archive_dead_process`), so counters never go backwards when workers are
replaced and the directory does not grow with respawns.

Pool status (the `/pools` page) travels the same way: one small JSON file per worker pid.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import psutil  # type: ignore[import-untyped,unused-ignore]
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

#: Content type of `MasterMetrics.render`'s output (the classic Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Upstream connect latency buckets: a loopback broker answers in ~1 ms, a distant TLS one in
#: hundreds of ms, a struggling one up to the connect timeout.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Label values created at zero from the start, so `rate()` and alerts see a series before the
#: first event. Other values still work; they appear when they first happen.
UPSTREAM_ERROR_REASONS = (
    "refused",
    "unreachable",
    "timeout",
    "tls",
    "lost",
    "closed_by_broker",
    "heartbeat",
)
AUTH_FAILURE_CODES = ("403", "530")


class Disconnect(enum.StrEnum):
    """Why a client connection ended: the `reason` label of the disconnect metric."""

    CLIENT_CLOSE = "client_close"
    SOCKET_CLOSED = "socket_closed"
    PROTOCOL_ERROR = "protocol_error"
    UPSTREAM_CLOSED = "upstream_closed"
    AUTH_FAILED = "auth_failed"
    HEARTBEAT = "heartbeat"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    SLOW_CLIENT = "slow_client"
    CONNECTION_LIMIT = "connection_limit"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"


CLIENT_DISCONNECT_REASONS = tuple(reason.value for reason in Disconnect)

_ARCHIVE = "archive"
_POOLS_PREFIX = "pools-"


# --- what the data path counts -------------------------------------------------------------


class Stats:
    """Plain counters the data path bumps (never a prometheus call per frame).

    All counts only grow; `WorkerMetrics.export` turns them into deltas.
    """

    __slots__ = (
        "auth_failures",
        "channels_reused",
        "client_bytes_in",
        "client_bytes_out",
        "client_disconnects",
        "delivered",
        "failovers",
        "node_connect_seconds",
        "node_state_changes",
        "published",
        "upstream_bytes_in",
        "upstream_bytes_out",
        "upstream_channel_opens",
        "upstream_connect_seconds",
        "upstream_errors",
    )

    def __init__(self) -> None:
        #: complete messages forwarded client -> broker
        self.published = 0
        #: Basic.Deliver / Basic.GetOk forwarded broker -> client
        self.delivered = 0
        #: Channel.Open sent to the broker
        self.upstream_channel_opens = 0
        #: client channels served by a parked upstream channel (no Channel.Open upstream)
        self.channels_reused = 0
        self.client_bytes_in = 0
        self.client_bytes_out = 0
        self.upstream_bytes_in = 0
        self.upstream_bytes_out = 0
        #: one entry per successful upstream connect (TCP + TLS + AMQP handshake); export clears it
        self.upstream_connect_seconds: list[float] = []
        #: by reason, see UPSTREAM_ERROR_REASONS
        self.upstream_errors: collections.Counter[str] = collections.Counter()
        #: by reply code as text: "403", "530"
        self.auth_failures: collections.Counter[str] = collections.Counter()
        #: by reason, see CLIENT_DISCONNECT_REASONS
        self.client_disconnects: collections.Counter[str] = collections.Counter()
        #: (node, seconds) per successful upstream connect; export clears it
        self.node_connect_seconds: list[tuple[str, float]] = []
        #: upstream nodes this worker saw go down while up (new connections go elsewhere)
        self.failovers = 0
        #: by node: changes of its state (up, down)
        self.node_state_changes: collections.Counter[str] = collections.Counter()


@dataclass
class Gauges:
    """Current sizes, sampled by the worker when it exports."""

    client_connections: int = 0
    upstream_connections: int = 0
    client_channels: int = 0
    upstream_channels: int = 0
    #: per upstream node: (up, this worker's connections to it, their channels)
    nodes: dict[str, tuple[bool, int, int]] = field(default_factory=dict)


# --- worker side ---------------------------------------------------------------------------


class _Delta:
    """Remembers what was last exported so a counter is increased by the difference only."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def take(self, value: int) -> int:
        # A smaller value means the Stats object was replaced: everything in it is new.
        delta = value - self.last if value >= self.last else value
        self.last = value
        return delta


class _LabelledDelta:
    """`_Delta` per label value of one labelled counter."""

    __slots__ = ("counter", "last")

    def __init__(self, counter: Counter, preset: Iterable[str]) -> None:
        self.counter = counter
        self.last: dict[str, int] = {}
        for label in preset:
            counter.labels(label)  # creates the zero series

    def export(self, counts: Mapping[str, int]) -> None:
        last = self.last
        for label, value in counts.items():
            previous = last.get(label, 0)
            delta = value - previous if value >= previous else value
            if delta:
                self.counter.labels(label).inc(delta)
            last[label] = value


#: The plain counters of Stats and the Prometheus counter each one feeds.
PLAIN_COUNTERS: Final = (
    ("published", "amqproxy_messages_published",
     "Complete messages forwarded from clients to the broker"),
    ("delivered", "amqproxy_messages_delivered",
     "Messages (Basic.Deliver, Basic.GetOk) forwarded from the broker to clients"),
    ("upstream_channel_opens", "amqproxy_upstream_channel_opens",
     "Channel.Open sent to the broker"),
    ("channels_reused", "amqproxy_channels_reused",
     "Client channels served by a parked upstream channel, without a Channel.Open"),
    ("client_bytes_in", "amqproxy_client_bytes_received", "Bytes received from clients"),
    ("client_bytes_out", "amqproxy_client_bytes_sent", "Bytes sent to clients"),
    ("upstream_bytes_in", "amqproxy_upstream_bytes_received", "Bytes received from the broker"),
    ("upstream_bytes_out", "amqproxy_upstream_bytes_sent", "Bytes sent to the broker"),
    ("failovers", "amqproxy_upstream_failovers",
     "Upstream nodes seen to go down while up: new connections went to the other nodes"),
)  # fmt: skip


class WorkerMetrics:
    """A worker's prometheus-client metrics, written to per-pid mmap files in `directory`.

    Create one per worker process, after the fork: the value class (and so the files) is bound to
    the pid at construction. Metrics use no registry, so the process keeps no global state besides
    prometheus-client's value class.
    """

    def __init__(self, directory: str, worker: int) -> None:
        self.directory = directory
        self.worker = worker
        # MmapedValue reads the directory from the environment when it opens its files, and
        # prometheus-client picked its ValueClass at import time (in the master, maybe without
        # the variable): set both here, in the worker, before creating any metric.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, registry=None, multiprocess_mode="livesum")

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, labels, registry=None)

        self.client_connections = gauge("amqproxy_client_connections", "Client connections")
        self.upstream_connections = gauge(
            "amqproxy_upstream_connections", "Upstream (broker) connections"
        )
        self.client_channels = gauge("amqproxy_client_channels", "Channels opened by clients")
        self.upstream_channels = gauge(
            "amqproxy_upstream_channels", "Channels open on upstream connections"
        )
        #: (Stats field, its counter, what has been exported of it)
        self._plain = tuple(
            (field, counter(name, documentation), _Delta())
            for field, name, documentation in PLAIN_COUNTERS
        )
        self.upstream_errors = counter(
            "amqproxy_upstream_errors",
            "Upstream connections that failed to open or were lost, by reason",
            ("reason",),
        )
        self.auth_failures = counter(
            "amqproxy_auth_failures",
            "Client logins the broker refused, by AMQP reply code",
            ("code",),
        )
        self.client_disconnects = counter(
            "amqproxy_client_disconnects", "Client connections ended, by reason", ("reason",)
        )
        self.upstream_connect_seconds = Histogram(
            "amqproxy_upstream_connect_seconds",
            "Time to open an upstream connection (TCP, TLS and AMQP handshake)",
            buckets=CONNECT_BUCKETS,
            registry=None,
        )
        self.node_connect_seconds = Histogram(
            "amqproxy_upstream_node_connect_seconds",
            "Time to open an upstream connection, by node",
            ("node",),
            buckets=CONNECT_BUCKETS,
            registry=None,
        )
        self.node_state_changes = counter(
            "amqproxy_upstream_node_state_changes",
            "Upstream nodes going down or coming back, by node",
            ("node",),
        )
        self.node_up = Gauge(
            "amqproxy_upstream_node_up",
            "1 while an upstream node is up (as any worker sees it), by node",
            ("node",),
            registry=None,
            multiprocess_mode="max",
        )
        self.node_connections = Gauge(
            "amqproxy_upstream_node_connections",
            "Upstream connections, by node",
            ("node",),
            registry=None,
            multiprocess_mode="livesum",
        )
        self.node_channels = Gauge(
            "amqproxy_upstream_node_channels",
            "Channels open on upstream connections, by node",
            ("node",),
            registry=None,
            multiprocess_mode="livesum",
        )
        self._node_changes = _LabelledDelta(self.node_state_changes, ())
        self._errors = _LabelledDelta(self.upstream_errors, UPSTREAM_ERROR_REASONS)
        self._auth = _LabelledDelta(self.auth_failures, AUTH_FAILURE_CODES)
        self._disconnects = _LabelledDelta(self.client_disconnects, CLIENT_DISCONNECT_REASONS)

    def export(self, stats: Stats, gauges: Gauges) -> None:
        """Publish what changed since the last call (the worker calls this every 0.5-1 s)."""
        for name, counter, delta in self._plain:
            amount = delta.take(getattr(stats, name))
            if amount:
                counter.inc(amount)
        self._errors.export(stats.upstream_errors)
        self._auth.export(stats.auth_failures)
        self._disconnects.export(stats.client_disconnects)
        if stats.upstream_connect_seconds:
            for seconds in stats.upstream_connect_seconds:
                self.upstream_connect_seconds.observe(seconds)
            stats.upstream_connect_seconds.clear()
        self.client_connections.set(gauges.client_connections)
        self.upstream_connections.set(gauges.upstream_connections)
        self.client_channels.set(gauges.client_channels)
        self.upstream_channels.set(gauges.upstream_channels)
        self._node_changes.export(stats.node_state_changes)
        for node, seconds in stats.node_connect_seconds:
            self.node_connect_seconds.labels(node).observe(seconds)
        stats.node_connect_seconds.clear()
        for node, (up, connections, channels) in gauges.nodes.items():
            self.node_up.labels(node).set(1 if up else 0)
            self.node_connections.labels(node).set(connections)
            self.node_channels.labels(node).set(channels)


# --- the metrics directory -----------------------------------------------------------------


def _is_ours(name: str) -> bool:
    """Files this module or prometheus-client write (the directory may be shared by mistake)."""
    return name.endswith((".db", ".db.tmp")) or (
        name.startswith(_POOLS_PREFIX) and name.endswith((".json", ".json.tmp"))
    )


def prepare_directory(directory: str) -> None:
    """Create the directory, or empty it of a previous run's files (the master, at start).

    Stale files would add a previous run's counters and gauges to this one's.
    Only metrics and pool status files are removed, never anything else found there.
    """
    os.makedirs(directory, exist_ok=True)
    with os.scandir(directory) as entries:
        for entry in entries:
            if _is_ours(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _read_mmap(path: str) -> Iterator[tuple[str, float]]:
    """(key, value) of every entry of a prometheus-client mmap file."""
    entries = MmapedDict.read_all_values_from_file(path)  # type: ignore[no-untyped-call]
    for key, value, _timestamp, _pos in entries:
        yield key, value


def _fold_into_archive(directory: str, prefix: str, path: str) -> None:
    """Add every value of `path` to `<prefix>_archive.db`, replacing that file atomically."""
    archive = os.path.join(directory, f"{prefix}_{_ARCHIVE}.db")
    totals: dict[str, float] = {}
    if os.path.exists(archive):
        for key, value in _read_mmap(archive):
            totals[key] = totals.get(key, 0.0) + value
    try:
        dead = list(_read_mmap(path))
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("cannot read metrics file %s of a dead worker, dropping it: %s", path, exc)
        return
    for key, value in dead:
        totals[key] = totals.get(key, 0.0) + value
    # The temporary name does not end in .db: a scrape never reads a half-written archive.
    tmp = archive + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    mmap = MmapedDict(tmp)  # type: ignore[no-untyped-call]
    try:
        for key, value in totals.items():
            mmap.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        mmap.close()  # type: ignore[no-untyped-call]
    os.replace(tmp, archive)


def archive_dead_process(directory: str, pid: int) -> None:
    """Fold a reaped worker's counters and histograms into the archive, then delete its files.

    Counters keep their totals across worker respawns, its live gauges disappear (the worker's
    connections are gone), and the directory holds files of live workers plus one archive per
    metric type, however often workers are replaced. Call it from the thread that renders, never
    concurrently with `MasterMetrics.render`, and only once `pid` has exited.
    """
    suffix = f"_{pid}.db"
    for path in sorted(glob.glob(os.path.join(directory, f"*{suffix}"))):
        name = os.path.basename(path)
        prefix = name[: -len(suffix)]
        if not prefix.startswith("gauge_"):
            # counter, histogram, summary: values only grow, so the sum over pids is the total.
            # Gauges of any mode are dropped with the process (this module uses only livesum).
            _fold_into_archive(directory, prefix, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for leftover in (_pool_status_path(directory, pid), _pool_status_path(directory, pid) + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)


# --- master side ---------------------------------------------------------------------------


@dataclass
class WorkerInfo:
    """A live worker as the master knows it: its slot number (1..N) and current pid."""

    slot: int
    pid: int


def _without_credentials(url: str) -> str:
    """An upstream URL as a label value: never leak a password into /metrics."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host))


class _MasterCollector:
    """Metrics only the master knows; metric families, so no multiprocess value file is made."""

    def __init__(
        self,
        version: str,
        upstream: str,
        workers: list[WorkerInfo],
        restarts: Mapping[str, int],
        reload_ok: bool,
    ) -> None:
        self.version = version
        self.upstream = upstream
        self.workers = workers
        self.restarts = restarts
        self.reload_ok = reload_ok

    def collect(self) -> Iterable[Metric]:
        identity = GaugeMetricFamily(
            "amqproxy_identity_info",
            "amqproxy-mp version and upstream",
            labels=["version", "upstream"],
        )
        identity.add_metric([self.version, self.upstream], 1)
        yield identity
        yield GaugeMetricFamily("amqproxy_workers", "Worker processes running", len(self.workers))
        yield GaugeMetricFamily(
            "amqproxy_config_last_reload_successful",
            "0 when the last reload (HUP) failed and the previous configuration still runs",
            float(self.reload_ok),
        )
        restarts = CounterMetricFamily(
            "amqproxy_worker_restarts", "Worker processes replaced, by reason", labels=["reason"]
        )
        for reason, count in sorted(self.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
        rss = GaugeMetricFamily(
            "amqproxy_worker_resident_memory_bytes",
            "Resident memory of each worker process",
            labels=["worker", "pid"],
        )
        cpu = CounterMetricFamily(
            "amqproxy_worker_cpu_seconds",
            "User and system CPU time of each worker process",
            labels=["worker", "pid"],
        )
        for worker in sorted(self.workers, key=lambda w: w.slot):
            try:
                process = psutil.Process(worker.pid)
                with process.oneshot():
                    memory = process.memory_info().rss
                    times = process.cpu_times()
            except psutil.Error:  # exited (or not ours) since the master last looked
                continue
            labels = [str(worker.slot), str(worker.pid)]
            rss.add_metric(labels, float(memory))
            cpu.add_metric(labels, float(times.user + times.system))
        yield rss
        yield cpu


class MasterMetrics:
    """Serves the aggregate of all workers' files plus the master's own process-level metrics."""

    def __init__(self, directory: str, version: str, upstream: str) -> None:
        self.directory = directory
        self.version = version
        self.upstream = _without_credentials(upstream)

    def render(
        self, workers: list[WorkerInfo], restarts: Mapping[str, int], reload_ok: bool = True
    ) -> bytes:
        """Prometheus text format (content type `CONTENT_TYPE`), read fresh on every scrape."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        collector = _MasterCollector(self.version, self.upstream, workers, restarts, reload_ok)
        registry.register(collector)
        return generate_latest(registry)


# --- pool status ---------------------------------------------------------------------------


def _pool_status_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{_POOLS_PREFIX}{pid}.json")


def write_pool_status(directory: str, pid: int, pools: list[dict[str, object]]) -> None:
    """Replace the worker's pool status file atomically, so the master never reads half of it."""
    path = _pool_status_path(directory, pid)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(pools, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_pool_status(directory: str, pids: Iterable[int]) -> list[dict[str, object]]:
    """The entries of the given (live) workers, in pid order given; bad or missing files skipped.

    A worker that has just started has not written its file yet, and one that was killed may
    have left anything: neither must break the /pools page.
    """
    entries: list[dict[str, object]] = []
    for pid in pids:
        try:
            with open(_pool_status_path(directory, pid), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("skipping the pool status of worker pid %d: %s", pid, exc)
            continue
        if not isinstance(data, list):
            log.warning("skipping the pool status of worker pid %d: not a JSON list", pid)
            continue
        entries.extend(entry for entry in data if isinstance(entry, dict))
    return entries
