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


def test_spread_finds_a_node_with_more_than_an_even_share_misplaced() -> None:
    n = nodes()
    a, b, c = n.nodes
    for counts, expected in [
        ((3, 3, 0), [True, True, False]),  # a failed node is back: 6 over 3 is 2 each
        ((2, 3, 0), [False, True, False]),
        ((2, 2, 0), [False, False, False]),  # 4 over 3: at most 2; the next opens on c
        ((1, 0, 0), [False, False, False]),
        ((3, 0, 0), [True, False, False]),
    ]:
        a.connections, b.connections, c.connections = counts
        assert [n.misplaced(x) for x in (a, b, c)] == expected, counts
    a.connections, b.connections, c.connections = 3, 3, 0
    n.failed(c, "gone again")
    assert not n.misplaced(a) and not n.misplaced(b)  # 6 over 2 up nodes is 3 each
    a.outdated = True  # its address went from the name's
    assert n.misplaced(a)


def test_ordered_finds_every_connection_off_the_first_healthy_node_misplaced() -> None:
    n = nodes("ordered")
    a, b, c = n.nodes
    a.connections, b.connections, c.connections = 1, 2, 0
    assert [n.misplaced(x) for x in (a, b, c)] == [False, True, False]
    n.failed(a, "gone")
    assert not n.misplaced(b)  # the first healthy one now


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


def test_the_first_connection_waits_for_the_names_to_be_looked_up() -> None:
    """Before the first tick a name is one node, its own name as the address: connections
    made then all went to its first address. (The proxy's first clients all landed on one
    node of a name with three addresses.)"""
    n = Nodes(Upstream("amqp", "localhost", 5672), "spread", 2.0, None, Stats())
    assert [node.address for node in n.nodes] == ["localhost"]

    async def first_connection() -> None:
        loop = asyncio.get_running_loop()
        await n.resolved(loop, 5.0)
        assert "localhost" not in {node.address for node in n.nodes}
        resolving = n._resolution
        await n.resolved(loop, 5.0)  # once is enough
        assert n._resolution is resolving

    asyncio.run(first_connection())
