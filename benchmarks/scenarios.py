"""The benchmark scenarios: each measures one thing directly against RabbitMQ and through the
proxy (1 worker, and one per CPU) and returns its Row of the table; SCENARIOS names them in
the table's order (`run.py -s NAME`)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import loadgen
import procs
from bench import (
    BROKER_PORT,
    CONSUME_QUEUE,
    CYCLE_QUEUE,
    DEFAULT_WORKERS,
    HOST,
    PASSWORD,
    PUB_QUEUE,
    STORM_CONNECTIONS,
    USER,
    VHOST,
    Bench,
    Config,
    Deferred,
    Measurement,
    Row,
    Run,
    Stat,
    absolute_details,
    latency_details,
    progress,
    ratio_verdicts,
)

PHP_SCRIPT = procs.BENCH / "php" / "cycle.php"


# --- php-amqp, warm-up ----------------------------------------------------------------------


def php(
    port: int,
    cycles: int,
    queue: str = CYCLE_QUEUE,
    timeout: float = 300.0,
    persistent: bool = False,
) -> dict[str, Any]:
    """Run benchmarks/php/cycle.php: `cycles` php-amqp connect/channel/publish/disconnect."""
    args = [USER, PASSWORD, VHOST, queue, str(cycles), "2" if persistent else "1"]
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
    latency_details(row)
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
    ratio_verdicts(row, 1.5 / 2.5)
    latency_details(row)
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
    ratio_verdicts(row, ratio)
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
    ratio_verdicts(row, ratio)
    absolute_details(row)
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
    ratio_verdicts(row, 0.9)
    absolute_details(row)
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
    ratio_verdicts(row, 0.9)
    absolute_details(row)
    row.details.append(f"{count} messages filled in directly before each run, then consumed")
    return row


def scenario_storm(bench: Bench) -> Row:
    n = int(bench.args.storm or STORM_CONNECTIONS)
    row = Row(
        "storm",
        f"{n} connections + channel at once",
        "s",
        False,
        "≤ 2.3 s, ≤ 16 KiB/client, RSS back, PSS ≤ 40 MB",
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
            progress(
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
        idle_pss = stat.median_of(lambda r: r.extra["idle_pss_mb"]) or 0.0
        ok_pss = name == "w1" or idle_pss <= 40
        row.verdicts[name] = ok_time and ok_mem and ok_after and ok_pss and not failed
        m = stat.median_run.extra
        row.details.append(
            f"{name}: all open in {stat.value:.2f} s ({_ok(ok_time)}; half after "
            f"{m['p50_s']:.2f} s, 90 % after {m['p90_s']:.2f} s; kernel listen-queue drops "
            f"{m['listen_drops']}); PSS idle {idle_pss:.1f} MB"
            + ("" if name == "w1" else f" ({_ok(ok_pss)}: ≤ 40 MB)")
            + f"; RSS idle {m['idle_mib']:.1f} MiB, held {m['held_mib']:.1f} "
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
    idle_pss = proxy.pss()
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
        idle_pss_mb=idle_pss / 1e6,
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
    progress(f"  channel_opens {name}: {wire:.1f} per 1 000 (broker counter {broker:.0f})")
    return run


def _ok(ok: bool) -> str:
    return "ok" if ok else "MISS"


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
