"""A RabbitMQ cluster behind one proxy, on a real 3-node cluster (tests/support/cluster.py):
a node killed under load, a maintenance drain, every node down and back, spread pools."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.support.cluster import BASE, Cluster, ClusterNode
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import http_request, metric_sample
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for

pytestmark = pytest.mark.timeout(600)

PHP = Path(__file__).parent / "php" / "cycles.php"
QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.start()
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def all_nodes_up(cluster: Cluster) -> Iterator[None]:
    """Each test starts (and leaves the next one) with every node serving."""
    yield
    for node in cluster.nodes:
        if node not in cluster.running():
            node.restart()


def proxy_for(proxy_factory: ProxyFactory, cluster: Cluster, *options: str) -> ProxyProcess:
    p = proxy_factory(
        "--upstream-node-connect-timeout", "1", *options,
        upstream=",".join(cluster.urls), direct_ok=False,
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    return p


def direct(node: ClusterNode) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", node.port))


def connection_nodes(cluster: Cluster) -> dict[str, int]:
    """How many client connections (the proxy's, in these tests) each node has: the node is
    in each connection's pid, <amqproxy-test-1@localhost.1.2.3>."""
    counts = {node.name: 0 for node in cluster.running()}
    pids = cluster.running()[0].ctl("list_connections", "--quiet", "--no-table-headers", "pid")
    for pid in pids.split():
        name = pid.strip("<>").rsplit(".", 3)[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def php_cycles(p: ProxyProcess, queue: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["php", str(PHP), p.host, str(p.port), "guest", "guest", "/", queue, str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cycles_of(processes: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    found = []
    for proc in processes:
        out, err = proc.communicate(timeout=120)
        assert out.strip(), f"php printed nothing: {err}"
        found.extend(json.loads(line) for line in out.splitlines())
    return sorted(found, key=lambda c: c["t"])


class ConfirmingPublisher(threading.Thread):
    """Publishes with confirms through the proxy until stopped; reconnects when told to go
    away. `confirmed` is what the broker confirmed."""

    def __init__(self, p: ProxyProcess, queue: str) -> None:
        super().__init__(daemon=True)
        self.p, self.queue = p, queue
        self.confirmed: list[str] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            try:
                conn = pika.BlockingConnection(
                    pika.ConnectionParameters(self.p.host, self.p.port, socket_timeout=5)
                )
                ch = conn.channel()
                ch.confirm_delivery()
                while not self.stopping.is_set():
                    body = f"confirmed-{i:06d}"
                    i += 1
                    ch.basic_publish("", self.queue, body.encode(), mandatory=False)
                    self.confirmed.append(body)  # (basic_publish returns once confirmed)
                conn.close()
            except (pika.exceptions.AMQPError, OSError):
                self.failures += 1
                time.sleep(0.05)


def queue_bodies(node: ClusterNode, queue: str) -> set[str]:
    conn = direct(node)
    ch = conn.channel()
    bodies = set()
    while True:
        method, _, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        bodies.add(body.decode())
    conn.close()
    return bodies


def test_a_node_killed_under_load_fails_only_what_was_in_flight(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    """4 PHP-pattern clients (php-amqp) and a confirming publisher, through the proxy; the
    node the proxy's connections are on is killed (SIGKILL). Every cycle that starts after
    the kill succeeds, connecting fast, and no confirmed message is lost (a quorum queue)."""
    p = proxy_for(proxy_factory, cluster)
    queue = f"itest-cluster-{uuid.uuid4().hex[:8]}"
    setup = direct(cluster.nodes[0])
    setup.channel().queue_declare(queue, durable=True, arguments=QUORUM)
    setup.close()
    publisher = ConfirmingPublisher(p, queue)
    publisher.start()
    php = [php_cycles(p, queue, 8) for _ in range(4)]
    time.sleep(3)
    counts = connection_nodes(cluster)
    victim = next(n for n in cluster.nodes if n.name == max(counts, key=lambda k: counts[k]))
    victim.kill()
    killed_at = time.time()
    cycles = cycles_of(php)
    time.sleep(1)
    publisher.stopping.set()
    publisher.join(timeout=30)

    before = [c for c in cycles if c["t"] < killed_at]
    after = [c for c in cycles if c["t"] >= killed_at]
    assert before and all(c["ok"] for c in before[:-8]), before[-12:]
    assert len(after) > 20, len(after)
    failed = [c for c in after if not c["ok"]]
    assert not failed, failed[:5]
    latencies = sorted(c["connect_ms"] for c in after)
    assert latencies[int(len(latencies) * 0.99) - 1] < 1000, latencies[-10:]
    survivor = next(n for n in cluster.nodes if n is not victim)
    assert set(publisher.confirmed) <= queue_bodies(survivor, queue)
    assert metric_sample(p.http_port, "amqproxy_upstream_failovers_total") >= 1
    assert metric_sample(p.http_port, "amqproxy_upstream_node_up", node=victim.url) == 0
    status, text = http_request(p.http_port, "/healthz")
    assert status == 200 and f"upstream nodes down: {victim.url}" in text, text
    direct(survivor).channel().queue_delete(queue)


def test_a_drained_node_gets_no_new_connections_and_is_used_again_once_revived(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    """`rabbitmq-upgrade drain` closes the node's connections (320); the proxy's clients
    reconnect elsewhere and no new connection fails; after `revive` it is used again."""
    p = proxy_for(proxy_factory, cluster, "--upstream-policy", "ordered")
    first = cluster.nodes[0]
    conn = p.connect()
    conn.channel()
    assert connection_nodes(cluster)[first.name] == 1
    subprocess.run(["rabbitmq-upgrade", "-n", first.name, "drain"], check=True, timeout=60,
                   capture_output=True)  # fmt: skip
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        while True:
            conn.process_data_events(time_limit=0.2)
    assert closed.value.reply_code == 320 and first.url in closed.value.reply_text
    for _ in range(20):  # new clients: none fails, none goes to the drained node
        c = p.connect()
        c.channel().queue_declare("", exclusive=True)
        c.close()
    assert connection_nodes(cluster).get(first.name, 0) == 0
    subprocess.run(["rabbitmq-upgrade", "-n", first.name, "revive"], check=True, timeout=60,
                   capture_output=True)  # fmt: skip
    p.wait_log(rf"upstream node {first.url} is up again", timeout=40)
    # a new pool (another user) needs a new connection: ordered, it goes to the first again
    first.ctl("add_user", "itest-revived", "itest-revived")
    first.ctl("set_permissions", "itest-revived", ".*", ".*", ".*")
    c = p.connect("itest-revived", "itest-revived")
    c.channel()
    assert connection_nodes(cluster)[first.name] == 1
    c.close()
    first.ctl("delete_user", "itest-revived")


def test_every_node_down_is_refused_clearly_and_service_resumes_when_one_returns(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    p = proxy_for(proxy_factory, cluster, "--upstream-connect-timeout", "5")
    for node in cluster.nodes:
        node.kill()
    started = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        p.connect()  # (pika calls a close at Connection.Open a probable access refusal)
    assert time.monotonic() - started < 5
    assert "(320) 'CONNECTION_FORCED - no upstream node: " in str(refused.value), refused.value
    wait_for(lambda: http_request(p.http_port, "/healthz")[0] == 503, what="/healthz 503")
    first = cluster.nodes[0]
    first.ctl("force_boot")
    first.start()
    wait_for(lambda: first in cluster.running(), timeout=120, what="node 1 back")
    back = time.monotonic()
    while True:
        try:
            p.connect().close()
            break
        except pika.exceptions.AMQPError:
            assert time.monotonic() - back < 2, "no service 2 s after a node returned"
            time.sleep(0.05)
    for node in cluster.nodes[1:]:
        node.restart()


def test_spread_puts_pools_evenly_on_the_nodes_and_so_the_quorum_leaders(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    users = [f"itest-spread-{i}" for i in range(30)]
    definitions = {
        "users": [{"name": u, "password": u, "tags": ""} for u in users],
        "permissions": [
            {"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"} for u in users
        ],
    }
    path = BASE / "users.json"  # (the CLI runs as the rabbitmq user: not under /tmp/pytest-*)
    path.write_text(json.dumps(definitions))
    path.chmod(0o644)
    cluster.nodes[0].ctl("import_definitions", str(path))
    p = proxy_for(proxy_factory, cluster)
    queues = [f"itest-spread-{uuid.uuid4().hex[:6]}-{i}" for i in range(30)]
    held = []
    for user, queue in zip(users, queues, strict=True):
        c = p.connect(user, user)
        c.channel().queue_declare(queue, durable=True, arguments=QUORUM)
        held.append(c)
    counts = connection_nodes(cluster)
    assert sorted(counts.values()) == [10, 10, 10], counts
    leaders = (
        cluster.nodes[0]
        .ctl("list_queues", "--quiet", "--no-table-headers", "name", "leader")
        .split("\n")
    )
    by_leader: dict[str, int] = {}
    for line in leaders:
        name, _, leader = line.partition("\t")
        if name in queues:
            by_leader[leader.strip()] = by_leader.get(leader.strip(), 0) + 1
    assert sorted(by_leader.values()) == [10, 10, 10], by_leader
    for c, queue in zip(held, queues, strict=True):
        c.channel().queue_delete(queue)
        c.close()
    for user in users:
        cluster.nodes[0].ctl("delete_user", user)
