"""Which broker node a new upstream connection goes to, and what a failure does to a node."""

from __future__ import annotations

import asyncio
import time

from amqproxy_mp.config import Upstream
from amqproxy_mp.metrics import Stats
from amqproxy_mp.proxy.nodes import MAX_BACKOFF, Nodes, NodeState, attempts

A, B, C = (Upstream("amqp", f"10.0.0.{i}", 5672) for i in (1, 2, 3))


def nodes(policy: str = "spread", *urls: Upstream) -> Nodes:
    first, *others = urls or (A, B, C)
    return Nodes(
        Upstream(first.scheme, first.host, first.port, tuple(others)), policy, 2.0, None, Stats()
    )


def names(found: list) -> list[str]:  # type: ignore[type-arg]
    return [node.address for node in found]


def test_spread_picks_the_node_with_the_fewest_connections() -> None:
    n = nodes()
    n.nodes[0].connections, n.nodes[1].connections, n.nodes[2].connections = 3, 1, 2
    assert names(n.candidates()) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]


def test_ordered_keeps_the_configured_order() -> None:
    n = nodes("ordered")
    n.nodes[0].connections = 5
    assert names(n.candidates()) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_a_failed_node_goes_last_and_backs_off() -> None:
    n = nodes("ordered")
    first = n.nodes[0]
    n.failed(first, "unreachable")
    assert first.state is NodeState.DOWN
    assert names(n.candidates()) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
    assert n._stats.failovers == 1
    assert 0.9 < first.retry_at - time.monotonic() <= 1.0
    for _ in range(20):  # more news of the same outage (its other connections): one failure
        n.failed(first, "connection lost")
    assert first.failures == 1 and n._stats.failovers == 1
    due = []
    for _ in range(2000):  # failed probes: 2, 4, 8 ... 30 s, and no overflow however many
        n._back_off(first)
        due.append(first.retry_at - time.monotonic())
    assert 1.9 < due[0] <= 2.0 and 3.9 < due[1] <= 4.0
    assert 29.9 < due[-1] <= MAX_BACKOFF
    n.succeeded(first)
    assert first.state is NodeState.UP and first.failures == 0
    assert dict(n._stats.node_state_changes) == {"amqp://10.0.0.1:5672": 2}


def test_when_no_node_is_up_clients_try_the_down_ones_soonest_due_first() -> None:
    n = nodes()
    for node in (n.nodes[2], n.nodes[0], n.nodes[1]):
        n.failed(node, "refused")
        time.sleep(0.01)
    assert not n.any_up
    assert names(n.candidates()) == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]


def test_spread_counts_the_attempts_under_way() -> None:
    n = nodes()
    n.nodes[0].attempting = 2
    n.nodes[1].connections = 1
    assert names(n.candidates()) == ["10.0.0.3", "10.0.0.2", "10.0.0.1"]


def test_each_node_gets_its_own_timeout_within_the_clients_budget() -> None:
    n = nodes()
    assert [t for _, t in attempts(n, 10.0)] == [2.0, 2.0, 2.0]
    single = nodes("spread", A)
    assert [round(t) for _, t in attempts(single, 10.0)] == [10]  # one URL: as before


def test_a_name_with_several_addresses_is_one_node_each() -> None:
    n = Nodes(Upstream("amqp", "localhost", 5672), "spread", 2.0, None, Stats())
    asyncio.run(_resolve(n))
    assert {node.address for node in n.nodes} >= {"127.0.0.1"}
    assert all(node.url.host == "localhost" for node in n.nodes)
    if len(n.nodes) > 1:  # one node per address, each named with it
        assert n.nodes[0].name.startswith("amqp://localhost:5672 (")
    else:  # one address: the URL's name, as with a single URL before
        assert n.nodes[0].name == "amqp://localhost:5672"


async def _resolve(n: Nodes) -> None:
    await n.resolve(asyncio.get_running_loop())
