"""Broker faults: the broker stops (rabbitmqctl stop_app / start_app), dies (kill -9 of
its beam.smp, then `rabbitmq-server -detached`), or is not there when the proxy starts.

Every affected client gets Connection.Close with a real reply code (the broker's own when the
broker sent one) within 1 s, the proxy stays up and reports the outage on /healthz and /pools,
refuses new clients with 320 CONNECTION_FORCED while the broker is away and serves them as soon
as it is back.

The file is named to run last: it takes RabbitMQ away from everything else for a while. The
``broker_restored`` fixture always brings it back (and waits until it accepts logins), whatever
the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from pamqp import commands

from tests.support.broker import BROKER_HOST, BROKER_PORT, Aux, rabbitmqctl
from tests.support.pika_client import close_reason
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import http_request, metric_sample
from tests.support.raw_client import RawClient, amqp_answers
from tests.support.targets import ProxyFactory
from tests.support.util import free_port, wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")

UPSTREAM = f"amqp://{BROKER_HOST}:{BROKER_PORT}"
BROKER_SHUTDOWN = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
UPSTREAM_LOST = "CONNECTION_FORCED - upstream connection lost"


def broker_accepts_logins() -> bool:
    try:
        pika.BlockingConnection(
            pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, connection_attempts=1)
        ).close()
    except pika.exceptions.AMQPError:
        return False
    return True


def bring_broker_back() -> None:
    """start_app when the node runs without its app, else start the node; then wait until
    it accepts logins."""
    if broker_accepts_logins():
        return
    node_up = subprocess.run(
        ["rabbitmqctl", "-q", "eval", "ok."], capture_output=True, timeout=30
    ).returncode == 0  # fmt: skip
    if node_up:
        rabbitmqctl("start_app", check=False, timeout=120)
    else:
        subprocess.run(
            ["rabbitmq-server", "-detached"], capture_output=True, timeout=60, check=False
        )
    wait_for(broker_accepts_logins, 120, interval=0.5, what="RabbitMQ accepting logins again")


@pytest.fixture
def broker_restored() -> Iterator[None]:
    assert broker_accepts_logins(), "RabbitMQ must be up before a broker fault test"
    try:
        yield
    finally:
        bring_broker_back()


def healthz(p: ProxyProcess) -> tuple[int, str]:
    return http_request(p.http_port, "/healthz")


def pools(p: ProxyProcess) -> list[dict[str, object]]:
    status, body = http_request(p.http_port, "/pools")
    assert status == 200, body
    return list(json.loads(body))


def clients_on_two_upstreams(p: ProxyProcess, aux: Aux) -> list[pika.BlockingConnection]:
    """Three clients with a channel each: two of guest (one shared upstream connection) and
    one of another user (a second one)."""
    conns = [p.connect(), p.connect(), p.connect(aux.user, aux.password)]
    for conn in conns:
        conn.channel().queue_declare("", exclusive=True)
    assert len(p.upstream_local_ports()) == 2
    return conns


def closes(conns: list[pika.BlockingConnection], timeout: float) -> list[tuple[int, str, float]]:
    """Drive the connections until each is closed by the server: (code, text, when)."""
    got: dict[int, tuple[int, str, float]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(conns):
        assert time.monotonic() < deadline, f"only {len(got)} of {len(conns)} closed: {got}"
        for i, conn in enumerate(conns):
            if i in got:
                continue
            try:
                conn.process_data_events(time_limit=0.01)
            except pika.exceptions.ConnectionClosedByBroker as exc:
                got[i] = (exc.reply_code, exc.reply_text, time.monotonic())
            except pika.exceptions.AMQPConnectionError as exc:
                got[i] = (0, repr(exc), time.monotonic())
    return [got[i] for i in range(len(conns))]


def refused_while_down(p: ProxyProcess, text_prefix: str, within: float) -> None:
    """A new client gets Connection.Close 320 (at Connection.Open) and no hang."""
    started = time.monotonic()
    with RawClient(p.host, p.port, timeout=10) as c:
        res = c.handshake()
    assert "open_ok" not in res
    close = res["close"]
    assert isinstance(close, commands.Connection.Close)
    assert close.reply_code == 320, (close.reply_code, close.reply_text)
    assert close.reply_text.startswith(text_prefix), close.reply_text
    assert time.monotonic() - started < within
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        p.connect().close()
    code, text = close_reason(info.value)
    assert code == 320 and text.startswith(text_prefix), (code, text)


def served(p: ProxyProcess) -> None:
    conn = p.connect()
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, b"served again")
    wait_for(lambda: ch.basic_get(q, auto_ack=True)[2] == b"served again", 5, what="a roundtrip")
    conn.close()


def unhealthy_because_unreachable(p: ProxyProcess, upstream: str) -> bool:
    status, body = healthz(p)
    return status == 503 and body.startswith(f"upstream {upstream} unreachable: ")


def assert_outage_reported(p: ProxyProcess) -> None:
    assert p.running, "the proxy exited"
    wait_for(
        lambda: unhealthy_because_unreachable(p, UPSTREAM),
        6,
        what="/healthz reporting the broker unreachable",
    )
    wait_for(
        lambda: all(e["upstream_connections"] == 0 for e in pools(p)),
        5,
        what="/pools without upstream connections",
    )
    assert p.upstream_local_ports() == set()
    wait_for(
        lambda: metric_sample(p.http_port, "amqproxy_upstream_connections") == 0,
        5,
        what="amqproxy_upstream_connections 0",
    )


# --------------------------------------------------------------------------- broker absent


class TcpRelay:
    """Forwards a loopback port to RabbitMQ: the broker "appears" on that port. With
    `dies_at_start_ok`, each connection ends when the client's Connection.StartOk comes (what
    follows its protocol header): a node that dies during the handshake."""

    def __init__(self, port: int, dies_at_start_ok: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.socks: list[socket.socket] = []
        self.dies_at_start_ok = dies_at_start_ok
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                upstream = socket.create_connection((BROKER_HOST, BROKER_PORT))
                self.socks += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        chunks = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                chunks += 1
                if self.dies_at_start_ok and chunks == 2 and src in self.socks[::2]:
                    for s in (src, dst):
                        s.close()
                    return
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def test_broker_unreachable_at_start_then_appearing(proxy_factory: ProxyFactory) -> None:
    port = free_port()
    upstream = f"amqp://127.0.0.1:{port}"
    p = proxy_factory(
        "--upstream-connect-timeout", "1", "-t", "60", upstream=upstream, upstream_port=port
    )
    assert isinstance(p, ProxyProcess)
    # it started, and says why it is not healthy
    wait_for(
        lambda: unhealthy_because_unreachable(p, upstream),
        5,
        what="/healthz 503 upstream unreachable",
    )
    p.wait_log(rf"upstream {upstream} unreachable: ")
    refused_while_down(p, f"CONNECTION_FORCED - upstream {upstream} unreachable: ", within=2)
    relay = TcpRelay(port)
    try:
        served(p)  # at once: the first client after the broker appeared
        wait_for(lambda: healthz(p) == (200, "OK\n"), 6, what="/healthz OK again")
        p.wait_log(rf"upstream {upstream} reachable again")
    finally:
        p.close_clients()
        relay.close()


def test_a_node_that_dies_during_the_handshake_is_failed_over_not_taken_for_a_refusal(
    proxy_factory: ProxyFactory,
) -> None:
    """RabbitMQ announces authentication_failure_close: it refuses a login with Connection.Close
    403, never by dropping the socket. A connection that ends after the StartOk is then the
    node's failure: the client is served by the next node. (The proxy took it for a refused
    login, and the client got 403.)"""
    port = free_port()
    relay = TcpRelay(port, dies_at_start_ok=True)
    dying = f"amqp://127.0.0.1:{port}"
    try:
        p = proxy_factory(
            "--upstream-policy", "ordered", "-t", "60",
            upstream=f"{dying},amqp://{BROKER_HOST}:{BROKER_PORT}", direct_ok=False,
        )  # fmt: skip
        assert isinstance(p, ProxyProcess)
        conn = p.connect()
        conn.channel().queue_declare("", exclusive=True)
        conn.close()
        p.wait_log(
            rf"upstream node {dying} is down: closed the connection: .* during the handshake"
        )
    finally:
        relay.close()


# --------------------------------------------------------------------------- broker stops


def test_stop_app_closes_every_client_with_the_brokers_320_and_start_app_serves_again(
    proxy_factory: ProxyFactory, aux: Aux, broker_restored: None
) -> None:
    p = proxy_factory("-t", "60", "--upstream-connect-timeout", "2")
    assert isinstance(p, ProxyProcess)
    conns = clients_on_two_upstreams(p, aux)
    oracle = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    stopper = threading.Thread(target=rabbitmqctl, args=("stop_app",), kwargs={"timeout": 120})
    stopper.start()
    try:
        (direct, *through_proxy) = closes([oracle, *conns], timeout=30)
    finally:
        stopper.join(120)
    assert direct[:2] == (320, BROKER_SHUTDOWN), direct  # what the broker says ...
    for code, text, when in through_proxy:  # ... reaches every client, within 1 s
        assert (code, text) == (320, BROKER_SHUTDOWN)
        assert when - direct[2] < 1.0, when - direct[2]
    assert_outage_reported(p)
    refused_while_down(p, f"CONNECTION_FORCED - upstream {UPSTREAM} unreachable: ", within=3)
    rabbitmqctl("start_app", timeout=120)
    wait_for(amqp_answers, 60, interval=0.2, what="RabbitMQ answering AMQP")
    wait_for(broker_accepts_logins, 30, interval=0.2, what="RabbitMQ accepting logins")
    served(p)
    wait_for(lambda: healthz(p) == (200, "OK\n"), 6, what="/healthz OK again")


# --------------------------------------------------------------------------- broker dies


def test_killed_broker_closes_every_client_with_320_and_the_restarted_one_serves(
    proxy_factory: ProxyFactory, aux: Aux, broker_restored: None
) -> None:
    p = proxy_factory("-t", "60", "--upstream-connect-timeout", "2")
    assert isinstance(p, ProxyProcess)
    conns = clients_on_two_upstreams(p, aux)
    beam = int(rabbitmqctl("-q", "eval", "os:getpid().").strip().strip('"'))
    killed_at = time.monotonic()
    os.kill(beam, signal.SIGKILL)
    for code, text, when in closes(conns, timeout=10):
        assert (code, text) == (320, UPSTREAM_LOST)
        assert when - killed_at < 1.0, when - killed_at
    assert_outage_reported(p)
    refused_while_down(p, f"CONNECTION_FORCED - upstream {UPSTREAM} unreachable: ", within=3)
    p.wait_log(r"upstream connection to amqp://127\.0\.0\.1:5672 \(user='guest' vhost='/'\) "
               r"connection lost")  # fmt: skip
    bring_broker_back()
    served(p)
    wait_for(lambda: healthz(p) == (200, "OK\n"), 6, what="/healthz OK again")
