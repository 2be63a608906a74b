"""The cost of the proxy's upstream confirms (issue 13), beside the release before them.

    python benchmarks/confirms.py                 # about 10 minutes
    python benchmarks/confirms.py --quick         # about 3 minutes
    sudo python benchmarks/confirms.py --kills    # also the loss and duplicate figures

The release before confirms (the parent of the commit that added proxy/confirms.py, or
`--baseline REF`) runs from a git worktree beside this checkout, both with 1 worker, in the
same invocation, runs interleaved. Printed, medians of the runs:

- publish throughput (1 and 16 connections, 100 B), directly, before and now; and directly
  on channels in confirm mode whose acks nobody waits for: the broker's share of the cost;
- the php-amqp cycle (transient messages) on loopback with `close_policy` local and
  processed, before and now, and with confirmed now;
- the php-amqp cycle with persistent messages to a quorum queue, on loopback and with the
  broker 50 ms away, directly and now with local, processed and confirmed;
- with `--kills`: the figures of tests/integration/test_confirms_under_failures.py (4 php-amqp
  clients, 2 raw closing publishers, 2 confirming publishers; the proxy's upstream
  connections closed by `rabbitmqctl close_connection` 10 times): messages told sent, lost,
  duplicated, re-sent, clients moved.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loadgen
import procs
from bench import BROKER_PORT, HOST, PUB_QUEUE, USER, VHOST, Bench, _cpu, progress
from run import prepare_broker
from scenarios import php

QUORUM_QUEUE = "bench.quorum"


def baseline_ref() -> str:
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "amqproxy_mp/proxy/confirms.py"],
        cwd=procs.REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return f"{added[-1]}^" if added else "HEAD"


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def interleaved(runs: int, configs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each config once per round, `runs` rounds; the median of each."""
    values: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(runs):
        for name, measure in configs.items():
            values[name].append(measure())
            progress(f"  run {i + 1}/{runs} {name}: {values[name][-1]:.3f}")
    return {name: statistics.median(v) for name, v in values.items()}


def table(title: str, unit: str, figures: dict[str, float], reference: str) -> str:
    lines = [f"\n{title} ({unit}; ratio to {reference})"]
    base = figures[reference]
    for name, value in figures.items():
        lines.append(f"  {name:<28} {value:>10.3f}   {value / base:>6.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="the release to compare with (a git ref)")
    parser.add_argument("--quick", action="store_true", help="shorter runs, 1 run each")
    parser.add_argument("--runs", type=int, help="runs per config (default 3, quick 1)")
    parser.add_argument("--kills", action="store_true", help="also the loss and duplicate run")
    parser.add_argument("--publish-only", action="store_true", help="only the publish figures")
    args = parser.parse_args(argv)
    args.profile = None
    args.baseline = args.baseline or baseline_ref()
    procs.ensure_vhost(VHOST, USER)
    bench = Bench(args)  # (it checks the baseline out, and removes it in close)
    assert bench.baseline is not None
    ref, worktree = bench.baseline
    out: list[str] = [f"baseline: {ref} (worktree {worktree}); now: {bench.code}"]
    try:
        prepare_broker(bench)
        import pika

        params = pika.ConnectionParameters(HOST, BROKER_PORT, VHOST)
        with contextlib.closing(pika.BlockingConnection(params)) as setup:
            setup.channel().queue_declare(
                QUORUM_QUEUE, durable=True,
                arguments={"x-queue-type": "quorum", "x-max-length": 20000},
            )  # fmt: skip
        logdir = bench.logdir

        def proxy(policy: str, port: int = BROKER_PORT, repo: Path = procs.REPO) -> procs.Proxy:
            return procs.Proxy(1, port, logdir, ("--close-policy", policy), repo=repo)

        before = {p: proxy(p, repo=worktree) for p in ("local", "processed")}
        now = {p: proxy(p) for p in ("local", "processed", "confirmed")}
        duration = bench.dur(3.0, 1.0)

        #: CPU per message of the last publish run: the broker's, the proxy's (µs).
        cpu: dict[str, tuple[float, float]] = {}

        def publish(
            name: str, connections: int, proxy: procs.Proxy | None, confirm_mode: bool
        ) -> Callable[[], float]:
            port = proxy.port if proxy else BROKER_PORT

            def measure() -> float:
                broker_before = _cpu(bench.broker)
                proxy_before = proxy.cpu_seconds()[0] if proxy else 0.0
                result = bench.run(
                    loadgen.publish(HOST, port, bench.login, PUB_QUEUE, connections=connections,
                                    body_size=100, duration=duration, confirm_mode=confirm_mode)
                )  # fmt: skip
                count = result["count"]
                cpu[name] = (
                    (_cpu(bench.broker) - broker_before) / count * 1e6,
                    ((proxy.cpu_seconds()[0] - proxy_before) if proxy else 0.0) / count * 1e6,
                )
                return float(count / result["elapsed"])

            return measure

        #: Each publisher's proxy (None: the broker directly), and whether in confirm mode.
        publishers = {
            "direct": (None, False),
            "direct, confirm mode": (None, True),
            "before (processed)": (before["processed"], False),
            "now (processed)": (now["processed"], False),
        }
        for connections in (1, 16):
            progress(f"publish, {connections} connections, 100 B")
            figures = interleaved(bench.runs, {
                name: publish(name, connections, proxy, confirm_mode)
                for name, (proxy, confirm_mode) in publishers.items()
            })  # fmt: skip
            out.append(table(f"publish, {connections} conn, 100 B", "msg/s", figures,
                             "before (processed)"))  # fmt: skip
            out.append("  CPU per message in the last run (µs), broker / proxy: " + "; ".join(
                f"{name} {b:.1f} / {p:.1f}" for name, (b, p) in cpu.items()))  # fmt: skip
        if args.publish_only:
            return 0

        def cycle(port: int, cycles: int, queue: str = "bench.cycle", persistent: bool = False
                  ) -> Callable[[], float]:  # fmt: skip
            def measure() -> float:
                result = php(port, cycles, queue, persistent=persistent)
                return float(result["total_s"] / result["cycles"] * 1000)

            return measure

        cycles = int(bench.dur(1000, 200))
        for p in (*before.values(), *now.values()):
            php(p.port, 20)  # (warm: the upstream connection and a parked channel)
        progress("php-amqp cycle, loopback, transient")
        figures = interleaved(bench.runs, {
            "direct": cycle(BROKER_PORT, cycles),
            "before, local": cycle(before["local"].port, cycles),
            "now, local": cycle(now["local"].port, cycles),
            "before, processed": cycle(before["processed"].port, cycles),
            "now, processed": cycle(now["processed"].port, cycles),
            "now, confirmed": cycle(now["confirmed"].port, cycles),
        })  # fmt: skip
        out.append(table("php-amqp cycle, loopback, transient, classic queue", "ms/cycle",
                         figures, "before, local"))  # fmt: skip
        progress("php-amqp cycle, loopback, persistent, quorum queue")
        figures = interleaved(bench.runs, {
            "direct": cycle(BROKER_PORT, cycles, QUORUM_QUEUE, True),
            **{f"now, {p}": cycle(now[p].port, cycles, QUORUM_QUEUE, True) for p in now},
        })  # fmt: skip
        out.append(table("php-amqp cycle, loopback, persistent, quorum queue", "ms/cycle",
                         figures, "direct"))  # fmt: skip
        relay = procs.Relay(BROKER_PORT, 25.0, logdir)
        far = {p: proxy(p, relay.port) for p in ("local", "processed", "confirmed")}
        for p in far.values():
            php(p.port, 5)
        progress("php-amqp cycle, broker 50 ms away, persistent, quorum queue")
        figures = interleaved(bench.runs, {
            "direct": cycle(relay.port, int(bench.dur(6, 3)), QUORUM_QUEUE, True),
            **{f"now, {p}": cycle(far[p].port, int(bench.dur(60, 10)), QUORUM_QUEUE, True)
               for p in far},
        })  # fmt: skip
        out.append(table("php-amqp cycle, broker 50 ms away, persistent, quorum queue",
                         "ms/cycle", figures, "direct"))  # fmt: skip
        if args.kills:
            out.append(kill_figures(logdir))
    finally:
        bench.close()
        procs.stop_all()
        procs.delete_vhost(VHOST)
        print("\n".join(out))  # (what was measured, also when a later part failed)
    return 0


def kill_figures(logdir: Path) -> str:
    """The loss and duplicate figures of the integration test, in the default vhost."""
    import pika

    from tests.support.broker import close_broker_connections
    from tests.support.publishers import load_with_failures

    queue = f"bench.no-loss-{int(time.time())}"
    conn = pika.BlockingConnection(pika.ConnectionParameters(HOST, BROKER_PORT))
    conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    p = procs.Proxy(2, BROKER_PORT, logdir)

    def close_upstream() -> int:
        return close_broker_connections(p.upstream_ports(), "benchmark: upstream failure")

    progress("publishers while the upstream connections are closed 10 times")
    tally = load_with_failures(HOST, p.port, p.http_port, queue, close_upstream, 20000, 10)
    return "\nunder 10+ upstream connection closes (2 workers, processed):\n  " + ", ".join(
        f"{key} {value:g}" for key, value in tally.items()
    )


if __name__ == "__main__":
    sys.exit(main())
