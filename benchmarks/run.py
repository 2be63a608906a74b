"""amqproxy-mp benchmarks: one command prints the whole table (issue 5, "Benchmarks").

    python benchmarks/run.py                 # every scenario, medians of 3 runs (< 10 min)
    python benchmarks/run.py --quick         # shorter runs, 1 run each (< 2 min)
    python benchmarks/run.py -s php_loopback -s pub_1c_100b --profile /tmp/prof

Each scenario runs directly against RabbitMQ and through the proxy with 1 worker and with
one worker per CPU, interleaved in the same invocation (run 1 of each config,
then run 2 of each, ...), so the ratio proxy/direct compares runs made under the same load on
this shared machine. The proxy's CPU is measured with psutil on the master and its workers
(cpu_times before and after each run). Everything happens in the vhost `amqproxy-bench`,
created at the start and deleted at the end (with all its queues).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import procs
from bench import (
    BROKER_PORT,
    CONSUME_QUEUE,
    CYCLE_QUEUE,
    DEFAULT_WORKERS,
    HOST,
    PUB_QUEUE,
    QUEUE_LIMITS,
    REFERENCE,
    STORM_CONNECTIONS,
    USER,
    VHOST,
    Bench,
    Row,
    fmt,
    progress,
)
from scenarios import SCENARIOS

from amqproxy_mp.config.model import default_workers

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
        f"{os.cpu_count()} CPUs, proxy with 1 and {n} workers (its default here: "
        f"{default_workers()}), {elapsed:.0f} s",
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
            runs = ", ".join(fmt(r.value) for r in stat.runs)
            broker = fmt(stat.median_of(lambda r: r.per_100k(r.broker_cpu)))
            client = fmt(stat.median_of(lambda r: r.client_share))
            notes = "; ".join({r.note for r in stat.runs if r.note})
            lines.append(
                f"    {name}: runs [{runs}]; CPU s per 100k: proxy {fmt(stat.cpu_per_100k)}, "
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
                f"  {row.title:<42} {fmt(got):>8} vs {fmt(ref):>8} {row.unit:<9} "
                f"{verdict}; client CPU {fmt(share)} % of a core"
            )
    return "\n".join(lines)


def _table_line(row: Row) -> str:
    def cell(name: str) -> str:
        stat = row.stats.get(name)
        return fmt(stat.value) if stat else "—"

    def ratio(name: str) -> str:
        r = row.ratio(name)
        if r is None:
            return "—"
        return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"

    def verdict(name: str) -> str:
        v = row.verdicts.get(name)
        return "—" if v is None else "PASS" if v else "MISS"

    cpu = "/".join(
        fmt(row.stats[name].cpu_per_100k) if name in row.stats else "—" for name in ("w1", "wN")
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
        progress(f"{key} ..." if attempt == 1 else f"{key}: attempt {attempt}")
        try:
            prepare_broker(bench)
            return SCENARIOS[key](bench)
        except Exception as exc:
            progress(f"  {key} failed: {exc!r}")
            error = exc
            bench.close_proxies()
    row = Row(key, key, "", False, "")
    row.details.append(f"FAILED {attempts} times: {error!r}")
    return row


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
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the proxy of this git commit (1 worker, from a worktree) in the "
        "scenarios that use the common configs; shown in the details as 'w1 REF'",
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
        progress(f"warning: RLIMIT_NOFILE is {nofile}; the storm may fail")

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
        progress("interrupted")
        return 130
    finally:
        if bench is not None:
            bench.close()
        procs.stop_all()
        procs.delete_vhost(VHOST)
        if bench is not None:
            if any(not row.stats for row in rows):
                progress(f"proxy and relay logs kept in {bench.logdir}")
            else:
                shutil.rmtree(bench.logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
