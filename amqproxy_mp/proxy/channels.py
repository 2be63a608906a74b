"""Channel mapping: which client channel rides on which upstream channel.

A `ChannelLink` is the one object both sides look up: the client session by its
own channel number, the upstream connection by the upstream channel number.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amqproxy_mp.proxy.client import ClientSession
    from amqproxy_mp.proxy.upstream import UpstreamConnection

# Link states. Plain ints: they are compared on every frame.
OPEN = 0
#: The client sent Channel.Close; the broker's CloseOk is awaited.
CLIENT_CLOSING = 1
#: The broker closed the channel (and got its CloseOk); the client's CloseOk is awaited.
BROKER_CLOSED = 2
#: The client is gone; the upstream channel waits for the broker's CloseOk.
DETACHED = 3
#: A safe channel whose client left, waiting for the next client of the pool. Until the
#: broker answers the marker (a passive declare) sent when it was parked, what arrives on
#: it was caused by earlier clients and is dropped (`markers` > 0).
PARKED = 4

NO_PREFETCH = (0, False)

NO_CONTENT = -1
HEADER_EXPECTED = -2


class ChannelNumbers:
    """Allocates channel numbers 1..channel_max, lowest free first."""

    def __init__(self, channel_max: int) -> None:
        self.channel_max = channel_max
        self._next = 1
        self._freed: list[int] = []
        self.in_use = 0

    def allocate(self) -> int | None:
        if self._freed:
            number = heapq.heappop(self._freed)
        elif self._next <= self.channel_max:
            number = self._next
            self._next += 1
        else:
            return None
        self.in_use += 1
        return number

    def release(self, number: int) -> None:
        heapq.heappush(self._freed, number)
        self.in_use -= 1

    @property
    def available(self) -> int:
        return self.channel_max - self.in_use


class ChannelLink:
    """One client channel mapped onto one upstream channel."""

    __slots__ = (
        "client",
        "client_number",
        "client_qos",
        "close_answered",
        "consumer_tags",
        "content_expected",
        "content_parts",
        "declares",
        "last_publish",
        "markers",
        "opened",
        "parked_since",
        "prefetch",
        "qos_pending",
        "replay",
        "safe",
        "state",
        "upstream",
        "upstream_number",
    )

    def __init__(
        self,
        client: ClientSession | None,
        client_number: int,
        upstream: UpstreamConnection,
        upstream_number: int,
    ) -> None:
        self.client: ClientSession | None = client
        self.client_number = client_number
        self.upstream = upstream
        self.upstream_number = upstream_number
        self.state = OPEN
        #: The broker's Channel.OpenOk arrived: a Channel.Close before it is a stale one, meant
        #: for the previous channel with this number.
        self.opened = False
        #: The proxy confirmed a Channel.Close from the broker (never twice: RabbitMQ may send
        #: one per failing pipelined command, and a second CloseOk closes the connection).
        self.close_answered = False
        # A publish being assembled: its frames, already re-numbered for upstream.
        self.content_parts: list[bytes] = []
        #: NO_CONTENT, HEADER_EXPECTED, or the number of body bytes still missing.
        self.content_expected = NO_CONTENT
        #: Consumer tags the client chose on this channel (reusing one is a connection error).
        self.consumer_tags: set[str] | None = None
        #: The last Basic.Publish payload that passed validation.
        self.last_publish = b""
        #: For each Queue.Declare awaiting its DeclareOk, what it was (see client.py).
        self.declares: list[int] | None = None
        #: Only complete publishes, Basic.Get with no_ack and Basic.Qos happened on it: it may
        #: be handed to the next client (see DESIGN "Channel reuse").
        self.safe = True
        #: Basic.QosOk replies still to come from the broker for Qos the proxy answered itself.
        self.qos_pending = 0
        #: (prefetch_count, global) last asked of the upstream channel; falsy: the default.
        self.prefetch: tuple[int, bool] = NO_PREFETCH
        #: The current client set a prefetch itself (else, on a reused channel, it is inherited).
        self.client_qos = False
        self.parked_since = 0.0
        #: Parking markers the broker has not answered yet: while > 0, frames from upstream
        #: belong to earlier clients.
        self.markers = 0
        #: While markers > 0 on a reused channel: what its new client sent since, to be sent
        #: again on a fresh channel if the broker closes this one for an earlier client's error.
        self.replay: list[bytes] | None = None

    def reuse(self, client: ClientSession, client_number: int) -> None:
        """Hand a parked upstream channel to a new client channel."""
        self.client = client
        self.client_number = client_number
        self.state = OPEN
        self.safe = True
        self.client_qos = False
        self.replay = [] if self.markers else None

    def send(self, data: bytes) -> None:
        """Send the client's frames for this channel upstream (kept for replay if needed)."""
        if self.replay is not None:
            self.replay.append(data)
        self.upstream.send(data)
