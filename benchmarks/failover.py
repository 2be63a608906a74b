"""A node failure under PHP-pattern load, with the cluster given to the proxy and with one URL.

    sudo .venv/bin/python benchmarks/failover.py            # about 2 minutes

Starts the tests' 3-node RabbitMQ cluster (tests/support/cluster.py: ports 5691-5693, beside
the default node; rabbitmqctl needs root), then for each setup, side by side in one run:
4 php-amqp clients doing the PHP cycle (connect, channel, publish, disconnect) through a
proxy with 1 worker; after 5 s the node holding the proxy's upstream connection is killed
(SIGKILL). The setups: the proxy given all three nodes (spread), and
the proxy given that one node's URL (what amqproxy and a single-URL amqproxy-mp do). With the
cluster the killed node stays down until the load ends; with one URL it is started again at
once (there is no service until it is back).

Printed per setup: cycles, failed cycles (and when the last one started, after the kill), the
longest time any client went without a cycle completing (what the kill cost in service),
and cycle latency percentiles (ms, by when the cycle started) before the kill, in the 5 s
after it, and after. The cycles are kept in the log directory.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import procs

from tests.support.cluster import Cluster, ClusterNode

PHP = procs.REPO / "tests" / "integration" / "php" / "cycles.php"
CLIENTS = 4
BEFORE, AFTER = 5.0, 20.0
QUEUE = "amqproxy-bench-failover"


def connection_node(cluster: Cluster) -> ClusterNode:
    """The node with the most client connections (the proxy's pool)."""
    pids = cluster.running()[0].ctl("list_connections", "--quiet", "--no-table-headers", "pid")
    counts: dict[str, int] = {}
    for pid in pids.split():
        name = pid.strip("<>").rsplit(".", 3)[0]
        counts[name] = counts.get(name, 0) + 1
    busiest = max(counts, key=lambda name: counts[name])
    return next(node for node in cluster.nodes if node.name == busiest)


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(len(v) * q))]  # noqa: E731
    return f"p50 {at(0.5):7.1f}  p99 {at(0.99):7.1f}  max {v[-1]:7.1f}  (n={len(v)})"


def run(
    cluster: Cluster, name: str, upstream: str | None, logdir: Path, restart: bool
) -> dict[str, Any]:
    """One setup: load, a kill (and the node started again at once when `restart`), and
    what the PHP clients saw."""
    options = ("--upstream-node-connect-timeout", "1")
    proxy = procs.Proxy(1, 0, logdir, options, upstream=upstream or ",".join(cluster.urls))
    try:
        argv = ["php", str(PHP), "127.0.0.1", str(proxy.port), "guest", "guest", "/", QUEUE]
        outputs = [(logdir / f"php-{name.split()[0]}-{i}.out") for i in range(CLIENTS)]
        php = []
        for path in outputs:  # (to files: a pipe read only at the end would stop php)
            with path.open("w") as out:
                php.append(subprocess.Popen([*argv, str(BEFORE + AFTER)], stdout=out,
                                            stderr=subprocess.STDOUT))  # fmt: skip
        time.sleep(BEFORE)
        victim = connection_node(cluster)
        killed = time.time()
        victim.kill()
        if restart:
            victim.restart()
        per_client: list[list[dict[str, Any]]] = []
        for proc, path in zip(php, outputs, strict=True):
            proc.wait(timeout=120)
            lines = path.read_text().splitlines()
            if not lines:
                raise RuntimeError(f"php printed nothing ({path})")
            per_client.append([json.loads(line) for line in lines])
    finally:
        procs._stop(proxy.proc)
        if not restart:
            victim.restart()
    (logdir / f"cycles-{name.split()[0]}.json").write_text(json.dumps(per_client))
    cycles = [c for client in per_client for c in client]
    failed = [c for c in cycles if not c["ok"]]

    def window(start: float, end: float) -> list[float]:
        return [c["ms"] for c in cycles if c["ok"] and start <= c["t"] - killed < end]

    def longest_pause(client: list[dict[str, Any]]) -> float:
        """The longest time the client went without a cycle ending well, around the kill."""
        ends = [killed - 1] + [c["t"] + c["ms"] / 1000 for c in client if c["ok"]]
        ends = sorted(e for e in ends if e >= killed - 1)
        return max((b - a for a, b in itertools.pairwise(ends)), default=0.0)

    return {
        "setup": name,
        "cycles": len(cycles),
        "failed": len(failed),
        "pause_s": max(longest_pause(client) for client in per_client),
        "last_failure_s": max((c["t"] - killed for c in failed), default=0.0),
        "before": percentiles(window(-BEFORE, 0)),
        "first_5s": percentiles(window(0, 5)),
        "after": percentiles(window(5, AFTER)),
    }


def main() -> int:
    cluster = Cluster()
    print("starting the 3-node cluster ...", flush=True)
    cluster.start()
    logdir = Path(tempfile.mkdtemp(prefix="failover-"))
    try:
        first = cluster.nodes[0]
        conn = procs_connection(first)
        conn.channel().queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        conn.close()
        results = [
            run(cluster, "cluster (3 URLs, spread; the node stays down)", None, logdir, False),
            run(cluster, "single URL (the node is started again at once)", first.url, logdir, True),
        ]
    finally:
        cluster.stop()
    for r in results:
        print(f"\n{r['setup']}: {r['cycles']} cycles, {r['failed']} failed (the last "
              f"{r['last_failure_s']:.2f} s after the kill); longest time a client went "
              f"without a cycle completing: {r['pause_s']:.2f} s")  # fmt: skip
        for label in ("before", "first_5s", "after"):
            print(f"  cycle ms {label:<9} {r[label]}")
    print(f"\n(proxy logs in {logdir})")
    return 0


def procs_connection(node: ClusterNode) -> Any:
    import pika

    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", node.port))


if __name__ == "__main__":
    sys.exit(main())
