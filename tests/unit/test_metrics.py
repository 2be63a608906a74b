"""Metrics across processes: real forked workers export, die and are archived; the master's
scrape must add up exactly, never go backwards, and the directory must not grow with respawns.

Worker metrics are only ever created in forked children, as in the proxy: creating them here
would switch this test process's prometheus-client into multiprocess mode.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from amqproxy_mp.metrics import (
    AUTH_FAILURE_CODES,
    CLIENT_DISCONNECT_REASONS,
    CONNECT_BUCKETS,
    UPSTREAM_ERROR_REASONS,
    Gauges,
    Stats,
    WorkerMetrics,
)
from amqproxy_mp.metrics_master import (
    MasterMetrics,
    WorkerInfo,
    archive_dead_process,
    prepare_directory,
    read_pool_status,
    write_pool_status,
)

FORK = multiprocessing.get_context("fork")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

COUNTERS = {
    "published": "amqproxy_messages_published_total",
    "delivered": "amqproxy_messages_delivered_total",
    "client_bytes_in": "amqproxy_client_bytes_received_total",
    "client_bytes_out": "amqproxy_client_bytes_sent_total",
    "upstream_bytes_in": "amqproxy_upstream_bytes_received_total",
    "upstream_bytes_out": "amqproxy_upstream_bytes_sent_total",
}
GAUGES = {
    "client_connections": "amqproxy_client_connections",
    "upstream_connections": "amqproxy_upstream_connections",
    "client_channels": "amqproxy_client_channels",
    "upstream_channels": "amqproxy_upstream_channels",
}
LABELLED = {
    "upstream_errors": ("amqproxy_upstream_errors_total", "reason"),
    "auth_failures": ("amqproxy_auth_failures_total", "code"),
    "client_disconnects": ("amqproxy_client_disconnects_total", "reason"),
}


@dataclass
class Activity:
    """What one simulated worker does, derived from a number so that every worker differs."""

    counts: dict[str, int]
    labelled: dict[str, dict[str, int]]
    gauges: Gauges
    connect_seconds: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, n: int) -> Activity:
        return cls(
            counts={name: (i + 1) * (n + 1) * 7 + n for i, name in enumerate(COUNTERS)},
            labelled={
                "upstream_errors": {"tls": n, "refused": 1, f"odd_reason_{n % 2}": 2},
                "auth_failures": {"403": n % 3, "530": 1},
                "client_disconnects": {"client_close": n + 1, "heartbeat": n % 2},
            },
            gauges=Gauges(n + 1, n % 4, 2 * n + 3, n + 5),
            # 1 to 3 connects, from sub-millisecond to beyond the last bucket
            connect_seconds=[0.0004 * (n + 1) ** 3 + 0.1 * i for i in range(n % 3 + 1)],
        )


def run_worker(directory: str, slot: int, n: int, hold: Connection | None) -> None:
    """A worker's metric life: export in several steps (deltas), then exit or wait to be told."""
    metrics = WorkerMetrics(directory, slot)
    activity = Activity.of(n)
    stats = Stats()
    gauges = Gauges()
    metrics.export(stats, gauges)  # nothing yet
    # Half of everything first, then the rest: only the deltas may reach prometheus.
    for fraction in (0.5, 1.0):
        for name, total in activity.counts.items():
            setattr(stats, name, int(total * fraction))
        for name, by_label in activity.labelled.items():
            counter = getattr(stats, name)
            for label, total in by_label.items():
                counter[label] = int(total * fraction)
        half = len(activity.connect_seconds) // 2
        if fraction < 1:
            stats.upstream_connect_seconds.extend(activity.connect_seconds[:half])
        else:
            stats.upstream_connect_seconds.extend(activity.connect_seconds[half:])
        metrics.export(stats, gauges)
        assert stats.upstream_connect_seconds == [], "export must clear the observations"
    metrics.export(stats, activity.gauges)
    metrics.export(stats, activity.gauges)  # unchanged: no double counting
    write_pool_status(
        directory,
        os.getpid(),
        [{"worker": slot, "pid": os.getpid(), "user": "guest", "vhost": f"/v{n}", "clients": n}],
    )
    if hold is not None:
        hold.send("ready")
        hold.recv()


@contextmanager
def live_worker(directory: str, slot: int, n: int) -> Iterator[int]:
    """A worker that has exported and stays alive until the block ends; yields its pid."""
    parent, child = FORK.Pipe()
    process = FORK.Process(target=run_worker, args=(directory, slot, n, child))
    process.start()
    try:
        deadline = time.monotonic() + 30
        while not parent.poll(0.05):
            assert process.is_alive(), f"worker failed before it was ready: {process.exitcode}"
            assert time.monotonic() < deadline, "worker did not report ready"
        assert parent.recv() == "ready"
        assert process.pid is not None
        yield process.pid
    finally:
        with suppress(OSError):
            parent.send("exit")
        process.join(30)
    assert process.exitcode == 0


def dead_worker(directory: str, slot: int, n: int) -> int:
    """A worker that exported and exited (not yet archived); returns its pid."""
    process = FORK.Process(target=run_worker, args=(directory, slot, n, None))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert process.pid is not None
    return process.pid


def scrape(
    directory: str,
    workers: Iterable[WorkerInfo] = (),
    restarts: Mapping[str, int] | None = None,
    upstream: str = "amqp://broker:5672",
) -> Samples:
    text = MasterMetrics(directory, "1.2.3", upstream).render(list(workers), restarts or {})
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def assert_totals(samples: Samples, ns: list[int]) -> None:
    """Counters and the histogram equal the sum of the activities of workers `ns`."""
    activities = [Activity.of(n) for n in ns]
    for attr, name in COUNTERS.items():
        assert get(samples, name) == sum(a.counts[attr] for a in activities), name
    for attr, (name, label) in LABELLED.items():
        expected: dict[str, int] = {}
        for a in activities:
            for value, count in a.labelled[attr].items():
                expected[value] = expected.get(value, 0) + count
        for value, count in expected.items():
            assert get(samples, name, **{label: value}) == count, (name, value)
    observed = [s for a in activities for s in a.connect_seconds]
    hist = "amqproxy_upstream_connect_seconds"
    assert get(samples, hist + "_count") == len(observed)
    total = get(samples, hist + "_sum")
    assert total is not None and math.isclose(total, sum(observed), rel_tol=1e-9)
    for bound in CONNECT_BUCKETS:
        le = str(float(bound))
        assert get(samples, hist + "_bucket", le=le) == sum(1 for s in observed if s <= bound)
    assert get(samples, hist + "_bucket", le="+Inf") == len(observed)


def assert_gauges(samples: Samples, ns: list[int]) -> None:
    """Gauges are the sum over the live workers `ns` (absent when there is none)."""
    for attr, name in GAUGES.items():
        expected = sum(getattr(Activity.of(n).gauges, attr) for n in ns) if ns else None
        assert get(samples, name) == expected, name


@pytest.fixture
def directory(tmp_path: Path) -> str:
    path = str(tmp_path / "metrics")
    prepare_directory(path)
    return path


def test_counters_add_up_over_live_and_dead_workers_across_respawns(directory: str) -> None:
    LIVE = 100
    with live_worker(directory, 1, LIVE) as live_pid:
        samples = scrape(directory)
        assert_totals(samples, [LIVE])
        assert_gauges(samples, [LIVE])
        dead: list[int] = []
        previous = samples
        for n in range(20):  # slot 2 crashes and is respawned, again and again
            pid = dead_worker(directory, 2, n)
            dead.append(n)
            before = scrape(directory)
            assert_totals(before, [LIVE, *dead])
            assert_gauges(before, [LIVE, n])  # not reaped yet: its files are still there

            archive_dead_process(directory, pid)
            after = scrape(directory)
            assert_totals(after, [LIVE, *dead])  # archiving changes no counter
            assert_gauges(after, [LIVE])  # the dead worker's gauges are gone
            for key, value in previous.items():
                if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                    assert after[key] >= value, f"{key} went backwards"
            previous = after
            files = set(os.listdir(directory))
            assert files == {
                f"counter_{live_pid}.db",
                f"histogram_{live_pid}.db",
                f"gauge_livesum_{live_pid}.db",
                f"pools-{live_pid}.json",
                "counter_archive.db",
                "histogram_archive.db",
            }
    archive_dead_process(directory, live_pid)
    samples = scrape(directory)
    assert_totals(samples, [LIVE, *dead])
    assert_gauges(samples, [])
    assert set(os.listdir(directory)) == {"counter_archive.db", "histogram_archive.db"}


def test_several_live_workers_sum(directory: str) -> None:
    with live_worker(directory, 1, 3), live_worker(directory, 2, 4), live_worker(directory, 3, 5):
        samples = scrape(directory)
        assert_totals(samples, [3, 4, 5])
        assert_gauges(samples, [3, 4, 5])
        # Gauges are summed (livesum), not reported per pid.
        assert all(("pid", str(os.getpid())) not in key[1] for key in samples)
        assert not any(dict(key[1]).get("pid") for key in samples if key[0] in GAUGES.values())


def test_known_label_values_start_at_zero(directory: str) -> None:
    with live_worker(directory, 1, 0):
        samples = scrape(directory)
    for reason in UPSTREAM_ERROR_REASONS:
        assert get(samples, "amqproxy_upstream_errors_total", reason=reason) is not None
    for code in AUTH_FAILURE_CODES:
        assert get(samples, "amqproxy_auth_failures_total", code=code) is not None
    for reason in CLIENT_DISCONNECT_REASONS:
        assert get(samples, "amqproxy_client_disconnects_total", reason=reason) is not None
    assert get(samples, "amqproxy_upstream_errors_total", reason="timeout") == 0


def replace_stats_then_export(directory: str) -> None:
    metrics = WorkerMetrics(directory, 1)
    stats = Stats()
    stats.published = 10
    stats.upstream_errors["tls"] = 4
    metrics.export(stats, Gauges())
    # A new Stats object (smaller numbers): what it holds is new, not negative.
    stats = Stats()
    stats.published = 3
    stats.upstream_errors["tls"] = 1
    metrics.export(stats, Gauges(client_connections=7))
    metrics.export(stats, Gauges(client_connections=2))  # gauges are set, not added


def exported_by_a_worker(directory: str, export: Callable[[str], None]) -> Samples:
    """What /metrics shows once `export` has run in a process of its own (a worker)."""
    process = FORK.Process(target=export, args=(directory,))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    return scrape(directory)


def test_replaced_stats_count_as_new_and_gauges_are_set(directory: str) -> None:
    samples = exported_by_a_worker(directory, replace_stats_then_export)
    assert get(samples, "amqproxy_messages_published_total") == 13
    assert get(samples, "amqproxy_upstream_errors_total", reason="tls") == 5
    assert get(samples, "amqproxy_client_connections") == 2


def export_a_node_that_goes(directory: str) -> None:
    metrics = WorkerMetrics(directory, 1)
    stats = Stats()
    here = {"amqp://svc:5672 (10.0.0.1)": (True, 2, 5), "amqp://svc:5672 (10.0.0.2)": (True, 1, 1)}
    metrics.export(stats, Gauges(nodes=here))
    del here["amqp://svc:5672 (10.0.0.2)"]  # its address left the name's answer
    metrics.export(stats, Gauges(nodes=here))


def test_a_node_that_is_gone_reads_zero_not_its_last_values(directory: str) -> None:
    samples = exported_by_a_worker(directory, export_a_node_that_goes)
    for node, expected in [
        ("amqp://svc:5672 (10.0.0.1)", (1, 2, 5)),
        ("amqp://svc:5672 (10.0.0.2)", (0, 0, 0)),
    ]:
        got = tuple(
            get(samples, name, node=node)
            for name in (
                "amqproxy_upstream_node_up",
                "amqproxy_upstream_node_connections",
                "amqproxy_upstream_node_channels",
            )
        )
        assert got == expected, (node, got)


def test_a_worker_killed_while_creating_its_files(directory: str) -> None:
    """prometheus-client creates a file empty and only then sizes it: a worker killed between
    the two (a crash loop, CI seed of 2026-11-27) leaves a file too short to hold a header.
    Scrapes skip it while the worker is listed, and reaping drops it; neither fails."""
    with live_worker(directory, 1, 3):
        gone = dead_worker(directory, 2, 4)
        archive_dead_process(directory, gone)
        torn = 999_999_991
        Path(directory, f"counter_{torn}.db").write_bytes(b"")
        Path(directory, f"histogram_{torn}.db").write_bytes(b"\x08\x00")
        Path(directory, f"gauge_livesum_{torn}.db").write_bytes(b"")
        assert_totals(scrape(directory), [3, 4])
        archive_dead_process(directory, torn)
        samples = scrape(directory)
        assert_totals(samples, [3, 4])
        assert_gauges(samples, [3])
        assert not [name for name in os.listdir(directory) if str(torn) in name]


def test_archive_touches_only_that_pid(directory: str) -> None:
    with live_worker(directory, 1, 1) as pid:
        files = set(os.listdir(directory))
        archive_dead_process(directory, int(str(pid)[1:] or "0"))  # a pid that is a suffix
        archive_dead_process(directory, pid + 1)
        assert set(os.listdir(directory)) == files
        assert_gauges(scrape(directory), [1])


def test_master_metrics(directory: str) -> None:
    gone = dead_worker(directory, 2, 0)
    archive_dead_process(directory, gone)
    files = set(os.listdir(directory))
    me = os.getpid()
    samples = scrape(
        directory,
        [WorkerInfo(1, me), WorkerInfo(2, gone)],  # the second one vanished
        {"crashed": 3, "timeout": 1},
        upstream="amqps://user:secret@broker.example:5671/%2f",
    )
    assert set(os.listdir(directory)) == files, "the master must not create value files"
    identity = [key for key in samples if key[0] == "amqproxy_identity_info"]
    assert len(identity) == 1
    assert dict(identity[0][1]) == {
        "version": "1.2.3",
        "upstream": "amqps://broker.example:5671/%2f",
    }
    assert samples[identity[0]] == 1
    assert get(samples, "amqproxy_workers") == 2
    assert get(samples, "amqproxy_worker_restarts_total", reason="crashed") == 3
    assert get(samples, "amqproxy_worker_restarts_total", reason="timeout") == 1
    rss = get(samples, "amqproxy_worker_resident_memory_bytes", worker="1", pid=str(me))
    assert rss is not None and rss > 1_000_000
    cpu = get(samples, "amqproxy_worker_cpu_seconds_total", worker="1", pid=str(me))
    assert cpu is not None and cpu > 0
    assert not [key for key in samples if ("pid", str(gone)) in key[1]]
    assert_totals(samples, [0])  # the archive of the dead worker is still served


def test_master_renders_an_empty_directory(directory: str) -> None:
    samples = scrape(directory)
    assert get(samples, "amqproxy_workers") == 0
    assert get(samples, "amqproxy_messages_published_total") is None
    assert os.listdir(directory) == []


def test_prepare_directory(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "b"
    prepare_directory(str(fresh))
    assert fresh.is_dir()
    stale = ["counter_123.db", "gauge_livesum_123.db", "counter_archive.db", "pools-123.json"]
    stale += ["pools-9.json.tmp", "histogram_archive.db.tmp"]
    for name in [*stale, "README.txt"]:
        (fresh / name).write_bytes(b"x")
    (fresh / "sub.db").mkdir()
    prepare_directory(str(fresh))
    assert sorted(os.listdir(fresh)) == ["README.txt", "sub.db"]


def test_pool_status(directory: str) -> None:
    entries = [
        {"worker": 1, "pid": 11, "user": "guest", "vhost": "/", "upstream_connections": 1},
        {"worker": 1, "pid": 11, "user": "app", "vhost": "prod", "channels_in_use": 3},
    ]
    write_pool_status(directory, 11, entries)
    write_pool_status(directory, 12, [{"worker": 2, "pid": 12, "user": "x", "vhost": "/"}])
    write_pool_status(directory, 12, [{"worker": 2, "pid": 12, "user": "y", "vhost": "/"}])
    assert read_pool_status(directory, [11, 12]) == [
        *entries,
        {"worker": 2, "pid": 12, "user": "y", "vhost": "/"},
    ]
    assert read_pool_status(directory, [12]) == [
        {"worker": 2, "pid": 12, "user": "y", "vhost": "/"}
    ]
    # missing, corrupt, and wrongly shaped files are skipped
    Path(directory, "pools-13.json").write_text('[{"worker": 3')
    Path(directory, "pools-14.json").write_text(json.dumps({"not": "a list"}))
    Path(directory, "pools-15.json").write_text(json.dumps([1, {"worker": 5}]))
    assert read_pool_status(directory, [99, 13, 14, 15]) == [{"worker": 5}]
    assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]
    # a reaped worker's status goes with its metrics
    Path(directory, "pools-11.json.tmp").write_text("[")
    archive_dead_process(directory, 11)
    assert read_pool_status(directory, [11, 12]) == [
        {"worker": 2, "pid": 12, "user": "y", "vhost": "/"}
    ]
    assert sorted(os.listdir(directory)) == [
        "pools-12.json",
        "pools-13.json",
        "pools-14.json",
        "pools-15.json",
    ]


def test_pool_status_from_workers(directory: str) -> None:
    with live_worker(directory, 1, 6) as a, live_worker(directory, 2, 7) as b:
        entries = read_pool_status(directory, [a, b])
    assert [(e["worker"], e["pid"], e["vhost"]) for e in entries] == [(1, a, "/v6"), (2, b, "/v7")]


def test_this_process_stays_out_of_multiprocess_mode() -> None:
    """The children switched their own value class; the parent (the master) keeps its own."""
    assert values.ValueClass is values.MutexValue or "PROMETHEUS_MULTIPROC_DIR" in os.environ
