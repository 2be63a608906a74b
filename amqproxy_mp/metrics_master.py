"""The master's side of the metrics, and the directory the workers export to.

Each worker writes its own mmap files (metrics.py) and pool status file in the metrics
directory; the master aggregates them on scrape (`MasterMetrics.render`) and folds the files of
a dead worker into archive files (`archive_dead_process`), so counters never go backwards when
workers are replaced and the directory does not grow with respawns.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psutil  # type: ignore[import-untyped,unused-ignore]
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

#: Content type of `MasterMetrics.render`'s output (the classic Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_ARCHIVE = "archive"
_POOLS_PREFIX = "pools-"


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


#: Bytes before a prometheus-client mmap file's first entry (the used-size word and padding).
_MMAP_HEADER = 8


def _sized(path: str) -> bool:
    """Whether the file holds at least a header.

    prometheus-client creates its file empty and sizes it a moment later: a worker killed in
    between leaves a file that its reader cannot parse (struct.error) and that holds nothing.
    """
    try:
        return os.stat(path).st_size >= _MMAP_HEADER
    except FileNotFoundError:
        return False


def _read_mmap(path: str) -> Iterator[tuple[str, float]]:
    """(key, value) of every entry of a prometheus-client mmap file; none if it is unsized."""
    if not _sized(path):
        return
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
    except (OSError, RuntimeError, ValueError, struct.error) as exc:
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


class _WorkerFilesCollector:
    """prometheus-client's multiprocess aggregate of the directory, without unsized files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        files = [p for p in glob.glob(os.path.join(self.directory, "*.db")) if _sized(p)]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


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
        registry.register(_WorkerFilesCollector(self.directory))
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
