"""The broker's nodes, as one worker sees them: which are up, and where a new connection goes.

A node is one address of one configured URL (a host name that resolves to several addresses
is several nodes). A connection attempt that fails (refused, timed out, a TLS or handshake
failure that is not the client's login) marks its node down, and the attempt moves on to the
next node at once; so does an established connection that ends without the proxy asking.
A down node is tried again after 1, 2, 4 ... 30 s, by one probe in the background (a TCP
connection that must get the broker's Connection.Start), while clients go elsewhere; only
when no node is up do clients try the down ones themselves. Logs say when a node changes
state, never once per failed attempt.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from amqproxy_mp.amqp import spec
from amqproxy_mp.config import Upstream
from amqproxy_mp.metrics import Stats

log = logging.getLogger(__name__)

#: Back-off of a down node: 1, 2, 4 ... seconds, at most this.
MAX_BACKOFF: Final = 30.0
#: Names are resolved again this often (and when a node fails).
RESOLVE_EVERY: Final = 30.0


class NodeState(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(eq=False)
class Node:
    """One address of one configured URL."""

    url: Upstream
    #: The address connections go to (the URL's host when it is an address already).
    address: str
    ssl_context: ssl.SSLContext | None
    state: NodeState = NodeState.UP
    #: Failures in a row, and when a down node may be tried again.
    failures: int = 0
    retry_at: float = 0.0
    #: This worker's open connections to it.
    connections: int = 0
    probing: bool = field(default=False)

    @property
    def name(self) -> str:
        """How logs, metrics and clients' error texts name it: its URL, and the address
        when the URL's host is a name."""
        return self.url.url if self.address == self.url.host else f"{self.url.url} ({self.address})"

    @property
    def server_hostname(self) -> str | None:
        """The name its certificate is checked against (amqps://)."""
        return self.url.host if self.ssl_context is not None else None


class Nodes:
    """A worker's view of the broker's nodes."""

    def __init__(
        self,
        upstream: Upstream,
        policy: str,
        node_timeout: float,
        ssl_context: ssl.SSLContext | None,
        stats: Stats,
    ) -> None:
        self.urls = upstream.nodes
        self.policy = policy
        #: Seconds one attempt on one node may take (the whole budget with a single node).
        self.node_timeout = node_timeout if len(self.urls) > 1 else float("inf")
        self._ssl_context = ssl_context
        self._stats = stats
        self.nodes: list[Node] = [self._node(url, url.host) for url in self.urls]
        self._resolved_at = 0.0
        self._probes: set[asyncio.Task[None]] = set()

    def _node(self, url: Upstream, address: str) -> Node:
        return Node(url, address, self._ssl_context if url.tls else None)

    # --- which node ---------------------------------------------------------------------

    def candidates(self) -> list[Node]:
        """The nodes a new connection should try, in order: the healthy ones (the policy
        decides their order), or, when none is up, the down ones, soonest due first."""
        up = [node for node in self.nodes if node.state is NodeState.UP]
        if up:
            return sorted(up, key=lambda n: n.connections) if self.policy == "spread" else up
        return sorted(self.nodes, key=lambda n: n.retry_at)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def any_up(self) -> bool:
        return any(node.state is NodeState.UP for node in self.nodes)

    # --- what happened to a node --------------------------------------------------------

    def succeeded(self, node: Node) -> None:
        """A connection to the node completed its handshake."""
        node.failures = 0
        if node.state is not NodeState.UP:
            self._set_state(node, NodeState.UP, "a connection succeeded")

    def failed(self, node: Node, reason: str) -> None:
        """A connection attempt to the node failed, or an established one ended unasked."""
        node.failures += 1
        node.retry_at = time.monotonic() + min(MAX_BACKOFF, 2.0 ** (node.failures - 1))
        self._resolved_at = 0.0  # resolve names again at the next refresh
        if node.state is NodeState.UP:
            self._stats.failovers += 1
            self._set_state(node, NodeState.DOWN, reason)

    def _set_state(self, node: Node, state: NodeState, reason: str) -> None:
        was = node.state
        node.state = state
        self._stats.node_state_changes[node.name] += 1
        if state is NodeState.UP:
            log.warning("upstream node %s is up again (was %s): %s", node.name, was.value, reason)
        else:
            log.warning(
                "upstream node %s is down: %s; retrying in %.0f s",
                node.name,
                reason,
                node.retry_at - time.monotonic(),
            )

    # --- background: names and probes --------------------------------------------------

    def tick(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Every worker tick: resolve names when due, probe the down nodes that are due
        (only while another node is up: else clients try them themselves)."""
        if now - self._resolved_at >= RESOLVE_EVERY:
            self._resolved_at = now
            self._spawn(loop, self.resolve(loop))
        if not self.any_up:
            return
        for node in self.nodes:
            if node.state is NodeState.DOWN and not node.probing and now >= node.retry_at:
                node.probing = True
                self._spawn(loop, self._probe(loop, node))

    def _spawn(self, loop: asyncio.AbstractEventLoop, step: object) -> None:
        task: asyncio.Task[None] = loop.create_task(step)  # type: ignore[arg-type]
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def resolve(self, loop: asyncio.AbstractEventLoop) -> None:
        """One node per address of each URL's host; nodes whose address went away are
        dropped once they have no connections."""
        wanted: list[tuple[Upstream, str]] = []
        for url in self.urls:
            try:
                infos = await loop.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            except OSError as exc:
                log.warning("cannot resolve upstream %s: %s", url.url, exc.strerror or exc)
                addresses = []
            wanted.extend((url, address) for address in addresses or [url.host])
        current = {(node.url, node.address): node for node in self.nodes}
        nodes = [current.get(key) or self._node(*key) for key in wanted]
        for key, node in current.items():
            if key not in wanted and node.connections:
                nodes.append(node)  # keep it until its connections are gone
        added = [node.name for node in nodes if node not in current.values()]
        if added and current:
            log.info("upstream nodes now: %s", ", ".join(node.name for node in nodes))
        self.nodes = nodes

    async def _probe(self, loop: asyncio.AbstractEventLoop, node: Node) -> None:
        """Is the down node accepting AMQP again? Its Connection.Start says so."""
        try:
            timeout = min(self.node_timeout, MAX_BACKOFF)
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    node.address, node.url.port, ssl=node.ssl_context,
                    server_hostname=node.server_hostname,
                )  # fmt: skip
                try:
                    writer.write(spec.PROTOCOL_HEADER)
                    head = await reader.readexactly(11)
                finally:
                    writer.close()
            if head[0] != 1 or int.from_bytes(head[7:11], "big") != spec.CONNECTION_START:
                raise ConnectionError("no Connection.Start")
            self.succeeded(node)
        except (OSError, TimeoutError, EOFError, ConnectionError, ssl.SSLError) as exc:
            node.failures += 1
            node.retry_at = time.monotonic() + min(MAX_BACKOFF, 2.0 ** (node.failures - 1))
            log.debug("probe of upstream node %s failed: %s", node.name, exc)
        finally:
            node.probing = False

    def close(self) -> None:
        for task in self._probes:
            task.cancel()


def attempts(nodes: Nodes, budget: float) -> Iterator[tuple[Node, float]]:
    """The nodes to try for one connection, each with its time, within the budget."""
    deadline = time.monotonic() + budget
    for node in nodes.candidates():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        yield node, min(nodes.node_timeout, remaining)
