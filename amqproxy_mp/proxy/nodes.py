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
    #: This worker's open connections to it, and its attempts under way.
    connections: int = 0
    attempting: int = 0
    probing: bool = field(default=False)
    #: How logs, metrics and clients' error texts name it: its URL, with the address when
    #: the URL's host resolved to several (see Nodes.resolve).
    name: str = ""
    #: Its address is no longer among its URL's: no new connections (kept while it has some).
    outdated: bool = False

    def __post_init__(self) -> None:
        self.name = self.name or self.url.url

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
        self._node_timeout = node_timeout
        self._ssl_context = ssl_context
        self._stats = stats
        self.nodes: list[Node] = [self._node(url, url.host) for url in self.urls]
        self._resolved_at = 0.0
        self._resolution: asyncio.Task[None] | None = None
        #: Names were looked up once (until then, a name is one node: its first address).
        self._resolved_once = False
        #: The last resolution error of each URL (logged when it changes).
        self._resolve_errors: dict[Upstream, str] = {}
        self._probes: set[asyncio.Task[None]] = set()

    @property
    def node_timeout(self) -> float:
        """Seconds one attempt on one node may take: the whole budget with a single node."""
        return self._node_timeout if len(self.nodes) > 1 else float("inf")

    @property
    def several(self) -> bool:
        return len(self.nodes) > 1

    def _node(self, url: Upstream, address: str) -> Node:
        return Node(url, address, self._ssl_context if url.tls else None)

    # --- which node ---------------------------------------------------------------------

    def candidates(self) -> list[Node]:
        """The nodes a new connection should try, in order: the healthy ones (the policy
        decides their order), then the down ones, soonest due first (a client reaches those
        only when every healthy node failed it, or none is up)."""
        live = [node for node in self.nodes if not node.outdated]
        up = [node for node in live if node.state is NodeState.UP]
        if self.policy == "spread":
            up.sort(key=lambda n: n.connections + n.attempting)
        down = sorted((n for n in live if n.state is not NodeState.UP), key=lambda n: n.retry_at)
        return up + down

    def misplaced(self, node: Node) -> bool:
        """The node has more of this worker's connections than the policy would give it:
        with spread, more than an even share of them over the healthy nodes; with ordered,
        any while an earlier node is up; with either, any once its address is no longer
        its name's."""
        if node.outdated:
            return node.connections > 0
        up = [n for n in self.nodes if n.state is NodeState.UP and not n.outdated]
        if node not in up:
            return False  # (a down node's connections are gone or going)
        if self.policy == "ordered":
            return up[0] is not node and node.connections > 0
        total = sum(n.connections + n.attempting for n in up)
        return node.connections > -(-total // len(up))

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def any_up(self) -> bool:
        return any(node.state is NodeState.UP for node in self.nodes)

    # --- what happened to a node --------------------------------------------------------

    def succeeded(self, node: Node) -> None:
        """A connection to the node completed its handshake: its back-off starts over."""
        node.failures = 0
        if node.state is not NodeState.UP:
            self._set_state(node, NodeState.UP, "a connection succeeded")

    def failed(self, node: Node, reason: str) -> None:
        """A connection attempt to the node failed, or an established one ended unasked.
        Only the first such news about an up node counts (twenty connections lost to one
        restart are one failure); the back-off grows with each failed probe."""
        if node.state is not NodeState.UP:
            return
        self._back_off(node)
        self._resolved_at = 0.0  # resolve names again at the next refresh
        self._stats.failovers += 1
        self._set_state(node, NodeState.DOWN, reason)

    @staticmethod
    def _back_off(node: Node) -> None:
        node.failures += 1
        exponent = min(node.failures - 1, 5)  # (2 ** 5 > MAX_BACKOFF)
        node.retry_at = time.monotonic() + min(MAX_BACKOFF, 2.0**exponent)

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
            self._start_resolving(loop)
        if not self.any_up:
            return
        for node in self.nodes:
            if node.state is NodeState.DOWN and not node.probing and now >= node.retry_at:
                node.probing = True
                self._spawn(loop, self._probe(loop, node))

    def _spawn(self, loop: asyncio.AbstractEventLoop, step: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = loop.create_task(step)  # type: ignore[arg-type]
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)
        return task

    def _start_resolving(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        """A lookup of every name, unless one is under way already."""
        if self._resolution is None or self._resolution.done():
            self._resolved_at = time.monotonic()
            self._resolution = self._spawn(loop, self.resolve(loop))
        return self._resolution

    async def resolved(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Before the first connection, the names looked up (within `timeout`): else every
        connection made before the first tick would go to a name's first address."""
        if not self._resolved_once:
            await asyncio.wait({self._start_resolving(loop)}, timeout=timeout)

    async def resolve(self, loop: asyncio.AbstractEventLoop) -> None:
        """One node per address of each URL's host, keeping what is known of each; a lookup
        that fails keeps the URL's nodes as they are; a node whose address went away takes
        no new connections and is dropped once it has none."""
        try:
            current = {(node.url, node.address): node for node in self.nodes}
            nodes: list[Node] = []
            for url in self.urls:
                mine = [node for node in self.nodes if node.url == url]
                try:
                    infos = await loop.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
                    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
                    self._resolve_errors.pop(url, None)
                except OSError as exc:
                    error = exc.strerror or str(exc)
                    if self._resolve_errors.get(url) != error:
                        log.warning("cannot resolve upstream %s: %s", url.url, error)
                    self._resolve_errors[url] = error
                    nodes.extend(mine)
                    continue
                for address in addresses:
                    node = current.get((url, address)) or self._node(url, address)
                    node.outdated = False
                    nodes.append(node)
                for node in mine:
                    if node.address not in addresses and node.connections:
                        node.outdated = True
                        nodes.append(node)
                for node in nodes:
                    if node.url == url:
                        node.name = f"{url.url} ({node.address})" if len(addresses) > 1 else url.url
            if [n.name for n in nodes] != [n.name for n in self.nodes]:
                log.info("upstream nodes now: %s", ", ".join(node.name for node in nodes))
            self.nodes = nodes
        finally:
            self._resolved_once = True

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
            # up for new connections again; its back-off starts over only once one of them
            # completes its handshake (a node that answers but cannot serve does not flap)
            if node.state is not NodeState.UP:
                self._set_state(node, NodeState.UP, "it answers again")
        except (OSError, TimeoutError, EOFError, ConnectionError, ssl.SSLError) as exc:
            self._back_off(node)
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
