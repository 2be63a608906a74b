"""What a worker counts, and how it exports it to the master.

The data path counts in plain integers (`Stats`, `Gauges`); a worker hands the deltas to
prometheus-client's multiprocess mode about once a second (`WorkerMetrics.export`), so no frame
ever pays for a metric call. What the master does with the files is metrics_master.py's.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    values,
)

log = logging.getLogger(__name__)


#: Upstream connect latency buckets: a loopback broker answers in ~1 ms, a distant TLS one in
#: hundreds of ms, a struggling one up to the connect timeout.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Label values created at zero from the start, so `rate()` and alerts see a series before the
#: first event. Other values still work; they appear when they first happen.
UPSTREAM_ERROR_REASONS = (
    "refused",
    "unreachable",
    "timeout",
    "tls",
    "lost",
    "closed_by_broker",
    "heartbeat",
)
AUTH_FAILURE_CODES = ("403", "530")


class Disconnect(enum.StrEnum):
    """Why a client connection ended: the `reason` label of the disconnect metric."""

    CLIENT_CLOSE = "client_close"
    SOCKET_CLOSED = "socket_closed"
    PROTOCOL_ERROR = "protocol_error"
    UPSTREAM_CLOSED = "upstream_closed"
    AUTH_FAILED = "auth_failed"
    HEARTBEAT = "heartbeat"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    SLOW_CLIENT = "slow_client"
    CONNECTION_LIMIT = "connection_limit"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"


CLIENT_DISCONNECT_REASONS = tuple(reason.value for reason in Disconnect)


# --- what the data path counts -------------------------------------------------------------


class Stats:
    """Plain counters the data path bumps (never a prometheus call per frame).

    All counts only grow; `WorkerMetrics.export` turns them into deltas.
    """

    __slots__ = (
        "auth_failures",
        "channels_reused",
        "client_bytes_in",
        "client_bytes_out",
        "client_disconnects",
        "clients_moved",
        "delivered",
        "failovers",
        "node_connect_seconds",
        "node_state_changes",
        "publish_nacks",
        "published",
        "resent",
        "upstream_bytes_in",
        "upstream_bytes_out",
        "upstream_channel_opens",
        "upstream_connect_seconds",
        "upstream_errors",
    )

    def __init__(self) -> None:
        #: complete messages forwarded client -> broker
        self.published = 0
        #: messages the broker nacked (refused), and messages the proxy sent again because
        #: their upstream connection ended before the broker confirmed them
        self.publish_nacks = 0
        self.resent = 0
        #: clients that went on through another upstream connection when theirs ended
        self.clients_moved = 0
        #: Basic.Deliver / Basic.GetOk forwarded broker -> client
        self.delivered = 0
        #: Channel.Open sent to the broker
        self.upstream_channel_opens = 0
        #: client channels served by a parked upstream channel (no Channel.Open upstream)
        self.channels_reused = 0
        self.client_bytes_in = 0
        self.client_bytes_out = 0
        self.upstream_bytes_in = 0
        self.upstream_bytes_out = 0
        #: one entry per successful upstream connect (TCP + TLS + AMQP handshake); export clears it
        self.upstream_connect_seconds: list[float] = []
        #: by reason, see UPSTREAM_ERROR_REASONS
        self.upstream_errors: collections.Counter[str] = collections.Counter()
        #: by reply code as text: "403", "530"
        self.auth_failures: collections.Counter[str] = collections.Counter()
        #: by reason, see CLIENT_DISCONNECT_REASONS
        self.client_disconnects: collections.Counter[str] = collections.Counter()
        #: (node, seconds) per successful upstream connect; export clears it
        self.node_connect_seconds: list[tuple[str, float]] = []
        #: upstream nodes this worker saw go down while up (new connections go elsewhere)
        self.failovers = 0
        #: by node: changes of its state (up, down)
        self.node_state_changes: collections.Counter[str] = collections.Counter()


@dataclass
class Gauges:
    """Current sizes, sampled by the worker when it exports."""

    client_connections: int = 0
    upstream_connections: int = 0
    client_channels: int = 0
    upstream_channels: int = 0
    #: messages published and not yet confirmed by the broker
    unconfirmed: int = 0
    #: per upstream node: (up, this worker's connections to it, their channels)
    nodes: dict[str, tuple[bool, int, int]] = field(default_factory=dict)


# --- worker side ---------------------------------------------------------------------------


class _Delta:
    """Remembers what was last exported so a counter is increased by the difference only."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def take(self, value: int) -> int:
        # A smaller value means the Stats object was replaced: everything in it is new.
        delta = value - self.last if value >= self.last else value
        self.last = value
        return delta


class _LabelledDelta:
    """`_Delta` per label value of one labelled counter."""

    __slots__ = ("counter", "last")

    def __init__(self, counter: Counter, preset: Iterable[str]) -> None:
        self.counter = counter
        self.last: dict[str, int] = {}
        for label in preset:
            counter.labels(label)  # creates the zero series

    def export(self, counts: Mapping[str, int]) -> None:
        last = self.last
        for label, value in counts.items():
            previous = last.get(label, 0)
            delta = value - previous if value >= previous else value
            if delta:
                self.counter.labels(label).inc(delta)
            last[label] = value


#: The plain counters of Stats and the Prometheus counter each one feeds.
PLAIN_COUNTERS: Final = (
    ("published", "amqproxy_messages_published",
     "Complete messages forwarded from clients to the broker"),
    ("delivered", "amqproxy_messages_delivered",
     "Messages (Basic.Deliver, Basic.GetOk) forwarded from the broker to clients"),
    ("upstream_channel_opens", "amqproxy_upstream_channel_opens",
     "Channel.Open sent to the broker"),
    ("channels_reused", "amqproxy_channels_reused",
     "Client channels served by a parked upstream channel, without a Channel.Open"),
    ("client_bytes_in", "amqproxy_client_bytes_received", "Bytes received from clients"),
    ("client_bytes_out", "amqproxy_client_bytes_sent", "Bytes sent to clients"),
    ("upstream_bytes_in", "amqproxy_upstream_bytes_received", "Bytes received from the broker"),
    ("upstream_bytes_out", "amqproxy_upstream_bytes_sent", "Bytes sent to the broker"),
    ("failovers", "amqproxy_upstream_failovers",
     "Upstream nodes seen to go down while up: new connections went to the other nodes"),
    ("resent", "amqproxy_messages_resent",
     "Messages published again because their upstream connection ended before the broker "
     "confirmed them"),
    ("publish_nacks", "amqproxy_messages_nacked",
     "Messages the broker refused with a publisher nack"),
    ("clients_moved", "amqproxy_clients_moved",
     "Clients that went on through another upstream connection when theirs ended, unaware"),
)  # fmt: skip


class WorkerMetrics:
    """A worker's prometheus-client metrics, written to per-pid mmap files in `directory`.

    Create one per worker process, after the fork: the value class (and so the files) is bound to
    the pid at construction. Metrics use no registry, so the process keeps no global state besides
    prometheus-client's value class.
    """

    def __init__(self, directory: str, worker: int) -> None:
        self.directory = directory
        self.worker = worker
        # MmapedValue reads the directory from the environment when it opens its files, and
        # prometheus-client picked its ValueClass at import time (in the master, maybe without
        # the variable): set both here, in the worker, before creating any metric.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, registry=None, multiprocess_mode="livesum")

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, documentation, labels, registry=None)

        self.client_connections = gauge("amqproxy_client_connections", "Client connections")
        self.upstream_connections = gauge(
            "amqproxy_upstream_connections", "Upstream (broker) connections"
        )
        self.client_channels = gauge("amqproxy_client_channels", "Channels opened by clients")
        self.upstream_channels = gauge(
            "amqproxy_upstream_channels", "Channels open on upstream connections"
        )
        self.unconfirmed = gauge(
            "amqproxy_unconfirmed_messages",
            "Messages published and not yet confirmed by the broker (kept to be sent again)",
        )
        #: (Stats field, its counter, what has been exported of it)
        self._plain = tuple(
            (field, counter(name, documentation), _Delta())
            for field, name, documentation in PLAIN_COUNTERS
        )
        self.upstream_errors = counter(
            "amqproxy_upstream_errors",
            "Upstream connections that failed to open or were lost, by reason",
            ("reason",),
        )
        self.auth_failures = counter(
            "amqproxy_auth_failures",
            "Client logins the broker refused, by AMQP reply code",
            ("code",),
        )
        self.client_disconnects = counter(
            "amqproxy_client_disconnects", "Client connections ended, by reason", ("reason",)
        )
        self.upstream_connect_seconds = Histogram(
            "amqproxy_upstream_connect_seconds",
            "Time to open an upstream connection (TCP, TLS and AMQP handshake)",
            buckets=CONNECT_BUCKETS,
            registry=None,
        )
        self.node_connect_seconds = Histogram(
            "amqproxy_upstream_node_connect_seconds",
            "Time to open an upstream connection, by node",
            ("node",),
            buckets=CONNECT_BUCKETS,
            registry=None,
        )
        self.node_state_changes = counter(
            "amqproxy_upstream_node_state_changes",
            "Upstream nodes going down or coming back, by node",
            ("node",),
        )
        self.node_up = Gauge(
            "amqproxy_upstream_node_up",
            "1 while an upstream node is up (as any worker sees it), by node",
            ("node",),
            registry=None,
            multiprocess_mode="max",
        )
        self.node_connections = Gauge(
            "amqproxy_upstream_node_connections",
            "Upstream connections, by node",
            ("node",),
            registry=None,
            multiprocess_mode="livesum",
        )
        self.node_channels = Gauge(
            "amqproxy_upstream_node_channels",
            "Channels open on upstream connections, by node",
            ("node",),
            registry=None,
            multiprocess_mode="livesum",
        )
        self._node_changes = _LabelledDelta(self.node_state_changes, ())
        self._nodes_exported: set[str] = set()
        self._errors = _LabelledDelta(self.upstream_errors, UPSTREAM_ERROR_REASONS)
        self._auth = _LabelledDelta(self.auth_failures, AUTH_FAILURE_CODES)
        self._disconnects = _LabelledDelta(self.client_disconnects, CLIENT_DISCONNECT_REASONS)

    def export(self, stats: Stats, gauges: Gauges) -> None:
        """Publish what changed since the last call (the worker calls this every 0.5-1 s)."""
        for name, counter, delta in self._plain:
            amount = delta.take(getattr(stats, name))
            if amount:
                counter.inc(amount)
        self._errors.export(stats.upstream_errors)
        self._auth.export(stats.auth_failures)
        self._disconnects.export(stats.client_disconnects)
        if stats.upstream_connect_seconds:
            for seconds in stats.upstream_connect_seconds:
                self.upstream_connect_seconds.observe(seconds)
            stats.upstream_connect_seconds.clear()
        self.client_connections.set(gauges.client_connections)
        self.upstream_connections.set(gauges.upstream_connections)
        self.client_channels.set(gauges.client_channels)
        self.upstream_channels.set(gauges.upstream_channels)
        self.unconfirmed.set(gauges.unconfirmed)
        self._node_changes.export(stats.node_state_changes)
        for node, seconds in stats.node_connect_seconds:
            self.node_connect_seconds.labels(node).observe(seconds)
        stats.node_connect_seconds.clear()
        # A node that is gone (its address left its name's answer) reads 0 from now on: in
        # multiprocess mode a label cannot be removed, only reset, until the worker is replaced.
        gone = dict.fromkeys(self._nodes_exported - gauges.nodes.keys(), (False, 0, 0))
        for node, (up, connections, channels) in (gauges.nodes | gone).items():
            self.node_up.labels(node).set(1 if up else 0)
            self.node_connections.labels(node).set(connections)
            self.node_channels.labels(node).set(channels)
        self._nodes_exported = set(gauges.nodes)
