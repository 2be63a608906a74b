"""The master and its workers: spreading, respawning, liveness, reload, signals, HTTP.

Every test starts its own proxy with an explicit --workers; clients are real pika clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.broker import BROKER_HOST, BROKER_PORT, queue_counts
from tests.support.hosts import name_in_hosts, remove_name
from tests.support.pika_client import close_reason
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import AMQP_HEADER, RawClient
from tests.support.util import REPO_ROOT, free_port, wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")

ProxyFactory = Callable[..., ProxyProcess]


def workers_of(p: ProxyProcess) -> dict[int, int]:
    """slot -> pid of the master's live worker processes, from their process titles."""
    assert p.proc is not None
    found: dict[int, int] = {}
    for child in psutil.Process(p.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            title = " ".join(child.cmdline()).strip()
            if title.startswith("amqproxy: worker "):
                found[int(title.rsplit(" ", 1)[1])] = child.pid
    return found


def serving_worker(p: ProxyProcess, conn: pika.BlockingConnection) -> int:
    """The pid of the worker that holds this client's connection."""
    local_port = conn._impl._transport._sock.getsockname()[1]  # type: ignore[union-attr]
    for pid in workers_of(p).values():
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == local_port and c.laddr.port == p.port:
                return pid
    raise AssertionError(f"no worker holds the connection from port {local_port}")


def http_get(p: ProxyProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(p: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(p, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(p: ProxyProcess, name: str, **labels: str) -> float:
    return metrics(p).get((name, tuple(sorted(labels.items()))), 0.0)


def declare(queue: str) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    conn.channel().queue_declare(queue)
    conn.close()


def delete(queue: str) -> None:
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    conn.channel().queue_delete(queue)
    conn.close()


@pytest.fixture
def queue() -> Any:
    name = f"itest-master-{time.monotonic_ns()}"
    declare(name)
    yield name
    delete(name)


def test_clients_spread_over_all_workers_and_every_message_arrives(
    proxy_factory: ProxyFactory, queue: str
) -> None:
    p = proxy_factory("--workers", "2")
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    conns = [p.connect() for _ in range(24)]
    served_by = {serving_worker(p, c) for c in conns}
    assert served_by == set(workers_of(p).values()), "every worker served clients"
    for i, conn in enumerate(conns):
        conn.channel().basic_publish("", queue, f"m{i}".encode())
        conn.close()
    wait_for(lambda: queue_counts(queue)[0] == 24, what="24 messages in the queue")


def test_killed_worker_is_replaced_and_other_clients_see_nothing(
    proxy_factory: ProxyFactory, queue: str
) -> None:
    p = proxy_factory("--workers", "2")
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    confirmed: list[set[bytes]] = []
    errors: list[BaseException | None] = []
    stop = threading.Event()
    conns = []
    # one publisher with confirms on each worker
    while len({serving_worker(p, c) for c in conns}) < 2 or len(conns) < 2:
        conns.append(p.connect())
    by_worker: dict[int, pika.BlockingConnection] = {}
    for c in conns:
        by_worker.setdefault(serving_worker(p, c), c)
    extra = [c for c in conns if c not in by_worker.values()]
    for c in extra:
        c.close()

    def publish(index: int, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.confirm_delivery()
        n = 0
        try:
            while not stop.is_set():
                body = f"w{index}-{n}".encode()
                ch.basic_publish("", queue, body)  # returns once confirmed
                confirmed[index].add(body)
                n += 1
            errors[index] = None
        except BaseException as exc:
            errors[index] = exc

    threads = []
    victim_pid, survivor_pid = list(by_worker)
    for index, pid in enumerate((victim_pid, survivor_pid)):
        confirmed.append(set())
        errors.append(None)
        t = threading.Thread(target=publish, args=(index, by_worker[pid]), daemon=True)
        threads.append(t)
        t.start()
    wait_for(lambda: all(len(s) > 20 for s in confirmed), what="publishing on both workers")
    victim_slot = next(s for s, pid in workers_of(p).items() if pid == victim_pid)
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # a client connecting during the respawn is served
    newcomer = p.connect()
    newcomer.channel().basic_publish("", queue, b"newcomer")
    wait_for(
        lambda: workers_of(p).get(victim_slot) not in (None, victim_pid),
        timeout=1.0,
        interval=0.02,
        what="the killed worker replaced within 1 s",
    )
    replaced_after = time.monotonic() - killed_at
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors[1] is None, f"a client of the surviving worker saw {errors[1]!r}"
    assert errors[0] is not None, "the killed worker's client noticed"
    newcomer.close()
    by_worker[survivor_pid].close()
    expected = confirmed[0] | confirmed[1] | {b"newcomer"}
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    ch = conn.channel()
    got: set[bytes] = set()
    while (m := ch.basic_get(queue, auto_ack=True))[0] is not None:
        got.add(m[2])
    conn.close()
    assert expected <= got, f"{len(expected - got)} confirmed messages lost"
    assert replaced_after < 1.5
    assert metric(p, "amqproxy_worker_restarts_total", reason="signal") == 1


@contextlib.contextmanager
def no_core_dumps() -> Iterator[None]:
    """Processes started meanwhile inherit a core size limit of 0: a worker killed by SIGABRT
    must not leave a core file in the repository (kernel.core_pattern = core)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def test_stopped_worker_gets_sigabrt_then_sigkill_after_worker_timeout(
    proxy_factory: ProxyFactory,
) -> None:
    """A stopped worker cannot even dump its stack on SIGABRT: SIGKILL follows 5 s later."""
    with no_core_dumps():
        p = proxy_factory("--workers", "2", "--worker-timeout", "2")
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    slot, pid = next(iter(workers_of(p).items()))
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: http_get(p, "/healthz")[0] == 503, timeout=2.5, what="/healthz 503")
        p.wait_log(
            rf"worker {slot} \(pid {pid}\) missed heartbeats for [\d.]+ s \(worker_timeout 2 s\): "
            r"SIGABRT \(stack in the log\)"
        )
        assert workers_of(p).get(slot) == pid, "SIGABRT stays pending while it is stopped"
        wait_for(
            lambda: workers_of(p).get(slot) not in (None, pid),
            timeout=8,
            what="the stopped worker replaced",
        )
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    p.wait_log(rf"worker {slot} \(pid {pid}\) still alive 5 s after SIGABRT: SIGKILL")
    p.wait_log(rf"worker {slot} \(pid {pid}\) killed by SIGKILL; restarting it")
    wait_for(lambda: http_get(p, "/healthz") == (200, "OK\n"), what="/healthz OK again")
    assert metric(p, "amqproxy_worker_restarts_total", reason="timeout") == 1


@pytest.mark.parametrize("log_file", [False, True], ids=["stderr", "log_file"])
def test_blocked_worker_dumps_its_stack_on_sigabrt_and_is_replaced(
    proxy_factory: ProxyFactory, tmp_path: Path, log_file: bool
) -> None:
    """A worker whose event loop is blocked in a system call (here: opening its pool status
    file, which the test replaced by a FIFO nobody reads, as a hung filesystem would block it)
    is running, so SIGABRT makes Python write every thread's stack to the log before it dies."""
    metrics_dir = tmp_path / "metrics"
    log_path = tmp_path / "amqproxy.log"
    options = ["--workers", "2", "--worker-timeout", "2"]
    options += ["--log-file", str(log_path)] if log_file else []
    with no_core_dumps():
        p = proxy_factory(*options, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})

    def log_text() -> str:
        return log_path.read_text(errors="replace") if log_file else p.log_text()

    def wait_log(pattern: str, timeout: float = 10) -> str:
        match: re.Match[str] = wait_for(
            lambda: re.search(pattern, log_text()), timeout, what=pattern
        )
        return match[0]

    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    slot, pid = next(iter(workers_of(p).items()))
    # the worker replaces its status file every second: <name>.tmp, written, renamed over it
    status = wait_for(
        lambda: next(
            (f for f in metrics_dir.iterdir() if re.fullmatch(rf"\D*{pid}\.json", f.name)), None
        ),
        what="the pool status file",
    )
    fifo = Path(f"{status}.tmp")
    wait_for(lambda: _mkfifo(fifo), what="a FIFO where the worker writes")  # not mid-write
    wait_log(
        rf"worker {slot} \(pid {pid}\) missed heartbeats for [\d.]+ s \(worker_timeout 2 s\): "
        r"SIGABRT \(stack in the log\)"
    )
    wait_log(rf"worker {slot} \(pid {pid}\) killed by SIGABRT; restarting it")
    dump = wait_log(r"Fatal Python error: Aborted\n\n(?:Thread|Current thread) 0x[\s\S]*")
    assert re.search(r"Current thread 0x[0-9a-f]+ \(most recent call first\):", dump)
    assert re.search(r'File ".*amqproxy_mp/worker\.py", line \d+ in \w+', dump), dump
    wait_for(lambda: workers_of(p).get(slot) not in (None, pid), what="the worker replaced")
    wait_for(lambda: http_get(p, "/healthz") == (200, "OK\n"), what="/healthz OK again")
    assert metric(p, "amqproxy_worker_restarts_total", reason="timeout") == 1
    assert "SIGKILL" not in log_text(), "SIGABRT was enough"


def _mkfifo(path: Path) -> bool:
    try:
        os.mkfifo(path)
    except FileExistsError:  # the worker is writing it right now: next time
        return False
    return True


def test_hup_applies_new_settings_without_refusing_a_connection(
    proxy_factory: ProxyFactory, tmp_path: Path, queue: str
) -> None:
    config = tmp_path / "amqproxy.ini"
    config.write_text("[main]\nidle_connection_timeout = 60\nmax_upstream_channels = 1\n")
    p = proxy_factory("--workers", "2", "-c", str(config))
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    failures: list[BaseException] = []
    cycles = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                conn = p.connect()
                conn.channel().basic_publish("", queue, b"x")
                conn.close()
                cycles[0] += 1
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: cycles[0] > 30, what="load running")
    old = set(workers_of(p).values())
    config.write_text("[main]\nidle_connection_timeout = 1\nmax_upstream_channels = 1\n")
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload complete: 2 workers", timeout=20)
    wait_for(lambda: not (set(workers_of(p).values()) & old), what="old workers gone")
    before = cycles[0]
    wait_for(lambda: cycles[0] > before + 30, what="load continuing after reload")
    stop.set()
    for t in threads:
        t.join(10)
    assert failures == [], f"connections failed during reload: {failures[:3]!r}"
    sent = cycles[0]
    wait_for(lambda: queue_counts(queue)[0] == sent, what=f"all {sent} messages")

    # the new idle timeout is in effect: 3 concurrent channels need 3 upstream connections
    # (max 1 channel each); 1 s after they are gone, the workers keep one per pool only
    held = [p.connect() for _ in range(6)]
    for c in held:
        c.channel()
    for c in held:
        c.close()
    wait_for(lambda: len(p.upstream_local_ports()) <= 2, timeout=4, what="idle upstreams closed")


def test_ttin_and_ttou_change_the_worker_count(proxy_factory: ProxyFactory) -> None:
    p = proxy_factory("--workers", "1")
    wait_for(lambda: len(workers_of(p)) == 1, what="1 worker")
    p.signal(signal.SIGTTIN)
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers after TTIN")
    p.signal(signal.SIGTTIN)  # (signals sent back to back may coalesce into one)
    wait_for(lambda: len(workers_of(p)) == 3, what="3 workers after 2 TTIN")
    wait_for(lambda: http_get(p, "/healthz")[0] == 200, what="healthy with 3")
    assert metric(p, "amqproxy_workers") == 3
    p.signal(signal.SIGTTOU)
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers after TTOU")
    conn = p.connect()
    conn.channel()
    conn.close()
    wait_for(lambda: http_get(p, "/healthz")[0] == 200, what="healthy with 2")


def test_a_new_worker_that_cannot_listen_is_an_error_not_a_crash(
    proxy_factory: ProxyFactory,
) -> None:
    """The listen address is a name that stops resolving while the proxy runs: SIGTTIN's new
    worker cannot listen; the master says so and goes on serving. (The resolver's error
    escaped the master's handling: an internal error with a traceback.)"""
    with name_in_hosts("amqproxy-test-listen.internal", ["127.0.0.1"]) as name:
        p = proxy_factory("--workers", "1", "--listen", name)
        wait_for(lambda: len(workers_of(p)) == 1, what="1 worker")
        remove_name()
        p.signal(signal.SIGTTIN)
        p.wait_log(r"worker 2 cannot listen: cannot resolve listen address")
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", p.port))
        conn.channel()
        conn.close()
        assert len(workers_of(p)) == 1
        assert "Traceback" not in p.log_text()


def test_term_drains_clients_and_master_exits_0(proxy_factory: ProxyFactory) -> None:
    p = proxy_factory("--workers", "2", "--term-client-close-timeout", "1")
    conn = p.connect()
    ch = conn.channel()
    started = time.monotonic()
    p.signal(signal.SIGTERM)
    wait_for(
        lambda: http_get(p, "/healthz") == (503, "shutting down\n"),
        timeout=0.8,
        what="/healthz 503 while the clients drain",
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        while True:
            conn.process_data_events(0.1)
            ch.basic_publish("", "", b"")
    assert close_reason(err.value)[0] == 320
    assert time.monotonic() - started >= 0.9
    assert p.wait(10) == 0


def test_metrics_pools_and_healthz_reflect_what_clients_did(
    proxy_factory: ProxyFactory, queue: str
) -> None:
    p = proxy_factory("--workers", "2")
    wait_for(lambda: http_get(p, "/healthz") == (200, "OK\n"), what="/healthz OK")
    held = [p.connect() for _ in range(5)]
    channels = [c.channel() for c in held]
    for i, ch in enumerate(channels):
        for j in range(4):
            ch.basic_publish("", queue, f"{i}-{j}".encode())
    wait_for(lambda: metric(p, "amqproxy_client_connections") == 5, what="5 clients in metrics")
    assert metric(p, "amqproxy_client_channels") == 5
    pools = json.loads(http_get(p, "/pools")[1])
    assert {(e["user"], e["vhost"]) for e in pools} == {("guest", "/")}
    assert sum(e["clients"] for e in pools) == 5
    assert sum(e["channels_in_use"] for e in pools) == 5
    assert all("password" not in e for e in pools)
    for conn in held:
        conn.close()
    wait_for(
        lambda: (
            metric(p, "amqproxy_messages_published_total") == 20
            and metric(p, "amqproxy_client_connections") == 0
        ),
        what="20 published, 0 clients",
    )
    assert metric(p, "amqproxy_client_disconnects_total", reason="client_close") == 5
    assert metric(p, "amqproxy_workers") == 2
    assert metric(p, "amqproxy_upstream_connections") == len(p.upstream_local_ports())
    assert metric(p, "amqproxy_identity_info", upstream=p.upstream, version="0.1.0") == 1
    # a respawn must not lose counts
    os.kill(next(iter(workers_of(p).values())), signal.SIGKILL)
    wait_for(
        lambda: len(workers_of(p)) == 2 and http_get(p, "/healthz")[0] == 200, what="respawned"
    )
    assert metric(p, "amqproxy_messages_published_total") == 20
    assert metric(p, "amqproxy_client_disconnects_total", reason="client_close") == 5


def test_second_instance_on_the_same_port_fails_at_once(proxy_factory: ProxyFactory) -> None:
    p = proxy_factory("--workers", "1")
    second = subprocess.run(
        [sys.executable, "-m", "amqproxy_mp", "--listen", "127.0.0.1", "--port", str(p.port),
         "--http-port", str(free_port()), f"amqp://{BROKER_HOST}:{BROKER_PORT}"],
        capture_output=True, text=True, timeout=20, cwd=str(REPO_ROOT), env=p.env,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {p.port}" in second.stderr
    assert "already in use" in second.stderr
    conn = p.connect()  # the first one still serves
    conn.close()


def test_crash_looping_worker_backs_off_and_recovers(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """A worker that cannot start (here: its upstream CA file vanished; the broker only needs
    to accept TCP for /healthz) is restarted with
    growing delays, /healthz says why, and it comes back once the cause is fixed."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    p = proxy_factory(
        "--workers", "1", "--upstream-tls-ca-file", str(ca), upstream="amqps://127.0.0.1:5672"
    )
    assert p.proc is not None
    title = " ".join(psutil.Process(p.proc.pid).cmdline()).strip()
    assert title == f"amqproxy: master [127.0.0.1:{p.port} -> amqps://127.0.0.1:5672]"
    (pid,) = workers_of(p).values()
    ca.unlink()
    os.kill(pid, signal.SIGKILL)
    p.wait_log(r"failures in a row, restarting in 2 s", timeout=10)
    status, reason = http_get(p, "/healthz")
    assert status == 503
    assert reason.startswith(("no worker alive", "crash-looping")), reason
    assert "worker 1 exited with code 1" in reason
    ca.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    wait_for(lambda: http_get(p, "/healthz") == (200, "OK\n"), timeout=15, what="recovered")
    assert metric(p, "amqproxy_worker_restarts_total", reason="exit") >= 2


def test_usr1_reopens_the_log_file(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    log_file = tmp_path / "amqproxy.log"
    p = proxy_factory("--workers", "1", "--log-file", str(log_file))
    wait_for(lambda: "master started" in log_file.read_text(), what="master logging to file")
    rotated = tmp_path / "amqproxy.log.1"
    log_file.rename(rotated)  # what logrotate does
    p.signal(signal.SIGUSR1)
    wait_for(log_file.exists, what="log file reopened by the master")
    conn = p.connect()  # a worker logs this client
    conn.close()
    wait_for(
        lambda: "(user='guest' vhost='/') connected for" in log_file.read_text(),
        what="the worker writing to the new file",
    )
    assert "reopening the log file" in rotated.read_text()


def test_while_a_worker_backs_off_new_connections_go_to_the_others(
    proxy_factory: ProxyFactory,
) -> None:
    """Worker 1 dies quickly again and again, so its restart is delayed: meanwhile every new
    client is served by worker 2 at once (none waits in the dead worker's listen queue)."""
    p = proxy_factory("--workers", "2")
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    for kill in range(4):  # restarted at once, then in 1 s, 2 s, and (the last) 4 s
        pid = workers_of(p)[1]
        os.kill(pid, signal.SIGKILL)
        if kill < 3:
            wait_for(lambda old=pid: workers_of(p).get(1, old) != old, timeout=10, what="worker 1")
    p.wait_log(r"failures in a row, restarting in 4 s", timeout=10)
    answered = 0
    for _ in range(20):
        with RawClient(p.host, p.port, timeout=2) as c:
            c.send_raw(AMQP_HEADER)
            c.read_method()  # Connection.Start, or a timeout that fails the test
            answered += 1
    assert answered == 20
    wait_for(lambda: len(workers_of(p)) == 2, timeout=15, what="worker 1 back")
