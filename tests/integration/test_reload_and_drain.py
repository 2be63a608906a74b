"""A reload never costs capacity, a drain is never cut short, and workers hold nothing of the
master's: what operators rely on when they send HUP, TERM or TTIN."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pika
import pika.exceptions
import psutil
import pytest

from tests.support.pika_client import close_reason
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import http_request
from tests.support.targets import ProxyFactory
from tests.support.util import free_port, wait_for

from .test_master import metrics, workers_of
from .test_tls import make_certs

pytestmark = pytest.mark.usefixtures("require_proxy")

#: Loaded into the proxy's processes through PYTHONPATH: a worker started while HANG_FILE
#: exists hangs before it listens, as a worker that cannot start would.
SITECUSTOMIZE = """
import os, time
import amqproxy_mp.worker as worker

_run = worker.Worker.run

def run(self):
    while os.path.exists(os.environ["AMQPROXY_TEST_HANG_FILE"]):
        time.sleep(0.1)
    return _run(self)

worker.Worker.run = run
"""


def reload_gauge(p: ProxyProcess) -> float:
    return metrics(p)[("amqproxy_config_last_reload_successful", ())]


def roundtrip(p: ProxyProcess) -> None:
    conn = p.connect()
    conn.channel().queue_declare("", exclusive=True)
    conn.close()


def test_hup_with_unusable_tls_files_keeps_the_running_workers(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    tls_port = free_port()
    config = tmp_path / "amqproxy.ini"

    def write(key: Path) -> None:
        config.write_text(
            f"[listen]\ntls_port = {tls_port}\ntls_cert_file = {certs['server.pem']}\n"
            f"tls_key_file = {key}\n"
        )

    write(certs["server.key"])
    p = proxy_factory("--workers", "2", "-c", str(config))
    wait_for(lambda: len(workers_of(p)) == 2, what="2 workers")
    before = workers_of(p)
    assert reload_gauge(p) == 1
    write(certs["client.key"])  # a key that does not match the certificate
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed, the running configuration stays: tls_cert_file/tls_key_file")
    time.sleep(1)
    assert workers_of(p) == before  # nothing was replaced
    roundtrip(p)
    status, body = http_request(p.http_port, "/healthz")
    assert status == 200 and "the last reload failed: tls_cert_file" in body, body
    assert reload_gauge(p) == 0
    # a good configuration is taken again
    write(certs["server.key"])
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload complete: 2 workers", timeout=20)
    wait_for(lambda: not set(workers_of(p).values()) & set(before.values()), what="new workers")
    assert reload_gauge(p) == 1
    assert http_request(p.http_port, "/healthz") == (200, "OK\n")
    # a listener's port cannot change on reload, the TLS one included
    config.write_text(config.read_text().replace(str(tls_port), str(free_port())))
    p.signal(signal.SIGHUP)
    p.wait_log(r"tls_port cannot change on reload \(restart to apply\)", timeout=10)
    p.wait_log(r"reload complete: 2 workers.*\n(.*\n)*.*reload complete: 2 workers", timeout=20)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5):
        pass  # still the old port


def test_a_new_worker_that_never_gets_ready_is_stopped_and_the_old_one_serves(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    hang = tmp_path / "hang"
    p = proxy_factory(
        "--workers", "1",
        env={
            "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{Path(__file__).parents[2]}",
            "AMQPROXY_TEST_HANG_FILE": str(hang),
        },
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    (old,) = wait_for(lambda: list(workers_of(p).values()), what="the worker")
    roundtrip(p)  # it serves: it is past the hang (on a loaded machine it might not be yet)
    hang.touch()
    p.signal(signal.SIGHUP)
    p.wait_log(r"reload failed, the running configuration stays: worker 1 did not get ready", 25)
    assert list(workers_of(p).values()) == [old]  # the candidate is gone, the old one serves
    roundtrip(p)
    status, body = http_request(p.http_port, "/healthz")
    assert status == 200 and "did not get ready" in body, body
    hang.unlink()
    # and the slot is not treated as crashing: no restart, no back-off
    restarts = [
        v for (name, _), v in metrics(p).items() if name == "amqproxy_worker_restarts_total"
    ]
    assert sum(restarts) == 0


def test_a_long_drain_keeps_beating_and_its_clients_get_320(
    proxy_factory: ProxyFactory,
) -> None:
    """A retiring worker waits retire_client_close_timeout (here 8 s) for its clients, far
    beyond worker_timeout (2 s): it must keep beating to the master, and heartbeats must keep
    both hops alive (2 s each way), until it closes its clients with 320."""
    p = proxy_factory(
        "--workers", "1", "--worker-timeout", "2", "--retire-client-close-timeout", "8",
        "--upstream-heartbeat", "2",
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    (old,) = wait_for(lambda: list(workers_of(p).values()), what="the worker")
    conn = p.connect(heartbeat=2)
    conn.channel()
    p.signal(signal.SIGHUP)
    started = time.monotonic()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        while time.monotonic() - started < 20:
            conn.process_data_events(time_limit=0.2)
    elapsed = time.monotonic() - started
    assert close_reason(info.value) == (320, "CONNECTION_FORCED - amqproxy-mp is shutting down")
    assert 7 <= elapsed < 12, elapsed
    assert "missed heartbeats for" not in p.log_text()  # (the master kills no worker)
    wait_for(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == "zombie",
             what="the old worker gone")  # fmt: skip
    p.wait_log(rf"worker 1 \(pid {old}\) exited with code 0")  # (once the master reaped it)


def test_workers_hold_no_socket_of_the_master(proxy_factory: ProxyFactory) -> None:
    p = proxy_factory("--workers", "1")
    assert isinstance(p, ProxyProcess)
    # an HTTP client of the master stays connected while a worker is forked
    with socket.create_connection(("127.0.0.1", p.http_port)) as http:
        http.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert http.recv(100).startswith(b"HTTP/1.1 ")  # (the master has answered it)
        p.signal(signal.SIGTTIN)
        wait_for(lambda: len(workers_of(p)) == 2, what="a second worker")
        for pid in workers_of(p).values():
            ports = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="inet")}
            assert p.http_port not in ports, (pid, ports)
    # the worker's own listener is its only socket on the proxy's address
    for pid in workers_of(p).values():
        listening = [
            c for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]  # fmt: skip
        assert [c.laddr.port for c in listening] == [p.port], listening


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)


def http_code(url: str) -> int:
    """The status, 503 included."""
    try:
        return http_status(url)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_http_has_its_own_address_loopback_by_default(proxy_factory: ProxyFactory) -> None:
    """/pools names users and vhosts: HTTP does not follow the AMQP listen address."""
    p = proxy_factory("--workers", "1", "--listen", "127.0.0.3")
    assert isinstance(p, ProxyProcess)
    # (the proxy's port accepts before its worker is ready: /healthz says 503 until then)
    wait_for(lambda: http_code(f"http://127.0.0.1:{p.http_port}/healthz") == 200, what="200")
    with pytest.raises(OSError):
        http_status(f"http://127.0.0.3:{p.http_port}/healthz")
    q = proxy_factory("--workers", "1", "--http-address", "127.0.0.2")
    assert isinstance(q, ProxyProcess)
    wait_for(lambda: http_code(f"http://127.0.0.2:{q.http_port}/healthz") == 200, what="200")
    with pytest.raises(OSError):
        http_status(f"http://127.0.0.1:{q.http_port}/healthz")


def test_check_config_loads_every_tls_file(tmp_path: Path) -> None:
    """--check-config fails on what the proxy could not start with: a key that does not match
    its certificate."""
    import subprocess
    import sys

    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    config = tmp_path / "amqproxy.ini"
    config.write_text(
        f"[main]\nupstream = amqp://127.0.0.1\n[listen]\ntls_port = {free_port()}\n"
        f"tls_cert_file = {certs['server.pem']}\ntls_key_file = {certs['client.key']}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy_mp", "--check-config", str(config)],
        capture_output=True, text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "tls_cert_file/tls_key_file/tls_client_ca_file unusable" in result.stderr
