"""A RabbitMQ cluster behind one proxy, on a real 3-node cluster (tests/support/cluster.py):
a node killed under load, a maintenance drain, every node down and back, spread pools, the
skew a drain left rebalanced, a rolling restart, a host name with one address per node."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from tests.support import publishers
from tests.support.cluster import (
    BASE,
    SHARED_PORT,
    Cluster,
    ClusterNode,
    shared_name_in_hosts,
)
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import http_request, metric_sample
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for

pytestmark = pytest.mark.timeout(600)

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


def connection_nodes(cluster: Cluster, users: str = "") -> dict[str, int]:
    """How many client connections (of users whose names start with `users`) each node has:
    the node is in each connection's pid, <amqproxy-test-1@localhost.1.2.3>."""
    counts = {node.name: 0 for node in cluster.running()}
    rows = cluster.running()[0].ctl(
        "list_connections", "--quiet", "--no-table-headers", "pid", "user"
    )
    for row in rows.splitlines():
        pid, _, user = row.partition("\t")
        if pid.strip() and user.strip().startswith(users):
            name = pid.strip().strip("<>").rsplit(".", 3)[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


def php_cycles(p: ProxyProcess, queue: str, seconds: float) -> subprocess.Popen[str]:
    return publishers.php_cycles(p.host, p.port, queue, seconds)


class ConfirmingPublisher(threading.Thread):
    """Publishes with confirms through the proxy until stopped; reconnects when told to go
    away (`failures`). `confirmed` is what the broker confirmed, `nacked` what it refused."""

    def __init__(self, p: ProxyProcess, queue: str) -> None:
        super().__init__(daemon=True)
        self.p, self.queue = p, queue
        self.confirmed: list[str] = []
        self.failures = 0
        self.nacked = 0
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
                    try:
                        ch.basic_publish("", self.queue, body.encode(), mandatory=False)
                    except pika.exceptions.NackError:
                        # the broker's refusal (a quorum queue electing a new leader nacks),
                        # as it would be directly
                        self.nacked += 1
                        continue
                    self.confirmed.append(body)  # (basic_publish returns once confirmed)
                conn.close()
            except (pika.exceptions.AMQPError, OSError):
                self.failures += 1
                time.sleep(0.05)


def queue_bodies(node: ClusterNode, queue: str) -> set[str]:
    return set(ordered_bodies(node, queue))


def ordered_bodies(node: ClusterNode, queue: str) -> list[str]:
    conn = direct(node)
    ch = conn.channel()
    bodies = []
    while (got := ch.basic_get(queue, auto_ack=True))[0] is not None:
        bodies.append(got[2].decode())
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
    php = [php_cycles(p, queue, 15) for _ in range(4)]
    time.sleep(3)
    counts = connection_nodes(cluster)
    victim = next(n for n in cluster.nodes if n.name == max(counts, key=lambda k: counts[k]))
    assert all(proc.poll() is None for proc in php), "the PHP clients ended before the kill"
    victim.kill()
    killed_at = time.time()
    cycles = publishers.cycles_of(php)
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
    # it only published: it went on through another node, its connection never closed
    assert publisher.failures == 0, publisher.failures
    assert metric_sample(p.http_port, "amqproxy_upstream_failovers_total") >= 1
    assert metric_sample(p.http_port, "amqproxy_upstream_node_up", node=victim.url) == 0
    status, text = http_request(p.http_port, "/healthz")
    assert status == 200 and f"upstream nodes down: {victim.url}" in text, text
    cleanup = direct(survivor)
    cleanup.channel().queue_delete(queue)
    cleanup.close()


def test_a_drained_node_gets_no_new_connections_and_is_used_again_once_revived(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    """`rabbitmq-upgrade drain` closes the node's connections (320); the proxy's clients
    reconnect elsewhere and no new connection fails; after `revive` it is used again."""
    p = proxy_for(proxy_factory, cluster, "--upstream-policy", "ordered")
    first = cluster.nodes[0]
    queue = f"itest-drain-{uuid.uuid4().hex[:8]}"
    setup = direct(cluster.nodes[1])
    setup.channel().queue_declare(queue, durable=True, arguments=QUORUM)
    setup.close()
    consumer = p.connect()  # (a consumer cannot move: it is closed)
    consumer.channel().basic_consume(queue, lambda *_: None)
    publisher = p.connect("guest", "guest")
    ch = publisher.channel()
    ch.confirm_delivery()
    ch.basic_publish("", queue, b"0")
    assert connection_nodes(cluster)[first.name] == 1
    subprocess.run(["rabbitmq-upgrade", "-n", first.name, "drain"], check=True, timeout=60,
                   capture_output=True)  # fmt: skip
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        while True:
            consumer.process_data_events(time_limit=0.2)
    assert closed.value.reply_code == 320 and first.url in closed.value.reply_text
    # the publisher goes on through another node without noticing, in order
    for i in range(1, 50):
        ch.basic_publish("", queue, str(i).encode())
    publisher.close()
    p.wait_log(r"client .* moved from " + re.escape(first.url))
    assert ordered_bodies(cluster.nodes[1], queue) == [str(i) for i in range(50)]
    cleanup = direct(cluster.nodes[1])
    cleanup.channel().queue_delete(queue)
    cleanup.close()
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


@contextlib.contextmanager
def users(cluster: Cluster, prefix: str, count: int) -> Iterator[list[str]]:
    """`count` users (password = name) with every permission on /, deleted after."""
    names = [f"{prefix}-{i}" for i in range(count)]
    definitions = {
        "users": [{"name": u, "password": u, "tags": ""} for u in names],
        "permissions": [
            {"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"} for u in names
        ],
    }
    path = BASE / "users.json"  # (the CLI runs as the rabbitmq user: not under /tmp/pytest-*)
    path.write_text(json.dumps(definitions))
    path.chmod(0o644)
    cluster.nodes[0].ctl("import_definitions", str(path))
    try:
        yield names
    finally:
        for user in names:
            cluster.running()[0].ctl("delete_user", user, check=False)


def upgrade(node: ClusterNode, command: str) -> None:
    """rabbitmq-upgrade drain (maintenance mode: its connections closed, listeners
    suspended) or revive."""
    subprocess.run(["rabbitmq-upgrade", "-n", node.name, command], check=True, timeout=60,
                   capture_output=True)  # fmt: skip


def test_spread_puts_pools_evenly_on_the_nodes_and_so_the_quorum_leaders(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    with users(cluster, "itest-spread", 30) as names:
        spread_pools_and_leaders(cluster, proxy_factory, names)


def spread_pools_and_leaders(
    cluster: Cluster, proxy_factory: ProxyFactory, users: list[str]
) -> None:
    p = proxy_for(proxy_factory, cluster)
    queues = [f"itest-spread-{uuid.uuid4().hex[:6]}-{i}" for i in range(30)]
    held = []
    for user, queue in zip(users, queues, strict=True):
        c = p.connect(user, user)
        c.channel().queue_declare(queue, durable=True, arguments=QUORUM)
        held.append(c)
    counts = connection_nodes(cluster, "itest-spread")
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


def test_a_node_back_from_maintenance_gets_its_share_from_connections_nobody_uses(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    """6 pools spread 2/2/2; node 3 drained: its 2 pools reconnect to nodes 1 and 2 (3/3/0).
    Once it is revived, the proxy closes one unused connection on each of nodes 1 and 2
    (upstream_rebalance), and those pools' next clients open theirs on node 3: 2/2/2."""
    third = cluster.nodes[2]
    with users(cluster, "itest-rebalance", 6) as names:
        p = proxy_for(proxy_factory, cluster, "--idle-connection-timeout", "600")

        def every_user_once() -> None:  # (the PHP pattern: connect, channel, leave)
            for user in names:
                c = p.connect(user, user)
                c.channel().queue_declare("", exclusive=True)
                c.close()

        every_user_once()
        assert sorted(connection_nodes(cluster, "itest-rebalance").values()) == [2, 2, 2]
        upgrade(third, "drain")
        p.wait_log(rf"upstream node {third.url} is down", timeout=20)
        every_user_once()
        counts = connection_nodes(cluster, "itest-rebalance")
        assert counts.get(third.name, 0) == 0 and sum(counts.values()) == 6, counts
        upgrade(third, "revive")
        p.wait_log(rf"upstream node {third.url} is up again", timeout=40)
        wait_for(lambda: p.log_text().count("rebalancing: node") >= 2, what="2 rebalanced")
        every_user_once()
        assert sorted(connection_nodes(cluster, "itest-rebalance").values()) == [2, 2, 2]
        time.sleep(2)  # balanced: nothing more is closed
        assert p.log_text().count("rebalancing: node") == 2


def test_a_rolling_restart_under_load_fails_only_what_was_in_flight(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    """Each node stopped and started again in turn, under the PHP pattern and a confirming
    publisher: /healthz stays 200, a cycle fails only when it was under way on a node as it
    stopped, and no confirmed message is lost."""
    p = proxy_for(proxy_factory, cluster)
    queue = f"itest-rolling-{uuid.uuid4().hex[:8]}"
    setup = direct(cluster.nodes[0])
    setup.channel().queue_declare(queue, durable=True, arguments=QUORUM)
    setup.close()
    statuses: list[int] = []
    watching = threading.Event()

    def watch_health() -> None:
        while not watching.is_set():
            statuses.append(http_request(p.http_port, "/healthz")[0])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    publisher = ConfirmingPublisher(p, queue)
    publisher.start()
    php = [php_cycles(p, queue, 75) for _ in range(4)]
    time.sleep(2)
    stops: list[tuple[float, float]] = []
    for node in cluster.nodes:
        began = time.time()
        node.stop()
        stops.append((began, time.time()))
        node.restart()
        time.sleep(1)
    assert time.time() - stops[0][0] < 70, "the restarts outlasted the PHP clients"
    cycles = publishers.cycles_of(php)
    publisher.stopping.set()
    publisher.join(timeout=30)
    watching.set()
    watcher.join(timeout=5)

    assert len(cycles) > 100, len(cycles)
    failed = [c for c in cycles if not c["ok"]]
    assert len(failed) <= 4 * len(cluster.nodes), failed
    for c in failed:  # under way on the node as it stopped
        assert any(began - 1 <= c["t"] <= ended + 1 for began, ended in stops), (c, stops)
    assert statuses and set(statuses) == {200}, statuses
    assert set(publisher.confirmed) <= queue_bodies(cluster.nodes[0], queue)
    cleanup = direct(cluster.nodes[0])
    cleanup.channel().queue_delete(queue)
    cleanup.close()


def test_a_host_name_with_several_addresses_is_one_node_per_address(
    cluster: Cluster, proxy_factory: ProxyFactory
) -> None:
    """One URL whose host name resolves to the three nodes' addresses: pools spread over all
    three, and each is named in /pools and the metrics by its address."""
    with shared_name_in_hosts(cluster.nodes) as name, users(cluster, "itest-named", 6) as names:
        p = proxy_factory(
            "--upstream-node-connect-timeout", "1",
            upstream=f"amqp://{name}:{SHARED_PORT}", direct_ok=False,
        )  # fmt: skip
        assert isinstance(p, ProxyProcess)
        held = []
        for user in names:
            c = p.connect(user, user)
            c.channel()
            held.append(c)
        assert sorted(connection_nodes(cluster, "itest-named").values()) == [2, 2, 2]
        url = f"amqp://{name}:{SHARED_PORT}"
        labels = {f"{url} ({node.shared_address})" for node in cluster.nodes}

        def pools_nodes() -> list[str]:  # (workers report every second)
            pools = json.loads(http_request(p.http_port, "/pools")[1])
            return sorted(node for entry in pools for node in entry["nodes"])

        wait_for(lambda: len(pools_nodes()) == 6, what="/pools lists the 6 connections")
        assert set(pools_nodes()) == labels, pools_nodes()
        for label in labels:
            assert metric_sample(p.http_port, "amqproxy_upstream_node_up", node=label) == 1
            connections = metric_sample(
                p.http_port, "amqproxy_upstream_node_connections", node=label
            )
            assert connections == 2, (label, connections)
        for c in held:
            c.close()
