"""Publishers under repeated failures: nothing a client was told is sent is lost.

PHP-pattern clients (php-amqp), raw clients that publish and close, and pika clients with
publisher confirms publish persistent messages to a durable quorum queue through the proxy,
while the broker's connections to the proxy are closed again and again (`rabbitmqctl
close_connection`, 320), or the proxy's workers are killed. Every message whose client got
its Connection.CloseOk (or, confirming, its Basic.Ack) must be in the queue, at least once.
The duplicates the re-sends made are printed (docs/operations.md, "Delivery guarantee").
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pika
import psutil
import pytest

from tests.support.broker import (
    BROKER_HOST,
    BROKER_PORT,
    Names,
    close_broker_connections,
)
from tests.support.proxy import ProxyProcess
from tests.support.publishers import load_with_failures
from tests.support.targets import ProxyFactory

pytestmark = pytest.mark.timeout(300)

#: The issue's bar: at least this many messages told sent, over at least this many failures.
MESSAGES, FAILURES = 20_000, 10


def quorum_queue(names: Names) -> str:
    q = names.queue("no-loss")
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    conn.channel().queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    return q


def run_load(
    p: ProxyProcess, q: str, fail: Callable[[], int], php_told: bool = True
) -> dict[str, float]:
    tally = load_with_failures(p.host, p.port, p.http_port, q, fail, MESSAGES, FAILURES, php_told)
    print(f"\n{tally}")
    assert not tally["lost"], tally
    assert tally["failures"] >= FAILURES and tally["told"] >= MESSAGES, tally
    return tally


def test_nothing_told_sent_is_lost_when_upstream_connections_are_closed(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("-t", "30", "--workers", "2")
    assert isinstance(p, ProxyProcess)
    q = quorum_queue(names)

    def close_upstream() -> int:
        return close_broker_connections(p.upstream_local_ports(), "itest: upstream failure")

    tally = run_load(p, q, close_upstream)
    # the clients that only publish go on unaware: next to nothing fails
    assert tally["php_failed_cycles"] == 0 and tally["publisher_failed_connections"] == 0, tally


@pytest.mark.parametrize("policy", ["confirmed"])
def test_a_killed_worker_loses_nothing_its_clients_were_told_is_sent(
    proxy_factory: ProxyFactory, names: Names, policy: str
) -> None:
    """With close_policy confirmed, a client is told its messages are sent once the broker
    confirmed them: a worker SIGKILLed with messages in memory loses none of those (its
    clients get an error, or their socket closes, for the ones it held). The php-amqp
    clients are load only: their disconnect() reports success when the socket drops before
    the CloseOk (docs/operations.md), so the raw and confirming clients are the witnesses."""
    p = proxy_factory("-t", "30", "--workers", "2", "--close-policy", policy)
    assert isinstance(p, ProxyProcess)
    q = quorum_queue(names)

    def kill_a_worker() -> int:
        assert p.proc is not None
        pids = [child.pid for child in psutil.Process(p.proc.pid).children()]
        if not pids:
            return 0
        os.kill(pids[int(time.monotonic()) % len(pids)], signal.SIGKILL)
        return 1

    run_load(p, q, kill_a_worker, php_told=False)
