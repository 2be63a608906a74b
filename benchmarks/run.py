"""amqproxy-mp benchmarks: one command prints the whole table (issue 5, "Benchmarks").

    python benchmarks/run.py                 # every scenario, medians of 3 runs (< 10 min)
    python benchmarks/run.py --quick         # shorter runs, 1 run each (< 2 min)
    python benchmarks/run.py -s php_loopback -s pub_1c_100b --profile /tmp/prof

Each scenario runs directly against RabbitMQ and through the proxy with 1 worker and with the
default worker count (one per CPU), interleaved in the same invocation (run 1 of each config,
then run 2 of each, ...), so the ratio proxy/direct compares runs made under the same load on
this shared machine. The proxy's CPU is measured with psutil on the master and its workers
(cpu_times before and after each run). Everything happens in the vhost `amqproxy-bench`,
created at the start and deleted at the end (with all its queues).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import procs
from amqpclient import Handshake

HOST = "127.0.0.1"
BROKER_PORT = 5672
USER = PASSWORD = "guest"
VHOST = "amqproxy-bench"
PUB_QUEUE = "bench.publish"
CONSUME_QUEUE = "bench.consume"
CYCLE_QUEUE = "bench.cycle"
#: Publish targets keep at most this much (drop-head): the broker still enqueues every message.
QUEUE_LIMITS = {"x-max-length": 20000, "x-max-length-bytes": 64 << 20}
PHP_SCRIPT = procs.BENCH / "php" / "cycle.php"
DEFAULT_WORKERS = os.cpu_count() or 1
STORM_CONNECTIONS = 5000

# The reference figures, measured on this kind of machine: direct / amqproxy 3.1.3.
REFERENCE = {
    "php_far": (365.0, 105.0),
    "php_loopback": (2.5, 1.5),
    "fast_cycles": (776.0, 3047.0),
    "pub_1c_100b": (56000.0, 37400.0),
    "pub_16c_100b": (58600.0, 60000.0),
    "pub_16c_64k": (12900.0, 9900.0),
    "pub_confirm": (24300.0, 20400.0),
    "consume": (23900.0, 19400.0),
}

Measurement = tuple[float, int, dict[str, Any]]  # value, messages, extra
Config = tuple[str, procs.Proxy | None, int]  # name, proxy (None: direct), port


# --- results --------------------------------------------------------------------------------


@dataclass
class Run:
    value: float
    messages: int = 0
    proxy_cpu: float | None = None  # seconds
    broker_cpu: float = 0.0
    client_cpu: float = 0.0  # the generator's (or php's) CPU seconds
    wall: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def per_100k(self, seconds: float | None) -> float | None:
        if seconds is None or not self.messages:
            return None
        return seconds / self.messages * 100_000

    @property
    def client_share(self) -> float | None:
        return self.client_cpu / self.wall * 100 if self.wall else None


@dataclass
class Stat:
    runs: list[Run]

    @property
    def value(self) -> float:
        return statistics.median(r.value for r in self.runs)

    @property
    def median_run(self) -> Run:
        return sorted(self.runs, key=lambda r: r.value)[len(self.runs) // 2]

    def median_of(self, getter: Callable[[Run], float | None]) -> float | None:
        values = [v for v in (getter(r) for r in self.runs) if v is not None]
        return statistics.median(values) if values else None

    @property
    def cpu_per_100k(self) -> float | None:
        return self.median_of(lambda r: r.per_100k(r.proxy_cpu))


@dataclass
class Row:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    target: str
    stats: dict[str, Stat] = field(default_factory=dict)  # "direct", "w1", "wN"
    verdicts: dict[str, bool | None] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def ratio(self, config: str) -> float | None:
        direct, proxy = self.stats.get("direct"), self.stats.get(config)
        if direct is None or proxy is None or not direct.value:
            return None
        return proxy.value / direct.value


# --- the bench context ----------------------------------------------------------------------


class Deferred:
    """Returned by a measured function that first prepares (fills a queue): Bench.measure
    then measures only `fn`."""

    def __init__(self, fn: Callable[[], Measurement]) -> None:
        self.fn = fn


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.runs: int = args.runs or (1 if args.quick else 3)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.login = Handshake(USER, PASSWORD, VHOST)
        self.logdir = Path(tempfile.mkdtemp(prefix="amqproxy-bench-logs-"))
        self._proxies: dict[tuple[int, tuple[str, ...]], procs.Proxy] = {}
        self._broker = _broker_process()
        self.profile_dir: Path | None = Path(args.profile) if args.profile else None
        self.code = code_version()

    @property
    def broker(self) -> psutil.Process | None:
        """RabbitMQ's beam.smp (found again after a restart by a test run)."""
        if self._broker is None or not self._broker.is_running():
            self._broker = _broker_process()
        return self._broker

    def dur(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def proxy(self, workers: int, options: tuple[str, ...] = ()) -> procs.Proxy:
        """The shared proxy with this many workers and options (the broker on loopback)."""
        key = (workers, options)
        if key not in self._proxies:
            self._proxies[key] = procs.Proxy(workers, BROKER_PORT, self.logdir, options)
        return self._proxies[key]

    def configs(self) -> list[Config]:
        p1, pn = self.proxy(1), self.proxy(DEFAULT_WORKERS)
        return [("direct", None, BROKER_PORT), ("w1", p1, p1.port), ("wN", pn, pn.port)]

    def close_proxies(self) -> None:
        for proxy in self._proxies.values():
            proxy.stop()
        self._proxies.clear()

    def close(self) -> None:
        self.close_proxies()
        with contextlib.suppress(Exception):
            self.loop.close()

    def measure(self, proxy: procs.Proxy | None, fn: Callable[[], Measurement]) -> Run:
        """Run fn and account the CPU of the proxy, the broker and the client around it. When
        fn returns a Deferred, what it did so far was preparation: the measured part is the
        Deferred's function."""
        snapshot = self._snapshot(proxy)
        result = fn()
        if isinstance(result, Deferred):
            snapshot = self._snapshot(proxy)
            result = result.fn()
        cpu0, pids0, broker0, own0, wall0 = snapshot
        value, messages, extra = result
        wall = time.perf_counter() - wall0
        client_cpu = time.process_time() + _children_cpu() - own0
        run = Run(value, messages, None, _cpu(self.broker) - broker0, client_cpu, wall, extra)
        if proxy:
            cpu1, pids1 = proxy.cpu_seconds()
            run.proxy_cpu = cpu1 - cpu0
            if pids1 != pids0:
                run.note = "a proxy process changed during the run: CPU not comparable"
        return run

    def _snapshot(
        self, proxy: procs.Proxy | None
    ) -> tuple[float, frozenset[int], float, float, float]:
        cpu, pids = proxy.cpu_seconds() if proxy else (0.0, frozenset[int]())
        own = time.process_time() + _children_cpu()
        return cpu, pids, _cpu(self.broker), own, time.perf_counter()

    def interleave(
        self, row: Row, configs: list[Config], fn: Callable[[int, procs.Proxy | None], Measurement]
    ) -> None:
        """runs x (each config once), so that every config sees the same machine load; then
        the profile run, if asked for."""
        collected: dict[str, list[Run]] = {name: [] for name, _, _ in configs}
        for i in range(self.runs):
            for name, proxy, port in configs:
                run = self.measure(proxy, lambda port=port, proxy=proxy: fn(port, proxy))
                collected[name].append(run)
                _progress(
                    f"  {row.key} run {i + 1}/{self.runs} {name}: {_fmt(run.value)} {row.unit}"
                )
        for name, runs in collected.items():
            row.stats[name] = Stat(runs)
        for name, proxy, port in configs:
            if name == "w1" and proxy is not None:
                self.profile(row.key, proxy, lambda port=port, proxy=proxy: fn(port, proxy))

    def profile(
        self, key: str, proxy: procs.Proxy, fn: Callable[[], Measurement], repeat: int = 3
    ) -> None:
        """`repeat` more runs through a 1-worker proxy with py-spy attached to its worker."""
        if self.profile_dir is None:
            return
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        (worker,) = proxy.worker_pids()
        out = self.profile_dir / f"{key}.txt"
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        profiler = procs.Profiler(worker, out, self.args.profile_rate, self.args.native)
        perf = procs.Perf(worker, out) if procs.Perf.available() else None
        runs = []
        try:
            for _ in range(repeat):
                runs.append(self.measure(proxy, fn))
        finally:
            profiler.stop()
            if perf is not None:
                perf.stop()
        cpu = sum(r.proxy_cpu or 0.0 for r in runs)
        messages = sum(r.messages for r in runs)
        meta = {
            "scenario": key,
            "code": self.code,
            "values": [r.value for r in runs],
            "messages": messages,
            "proxy_cpu_s": cpu,
            "proxy_cpu_per_100k": cpu / messages * 100_000 if messages else None,
            "wall_s": sum(r.wall for r in runs),
        }
        (self.profile_dir / f"{key}.json").write_text(json.dumps(meta, indent=1) + "\n")
        _progress(f"  profile of {key}: {out}")


def _broker_process() -> psutil.Process | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] == "beam.smp" and "rabbit" in cmdline:
                return proc
    return None


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
        return float(times.user + times.system)
    except psutil.Error:
        return 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits - 1}f}" if abs(value) >= 1 else f"{value:.{digits}f}"


def php(port: int, cycles: int, queue: str = CYCLE_QUEUE, timeout: float = 300.0) -> dict[str, Any]:
    """Run benchmarks/php/cycle.php: `cycles` php-amqp connect/channel/publish/disconnect."""
    args = [USER, PASSWORD, VHOST, queue, str(cycles)]
    result = subprocess.run(
        ["php", str(PHP_SCRIPT), HOST, str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"php cycle.php failed: {result.stdout} {result.stderr}") from None
    if "error" in out or result.returncode:
        raise RuntimeError(f"php cycle.php: {out}")
    return out


def php_measure(port: int, cycles: int) -> Measurement:
    out = php(port, cycles)
    ms = out["total_s"] / out["cycles"] * 1000
    return ms, out["cycles"], {"p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"]}


def warm(bench: Bench, configs: list[Config], php_cycles: int = 0) -> None:
    """Open the proxies' upstream connections (both workers' pools) before measuring."""
    for _, proxy, port in configs:
        if proxy is not None:
            if php_cycles:
                php(port, php_cycles)
            else:
                bench.run(loadgen.warm_up(HOST, port, bench.login))


# --- scenarios ------------------------------------------------------------------------------


def php_far(bench: Bench, policy: str) -> Row:
    """The PHP cycle with the broker 50 ms away, the proxy with the given close_policy."""
    target = "≈ 1 RTT (50 ms)" if policy == "processed" else "≤ 3 ms"
    row = Row(
        f"php_far{'_local' if policy == 'local' else ''}",
        f"php-amqp cycle, broker 50 ms away, {policy}",
        "ms/cycle",
        False,
        target,
    )
    relay = procs.Relay(BROKER_PORT, 25.0, bench.logdir)
    options = ("--close-policy", policy)
    far = [
        procs.Proxy(1, relay.port, bench.logdir, options),
        procs.Proxy(DEFAULT_WORKERS, relay.port, bench.logdir, options),
    ]
    try:
        configs: list[Config] = [
            ("direct", None, relay.port),
            ("w1", far[0], far[0].port),
            ("wN", far[1], far[1].port),
        ]
        warm(bench, configs, php_cycles=20)
        direct_cycles = int(bench.dur(6, 3))
        proxy_cycles = int(bench.dur(300, 100) if policy == "local" else bench.dur(20, 8))
        bench.interleave(
            row,
            configs,
            lambda port, proxy: php_measure(port, proxy_cycles if proxy else direct_cycles),
        )
    finally:
        for proxy in far:
            proxy.stop()
        relay.stop()
    for name in ("w1", "wN"):
        value = row.stats[name].value
        row.verdicts[name] = value <= 3.0 if policy == "local" else value <= 60.0
    _latency_details(row)
    row.details.append("relay: 25 ms each way (50 ms RTT) on data; TCP handshakes not delayed")
    return row


def scenario_php_far(bench: Bench) -> Row:
    return php_far(bench, "processed")


def scenario_php_far_local(bench: Bench) -> Row:
    return php_far(bench, "local")


def php_loopback(bench: Bench, policy: str) -> Row:
    suffix = "_local" if policy == "local" else ""
    row = Row(
        f"php_loopback{suffix}",
        f"php-amqp cycle, loopback, {policy}",
        "ms/cycle",
        False,
        "≤ 1.5 ms ≙ ≤ 0.60x direct",
    )
    options = ("--close-policy", policy)
    p1, pn = bench.proxy(1, options), bench.proxy(DEFAULT_WORKERS, options)
    configs: list[Config] = [
        ("direct", None, BROKER_PORT),
        ("w1", p1, p1.port),
        ("wN", pn, pn.port),
    ]
    warm(bench, configs, php_cycles=20)
    cycles = int(bench.dur(1000, 200))
    bench.interleave(row, configs, lambda port, proxy: php_measure(port, cycles))
    _ratio_verdicts(row, 1.5 / 2.5)
    _latency_details(row)
    return row


def scenario_php_loopback(bench: Bench) -> Row:
    return php_loopback(bench, "processed")


def scenario_php_loopback_local(bench: Bench) -> Row:
    return php_loopback(bench, "local")


def scenario_fast_cycles(bench: Bench) -> Row:
    ratio = 3000 / 776
    row = Row(
        "fast_cycles",
        "same cycle, fast client, 4 parallel",
        "cycles/s",
        True,
        f"≥ 3 000/s ≙ ≥ {ratio:.2f}x direct",
    )
    duration = bench.dur(3.0, 1.0)

    def fn(port: int, proxy: procs.Proxy | None) -> Measurement:
        out = bench.run(
            loadgen.cycles(HOST, port, bench.login, CYCLE_QUEUE, parallel=4, duration=duration)
        )
        return out["count"] / out["elapsed"], out["count"], out

    configs = bench.configs()
    warm(bench, configs)
    bench.interleave(row, configs, fn)
    _ratio_verdicts(row, ratio)
    for name, stat in row.stats.items():
        extra = stat.median_run.extra
        absolute = (
            "" if name == "direct" else f"; ≥ 3 000/s {'met' if stat.value >= 3000 else 'not met'}"
        )
        row.details.append(
            f"{name}: p50 {extra['p50_ms']:.2f} ms, p99 {extra['p99_ms']:.2f} ms per cycle"
            + absolute
        )
    return row


def _publish_row(
    bench: Bench, key: str, title: str, connections: int, body: int, ratio: float, target: str
) -> Row:
    row = Row(key, title, "msg/s", True, target)
    duration = bench.dur(3.0, 1.0)

    def fn(port: int, proxy: procs.Proxy | None) -> Measurement:
        out = bench.run(
            loadgen.publish(
                HOST,
                port,
                bench.login,
                PUB_QUEUE,
                connections=connections,
                body_size=body,
                duration=duration,
            )
        )
        return out["count"] / out["elapsed"], out["count"], out

    configs = bench.configs()
    warm(bench, configs)
    bench.interleave(row, configs, fn)
    _ratio_verdicts(row, ratio)
    _absolute_details(row)
    return row


def scenario_pub_1c_100b(bench: Bench) -> Row:
    ratio = 37000 / 56000
    target = f"≥ 37 000/s ≙ ≥ {ratio:.2f}x direct"
    return _publish_row(bench, "pub_1c_100b", "publish, 1 conn, 100 B", 1, 100, ratio, target)


def scenario_pub_16c_100b(bench: Bench) -> Row:
    title = "publish, 16 conns, 100 B"
    return _publish_row(bench, "pub_16c_100b", title, 16, 100, 0.9, "≥ 0.90x direct")


def scenario_pub_16c_64k(bench: Bench) -> Row:
    title = "publish, 16 conns, 64 KiB"
    return _publish_row(bench, "pub_16c_64k", title, 16, 65536, 0.9, "≥ 0.90x direct")


def scenario_pub_confirm(bench: Bench) -> Row:
    row = Row("pub_confirm", "publish, confirms, window 100", "msg/s", True, "≥ 0.90x direct")
    duration = bench.dur(3.0, 1.0)

    def fn(port: int, proxy: procs.Proxy | None) -> Measurement:
        out = bench.run(
            loadgen.publish_confirms(
                HOST, port, bench.login, PUB_QUEUE, body_size=100, window=100, duration=duration
            )
        )
        return out["count"] / out["elapsed"], out["count"], out

    configs = bench.configs()
    warm(bench, configs)
    bench.interleave(row, configs, fn)
    _ratio_verdicts(row, 0.9)
    _absolute_details(row)
    return row


def scenario_consume(bench: Bench) -> Row:
    row = Row("consume", "consume, prefetch 100, acks, 100 B", "msg/s", True, "≥ 0.90x direct")
    count = int(bench.dur(60000, 20000))

    def fn(port: int, proxy: procs.Proxy | None) -> Measurement:
        out = bench.run(
            loadgen.consume(HOST, port, bench.login, CONSUME_QUEUE, count=count, prefetch=100)
        )
        left = bench.run(loadgen.queue_depth(HOST, BROKER_PORT, bench.login, CONSUME_QUEUE))
        if left:  # unacked messages of a broken run: start the next one from empty
            bench.run(loadgen.delete_queue(HOST, BROKER_PORT, bench.login, CONSUME_QUEUE))
            bench.run(loadgen.declare_queue(HOST, BROKER_PORT, bench.login, CONSUME_QUEUE))
        return out["count"] / out["elapsed"], out["count"], {**out, "left": left}

    def filled(port: int, proxy: procs.Proxy | None) -> Measurement:
        # The queue is filled directly, outside the measured part.
        bench.run(loadgen.fill_queue(HOST, BROKER_PORT, bench.login, CONSUME_QUEUE, count, 100))
        return Deferred(lambda: fn(port, proxy))  # type: ignore[return-value]

    configs = bench.configs()
    warm(bench, configs)
    bench.interleave(row, configs, filled)
    _ratio_verdicts(row, 0.9)
    _absolute_details(row)
    row.details.append(f"{count} messages filled in directly before each run, then consumed")
    return row


def scenario_storm(bench: Bench) -> Row:
    n = int(bench.args.storm or STORM_CONNECTIONS)
    row = Row(
        "storm",
        f"{n} connections + channel at once",
        "s",
        False,
        "≤ 2.3 s, ≤ 16 KiB/client, RSS back",
    )
    collected: dict[str, list[Run]] = {"w1": [], "wN": []}
    for i in range(bench.runs):
        for name, workers in (("w1", 1), ("wN", DEFAULT_WORKERS)):
            proxy = procs.Proxy(workers, BROKER_PORT, bench.logdir)  # a fresh one: idle RSS
            try:
                run = _storm_once(bench, proxy, n)
            finally:
                proxy.stop()
            collected[name].append(run)
            _progress(
                f"  storm run {i + 1}/{bench.runs} {name}: {run.value:.2f} s, "
                f"{run.extra['per_client_kib']:.1f} KiB/client, after close "
                f"{run.extra['after_per_client_kib']:.1f} KiB/client, after the idle timeout "
                f"{run.extra['after_idle_per_client_kib']:.1f} KiB/client, "
                f"failed {run.extra['failed']}"
            )
    for name, runs in collected.items():
        stat = row.stats[name] = Stat(runs)
        per_client = stat.median_of(lambda r: r.extra["per_client_kib"]) or 0.0
        after = stat.median_of(lambda r: r.extra["after_per_client_kib"]) or 0.0
        after_idle = stat.median_of(lambda r: r.extra["after_idle_per_client_kib"]) or 0.0
        failed = sum(r.extra["failed"] for r in runs)
        ok_time, ok_mem = stat.value <= 2.3, per_client <= 16
        ok_after = after_idle <= 0.25 * per_client
        row.verdicts[name] = ok_time and ok_mem and ok_after and not failed
        m = stat.median_run.extra
        row.details.append(
            f"{name}: all open in {stat.value:.2f} s ({_ok(ok_time)}; half after "
            f"{m['p50_s']:.2f} s, 90 % after {m['p90_s']:.2f} s; kernel listen-queue drops "
            f"{m['listen_drops']}); RSS idle {m['idle_mib']:.1f} MiB, held {m['held_mib']:.1f} "
            f"MiB = {per_client:.1f} KiB/client ({_ok(ok_mem)}), after close {m['after_mib']:.1f} "
            f"MiB = {after:.1f} KiB/client above idle (its channels still parked), after the "
            f"idle timeout {m['after_idle_mib']:.1f} MiB = {after_idle:.1f} KiB/client above idle "
            f"({_ok(ok_after)}: ≤ 25 % of held); upstream "
            f"connections {m['upstream_connections']} (sockets {m['upstream_sockets']}, of which "
            f"the broker lists {m['broker_connections']}); "
            f"failed {failed}" + (f" {m['errors']}" if m["errors"] else "")
        )
    row.details.append(
        "direct: not run (RabbitMQ here allows 832 sockets); CPU column: s per 100k connections;"
        " a fresh proxy for each run"
    )
    return row


def _rss_once_zero(proxy: procs.Proxy, metric: str, timeout: float) -> int:
    """The proxy's RSS a second after its `metric` has fallen to 0 (or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if proxy.metrics().get(metric, 0) == 0:
            break
    time.sleep(1.0)
    return proxy.rss()


def _storm_once(bench: Bench, proxy: procs.Proxy, n: int) -> Run:
    bench.run(loadgen.warm_up(HOST, proxy.port, bench.login, 4))
    time.sleep(1.2)
    idle = proxy.rss()
    held_clients: list[Any] = []

    def fn() -> Measurement:
        drops = procs.listen_drops()
        clients, elapsed, failed, times = bench.run(
            loadgen.storm_open(HOST, proxy.port, bench.login, n, 60.0), 120
        )
        held_clients.extend(clients)
        drops = procs.listen_drops() - drops
        return elapsed, n, {"failed": failed, "listen_drops": drops, **times}

    run = bench.measure(proxy, fn)
    try:
        time.sleep(1.2)  # the workers export their gauges every second
        held = proxy.rss()
        upstream = int(proxy.metrics().get("amqproxy_upstream_connections", -1))
        ports = proxy.upstream_ports()
        at_broker = procs.broker_connections_from(ports)
    finally:
        bench.run(loadgen.storm_close(held_clients), 120)
        held_clients.clear()
    after = _rss_once_zero(proxy, "amqproxy_client_connections", 10)
    # The channels the clients parked stay pooled until the idle timeout closes them.
    after_idle = _rss_once_zero(proxy, "amqproxy_upstream_channels", 20)
    run.extra.update(
        idle_mib=idle / 2**20,
        held_mib=held / 2**20,
        after_mib=after / 2**20,
        after_idle_mib=after_idle / 2**20,
        per_client_kib=(held - idle) / n / 1024,
        after_per_client_kib=(after - idle) / n / 1024,
        after_idle_per_client_kib=(after_idle - idle) / n / 1024,
        upstream_connections=upstream,
        upstream_sockets=len(ports),
        broker_connections=at_broker,
    )
    return run


def scenario_channel_opens(bench: Bench) -> Row:
    row = Row("channel_opens", "upstream channel opens / 1 000 php cycles", "opens", False, "≤ 10")
    cycles = int(bench.dur(1000, 300))
    # A relay without delay between the proxies and RabbitMQ counts the Channel.Open frames on
    # the wire: exact, unlike the broker's node-wide counter, which other clients of this
    # shared broker (test runs) move too.
    relay = procs.Relay(BROKER_PORT, 0.0, bench.logdir, count=True)
    proxies = [
        procs.Proxy(1, relay.port, bench.logdir),
        procs.Proxy(DEFAULT_WORKERS, relay.port, bench.logdir),
    ]
    configs: list[Config] = [
        ("direct", None, relay.port),
        ("w1", proxies[0], proxies[0].port),
        ("wN", proxies[1], proxies[1].port),
    ]
    try:
        warm(bench, configs, php_cycles=10)
        time.sleep(1.2)
        for name, proxy, port in configs:
            row.stats[name] = Stat(
                [_channel_opens_once(bench, row, name, proxy, port, cycles, relay)]
            )
    finally:
        for proxy in proxies:
            proxy.stop()
        relay.stop()
    row.details.append(
        f"{cycles} php-amqp cycles per config through a counting relay (no delay) to RabbitMQ"
    )
    return row


def _channel_opens_once(
    bench: Bench,
    row: Row,
    name: str,
    proxy: procs.Proxy | None,
    port: int,
    cycles: int,
    relay: procs.Relay,
) -> Run:
    broker0 = procs.broker_channels_created()
    wire0 = relay.channel_opens()
    before = proxy.metrics() if proxy else {}
    run = bench.measure(proxy, lambda: (php(port, cycles), (0.0, cycles, {}))[1])
    time.sleep(1.2)  # the workers export their counters every second
    wire = (relay.channel_opens() - wire0) * 1000 / cycles
    broker = (procs.broker_channels_created() - broker0) * 1000 / cycles
    run.value = wire
    run.extra.update(wire=wire, broker=broker)
    if proxy is None:
        row.details.append(
            f"direct: {wire:.0f} Channel.Open on the wire, broker counter +{broker:.0f}"
        )
    else:
        after = proxy.metrics()

        def delta(metric: str) -> float:
            return (after.get(metric, 0.0) - before.get(metric, 0.0)) * 1000 / cycles

        metric = delta("amqproxy_upstream_channel_opens_total")
        reused = delta("amqproxy_channels_reused_total")
        run.extra.update(proxy_metric=metric, reused=reused)
        agree = abs(metric - wire) <= 1
        row.verdicts[name] = wire <= 10 and agree
        row.details.append(
            f"{name}: {wire:.1f} Channel.Open on the wire, proxy metric {metric:.1f} "
            f"({'agrees' if agree else 'DISAGREES'}), reused {reused:.0f}; broker's node-wide "
            f"counter +{broker:.0f} (other clients of the broker included)"
        )
    _progress(f"  channel_opens {name}: {wire:.1f} per 1 000 (broker counter {broker:.0f})")
    return run


def _ok(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _ratio_verdicts(row: Row, ratio: float) -> None:
    for name in ("w1", "wN"):
        r = row.ratio(name)
        if r is None:
            row.verdicts[name] = None
        else:
            row.verdicts[name] = r >= ratio if row.higher_is_better else r <= ratio


def _latency_details(row: Row) -> None:
    for name, stat in row.stats.items():
        extra = stat.median_run.extra
        row.details.append(
            f"{name}: p50 {extra['p50_ms']:.2f} ms, p99 {extra['p99_ms']:.2f} ms per cycle"
        )


def _absolute_details(row: Row) -> None:
    direct_ref, amqproxy_ref = REFERENCE[row.key]
    parts = [f"{name} {_fmt(row.stats[name].value)}" for name in ("w1", "wN") if name in row.stats]
    row.details.append(
        f"absolute: {', '.join(parts)} {row.unit}; the issue's amqproxy 3.1.3 figure "
        f"{_fmt(amqproxy_ref)}, its direct figure {_fmt(direct_ref)}"
    )


SCENARIOS: dict[str, Callable[[Bench], Row]] = {
    "php_far": scenario_php_far,
    "php_far_local": scenario_php_far_local,
    "php_loopback": scenario_php_loopback,
    "php_loopback_local": scenario_php_loopback_local,
    "fast_cycles": scenario_fast_cycles,
    "pub_1c_100b": scenario_pub_1c_100b,
    "pub_16c_100b": scenario_pub_16c_100b,
    "pub_16c_64k": scenario_pub_16c_64k,
    "pub_confirm": scenario_pub_confirm,
    "consume": scenario_consume,
    "storm": scenario_storm,
    "channel_opens": scenario_channel_opens,
}


# --- report ---------------------------------------------------------------------------------


def render(rows: list[Row], bench: Bench, elapsed: float) -> str:
    n = DEFAULT_WORKERS
    head = (
        f"{'scenario':<42} {'unit':<9} {'direct':>8} {'mp w=1':>8} {'x direct':>8} "
        f"{f'mp w={n}':>8} {'x direct':>8} {f'CPU s/100k w1/w{n}':>18}  {'target':<34} "
        f"{'w1':<4} {'w' + str(n):<4}"
    )
    mode = "quick" if bench.quick else "full"
    lines = [
        f"amqproxy-mp benchmarks: medians of {bench.runs} run(s), {mode} mode, "
        f"{os.cpu_count()} CPUs, proxy with 1 and {n} workers, {elapsed:.0f} s",
        f"proxy code: {bench.code}" + "".join(f", {k}={v}" for k, v in procs.PROXY_ENV.items()),
        "",
        head,
        "-" * len(head),
    ]
    for row in rows:
        lines.append(_table_line(row))
    lines += ["", "Details (median run of each config):"]
    for row in rows:
        lines.append(f"  {row.title}")
        lines += [f"    {detail}" for detail in row.details]
        for name, stat in row.stats.items():
            runs = ", ".join(_fmt(r.value) for r in stat.runs)
            broker = _fmt(stat.median_of(lambda r: r.per_100k(r.broker_cpu)))
            client = _fmt(stat.median_of(lambda r: r.client_share))
            notes = "; ".join({r.note for r in stat.runs if r.note})
            lines.append(
                f"    {name}: runs [{runs}]; CPU s per 100k: proxy {_fmt(stat.cpu_per_100k)}, "
                f"broker {broker}; client CPU {client} % of a core"
                + (f"; {notes}" if notes else "")
            )
    proof = [row for row in rows if row.key in REFERENCE and "direct" in row.stats]
    if proof:
        lines += [
            "",
            "Load generator check: its direct figures vs the issue's direct reference, and its"
            " own CPU (a generator using well under a core is not what limits a run)",
        ]
        for row in proof:
            ref = REFERENCE[row.key][0]
            got = row.stats["direct"].value
            ok = got >= ref * 0.95 if row.higher_is_better else got <= ref * 1.05
            share = row.stats["direct"].median_of(lambda r: r.client_share)
            verdict = "as fast" if ok else "slower"
            if not ok and share is not None and share < 50:
                verdict += " (the broker limits it, not the generator)"
            lines.append(
                f"  {row.title:<42} {_fmt(got):>8} vs {_fmt(ref):>8} {row.unit:<9} "
                f"{verdict}; client CPU {_fmt(share)} % of a core"
            )
    return "\n".join(lines)


def _table_line(row: Row) -> str:
    def cell(name: str) -> str:
        stat = row.stats.get(name)
        return _fmt(stat.value) if stat else "—"

    def ratio(name: str) -> str:
        r = row.ratio(name)
        if r is None:
            return "—"
        return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"

    def verdict(name: str) -> str:
        v = row.verdicts.get(name)
        return "—" if v is None else "PASS" if v else "MISS"

    cpu = "/".join(
        _fmt(row.stats[name].cpu_per_100k) if name in row.stats else "—" for name in ("w1", "wN")
    )
    return (
        f"{row.title:<42} {row.unit:<9} {cell('direct'):>8} {cell('w1'):>8} {ratio('w1'):>8} "
        f"{cell('wN'):>8} {ratio('wN'):>8} {cpu:>18}  {row.target:<34} "
        f"{verdict('w1'):<4} {verdict('wN'):<4}"
    )


def _as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {
            "key": row.key,
            "title": row.title,
            "unit": row.unit,
            "target": row.target,
            "verdicts": row.verdicts,
            "details": row.details,
            "configs": {
                name: {
                    "median": stat.value,
                    "ratio": row.ratio(name),
                    "proxy_cpu_per_100k": stat.cpu_per_100k,
                    "runs": [
                        {
                            "value": r.value,
                            "messages": r.messages,
                            "proxy_cpu": r.proxy_cpu,
                            "broker_cpu": r.broker_cpu,
                            "client_cpu": r.client_cpu,
                            "wall": r.wall,
                            "extra": r.extra,
                        }
                        for r in stat.runs
                    ],
                }
                for name, stat in row.stats.items()
            },
        }
        for row in rows
    ]


def prepare_broker(bench: Bench, timeout: float = 90.0) -> None:
    """Wait for the broker and (re)declare the queues: test runs on this shared machine may
    restart RabbitMQ, which loses the (non-durable) queues."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for queue, arguments in (
                (PUB_QUEUE, QUEUE_LIMITS),
                (CYCLE_QUEUE, QUEUE_LIMITS),
                (CONSUME_QUEUE, None),
            ):
                bench.run(loadgen.declare_queue(HOST, BROKER_PORT, bench.login, queue, arguments))
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker is not usable: {exc!r}") from exc
            if "vhost" in str(exc):
                with contextlib.suppress(Exception):
                    procs.ensure_vhost(VHOST, USER)
            time.sleep(2)


def run_scenario(bench: Bench, key: str) -> Row:
    """One scenario; tried again if it fails (e.g. a test run on this shared machine restarted
    the broker)."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        _progress(f"{key} ..." if attempt == 1 else f"{key}: attempt {attempt}")
        try:
            prepare_broker(bench)
            return SCENARIOS[key](bench)
        except Exception as exc:
            _progress(f"  {key} failed: {exc!r}")
            error = exc
            bench.close_proxies()
    row = Row(key, key, "", False, "")
    row.details.append(f"FAILED {attempts} times: {error!r}")
    return row


def code_version() -> str:
    """Which proxy code was measured: the commit, and a digest of amqproxy_mp/*.py when the
    work tree differs from it (others may be changing it between runs)."""
    import hashlib

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=procs.REPO, capture_output=True, text=True, timeout=10
        )
        return result.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    digest = hashlib.sha256()
    for path in sorted((procs.REPO / "amqproxy_mp").rglob("*.py")):
        digest.update(path.read_bytes())
    dirty = git("status", "--porcelain", "--", "amqproxy_mp")
    return commit + (
        f" + uncommitted changes (amqproxy_mp digest {digest.hexdigest()[:10]})" if dirty else ""
    )


def _raise_nofile() -> int:
    """The storm needs ~2 descriptors per connection here and in the proxy (which inherits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(hard, 65536), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
    return soft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="amqproxy-mp benchmark table (issue 5)")
    parser.add_argument(
        "-s", "--scenario", action="append", choices=list(SCENARIOS), help="only these (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="short runs, 1 run each (< 2 min)")
    parser.add_argument("--runs", type=int, help="runs per config (default 3, quick 1)")
    parser.add_argument("--storm", type=int, help=f"storm connections ({STORM_CONNECTIONS})")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after each selected scenario, 3 more runs through the 1-worker proxy with py-spy "
        "recording its worker (collapsed stacks in DIR; see profile_report.py)",
    )
    parser.add_argument("--profile-rate", type=int, default=1000, help="py-spy samples per s")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the proxies' environment only (repeatable), e.g. PYTHONMALLOC=malloc",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    for item in args.proxy_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--proxy-env {item!r}: expected NAME=VALUE")
        procs.PROXY_ENV[name] = value
    nofile = _raise_nofile()
    if nofile < 2 * STORM_CONNECTIONS + 1000:
        _progress(f"warning: RLIMIT_NOFILE is {nofile}; the storm may fail")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.perf_counter()
    rows: list[Row] = []
    bench: Bench | None = None
    try:
        procs.ensure_vhost(VHOST, USER)
        bench = Bench(args)
        for key in args.scenario or list(SCENARIOS):
            rows.append(run_scenario(bench, key))
        print(render(rows, bench, time.perf_counter() - started))
        if args.json:
            Path(args.json).write_text(json.dumps(_as_json(rows), indent=1) + "\n")
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    finally:
        if bench is not None:
            bench.close()
        procs.stop_all()
        procs.delete_vhost(VHOST)
        if bench is not None:
            if any(not row.stats for row in rows):
                _progress(f"proxy and relay logs kept in {bench.logdir}")
            else:
                shutil.rmtree(bench.logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
