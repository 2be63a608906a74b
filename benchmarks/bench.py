"""The benchmarks' measuring machinery: where everything runs (broker, vhost, queues), the
reference figures, the results (Run, Stat, Row and its verdicts), and Bench, which starts the
proxies, runs each measurement on every config in turn and accounts the CPU of the proxy, the
broker and the client around it (and profiles with py-spy when asked)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs
import psutil
import uvloop
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
#: The second proxy config: one worker per CPU (the proxy's own default is one per two).
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
        self._proxies: dict[tuple[int, tuple[str, ...], Path], procs.Proxy] = {}
        self._broker = _broker_process()
        self.profile_dir: Path | None = Path(args.profile) if args.profile else None
        self.code = code_version()
        #: `--baseline REF`: that release's code, checked out beside this one (run.py measures
        #: it as a fourth config, "w1 REF", 1 worker, so that before and after share one run;
        #: confirms.py as its "before").
        self.baseline: tuple[str, Path] | None = None
        if getattr(args, "baseline", None):
            worktree = Path(tempfile.mkdtemp(prefix="amqproxy-baseline-"))
            add = ["git", "worktree", "add", "--detach", "-f", str(worktree), args.baseline]
            subprocess.run(add, cwd=procs.REPO, check=True, capture_output=True)
            self.baseline = (args.baseline, worktree)

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

    def proxy(
        self, workers: int, options: tuple[str, ...] = (), repo: Path = procs.REPO
    ) -> procs.Proxy:
        """The shared proxy with this many workers and options (the broker on loopback)."""
        key = (workers, options, repo)
        if key not in self._proxies:
            self._proxies[key] = procs.Proxy(workers, BROKER_PORT, self.logdir, options, repo=repo)
        return self._proxies[key]

    def configs(self) -> list[Config]:
        p1, pn = self.proxy(1), self.proxy(DEFAULT_WORKERS)
        configs: list[Config] = [
            ("direct", None, BROKER_PORT),
            ("w1", p1, p1.port),
            ("wN", pn, pn.port),
        ]
        if self.baseline:
            ref, worktree = self.baseline
            base = self.proxy(1, repo=worktree)
            configs.append((f"w1 {ref}", base, base.port))
        return configs

    def close_proxies(self) -> None:
        for proxy in self._proxies.values():
            proxy.stop()
        self._proxies.clear()

    def close(self) -> None:
        self.close_proxies()
        if self.baseline:
            worktree = self.baseline[1]
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)],
                           cwd=procs.REPO, capture_output=True)  # fmt: skip
            shutil.rmtree(worktree, ignore_errors=True)
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
                progress(f"  {row.key} run {i + 1}/{self.runs} {name}: {fmt(run.value)} {row.unit}")
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
        progress(f"  profile of {key}: {out}")


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


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits - 1}f}" if abs(value) >= 1 else f"{value:.{digits}f}"


# --- verdicts and details of a row ----------------------------------------------------------


def ratio_verdicts(row: Row, ratio: float) -> None:
    for name in ("w1", "wN"):
        r = row.ratio(name)
        if r is None:
            row.verdicts[name] = None
        else:
            row.verdicts[name] = r >= ratio if row.higher_is_better else r <= ratio


def latency_details(row: Row) -> None:
    for name, stat in row.stats.items():
        extra = stat.median_run.extra
        row.details.append(
            f"{name}: p50 {extra['p50_ms']:.2f} ms, p99 {extra['p99_ms']:.2f} ms per cycle"
        )


def absolute_details(row: Row) -> None:
    direct_ref, amqproxy_ref = REFERENCE[row.key]
    parts = [f"{name} {fmt(row.stats[name].value)}" for name in ("w1", "wN") if name in row.stats]
    row.details.append(
        f"absolute: {', '.join(parts)} {row.unit}; the issue's amqproxy 3.1.3 figure "
        f"{fmt(amqproxy_ref)}, its direct figure {fmt(direct_ref)}"
    )


# --- which code -----------------------------------------------------------------------------


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
