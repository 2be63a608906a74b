"""A client channel and the upstream channel it rides on: the one place their state changes.

A `ChannelLink` is the object both hops look up, the client session by its channel number
and the upstream connection by the upstream number. Each side has its own close handshake,
so each has its own state: the client side (`owes_close_ok`, `awaits_close_ok`) and the
upstream side (`up`). The link also keeps the synchronous requests it sent upstream and not
yet seen answered (`requests`), in order. The broker processes a channel's methods in order,
so a reply proves that it has processed everything sent on the channel before its request.
(Replies of one kind come in order; a ConsumeOk, CancelOk or CommitOk may come after the
replies to later requests, because RabbitMQ sends them once a queue has answered, so a reply
is matched to the oldest request of its kind.)
That is what lets the proxy know when a departing client's publishes can no longer close the
channel (so that it may be handed to the next client), and when to answer a client's close.

Life of a link (upstream side; the client side is open until the client closes or leaves):

    open --client leaves, unsafe--> closing --CloseOk--> closed (number released)
    open --broker Channel.Close--> closed
    open --client leaves, safe--> draining --marker answered--> parked --next client--> open
"""

from __future__ import annotations

import enum
import heapq
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp.frames import METHOD, frame

if TYPE_CHECKING:
    from amqproxy_mp.proxy.upstream import UpstreamConnection

CHANNEL_OPEN_PAYLOAD: Final = b"\x00\x14\x00\x0a\x00"
CHANNEL_CLOSE_OK_PAYLOAD: Final = b"\x00\x14\x00\x29"
#: Exchange.Declare(amq.direct, passive): a request with no effect, to learn that the broker
#: has processed everything before it.
MARKER_PAYLOAD: Final = m.encode_method(
    0, m.commands.Exchange.Declare(exchange="amq.direct", exchange_type="direct", passive=True)
)[7:-1]


def qos_payload(prefetch_count: int, global_: bool) -> bytes:
    return m.encode_method(0, m.commands.Basic.Qos(0, prefetch_count, global_))[7:-1]


class Up(enum.Enum):
    """The upstream channel's state."""

    OPEN = "open"
    #: The proxy sent Channel.Close; the number is freed when the broker's CloseOk arrives.
    CLOSING = "closing"
    #: The broker confirmed the close, or closed it and got its CloseOk: the number is free.
    CLOSED = "closed"


class Request(enum.Enum):
    """What to do with the reply to a synchronous request sent upstream."""

    #: The client's own request: its reply goes to the client.
    FORWARD = "forward"
    #: The proxy's own (a Qos the proxy answered, a prefetch reset): the reply is dropped.
    DROP = "drop"
    #: The proxy's Channel.Open: its OpenOk is dropped.
    OPEN = "open"
    #: A sync point (the marker): dropped; everything before it has been processed.
    MARKER = "marker"
    #: An exclusive Queue.Declare: the queue in the DeclareOk is the client's.
    EXCLUSIVE = "exclusive"
    #: The same, asked by the proxy for a client's nowait declare: the reply is dropped.
    EXCLUSIVE_UNASKED = "exclusive-unasked"
    #: A Basic.Consume with a server-chosen tag: the tag in the ConsumeOk is the client's.
    CONSUME = "consume"
    #: The same for a consumer the client made with no_ack, which the proxy acks for it.
    CONSUME_AUTO_ACK = "consume-auto-ack"
    #: The same, asked by the proxy for a client's nowait consume: the reply is dropped.
    CONSUME_AUTO_ACK_UNASKED = "consume-auto-ack-unasked"
    #: A passive declare of the exchange of a message whose properties RabbitMQ could not
    #: read: the reply decides between the broker's 404 and its 541 (see client.py).
    UNREADABLE = "unreadable"


class ClientSide(Protocol):
    """What a link needs of the client session it belongs to."""

    peer: str
    capabilities: set[str]

    def send(self, data: bytes) -> None: ...

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None: ...

    def channel_gone(self, link: ChannelLink) -> None: ...

    def close_synced(self, link: ChannelLink) -> None: ...

    def exclusive_declared(self, link: ChannelLink, queue: str) -> None: ...

    def acks_due(self, link: ChannelLink) -> None: ...

    def unreadable_answered(self, link: ChannelLink, exchange_found: bool) -> None: ...

    def upstream_blocked(self, upstream: UpstreamConnection) -> None: ...

    def upstream_unblocked(self, upstream: UpstreamConnection) -> None: ...

    def hold_reading(self, holder: object) -> None: ...

    def release_reading(self, holder: object) -> None: ...

    def close_with(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None: ...


#: Requests whose replies go to the client.
CLIENT_REPLIES: Final = frozenset(
    (Request.FORWARD, Request.EXCLUSIVE, Request.CONSUME, Request.CONSUME_AUTO_ACK)
)
_CONSUMES: Final = frozenset(
    (Request.CONSUME, Request.CONSUME_AUTO_ACK, Request.CONSUME_AUTO_ACK_UNASKED)
)

NO_CONTENT: Final = -1
HEADER_EXPECTED: Final = -2
#: More body than the header announced: RabbitMQ waits for the rest forever (see client.py).
WEDGED: Final = 1 << 66
_U64 = struct.Struct(">Q")
#: Basic.Ack's method id, and its flags octet when it acks one delivery.
ACK_METHOD: Final = m.BASIC_ACK.to_bytes(4, "big")
ACK_ONE: Final = b"\x00"


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
        "auto_ack_tags",
        "auto_acks",
        "awaits_close_ok",
        "client",
        "client_number",
        "close_answered",
        "close_for_connection",
        "consumer_prefetch",
        "consumer_qos_set",
        "consumer_tags",
        "content_expected",
        "content_parts",
        "delivering",
        "delivery_left",
        "forwarding",
        "global_prefetch",
        "global_qos_set",
        "last_publish",
        "owes_close_ok",
        "parked_since",
        "publishes",
        "requests",
        "safe",
        "synced_publishes",
        "unreadable",
        "up",
        "upstream",
        "upstream_number",
    )

    def __init__(
        self,
        client: ClientSide | None,
        client_number: int,
        upstream: UpstreamConnection,
        upstream_number: int,
    ) -> None:
        self.client = client
        self.client_number = client_number
        self.upstream = upstream
        self.upstream_number = upstream_number
        self.up = Up.OPEN
        #: The client sent Channel.Close and awaits our CloseOk.
        self.owes_close_ok = False
        #: We sent the client Channel.Close and await its CloseOk.
        self.awaits_close_ok = False
        #: That close of the client's is part of its Connection.Close.
        self.close_for_connection = False
        #: The proxy confirmed a Channel.Close from the broker (never twice: RabbitMQ may
        #: send one per failing pipelined command, and a second CloseOk closes the connection).
        self.close_answered = False
        #: Synchronous requests sent upstream, oldest first: what to do with the reply, the
        #: publish count when it was sent, and the methods that answer it.
        self.requests: deque[tuple[Request, int, frozenset[int]]] = deque()
        #: Publishes sent upstream, and how many of them a reply has shown to be processed.
        self.publishes = 0
        self.synced_publishes = 0
        #: The last method from the broker went to the client: so do its content frames.
        self.forwarding = False
        # A publish being assembled: its frames, already re-numbered for upstream.
        self.content_parts: list[bytes] = []
        #: NO_CONTENT, HEADER_EXPECTED, or the number of body bytes still missing.
        self.content_expected = NO_CONTENT
        #: The consumer tags in use on this channel (the broker refuses a second one with 530).
        self.consumer_tags: set[str] | None = None
        #: The last Basic.Publish payload that passed validation.
        self.last_publish = b""
        #: Only complete publishes, Basic.Get with no_ack and Basic.Qos happened on it: it may
        #: be handed to the next client once clean (see `client_left`).
        self.safe = True
        #: The upstream channel's prefetch (per consumer, and global), as last asked.
        self.consumer_prefetch = 0
        self.global_prefetch = 0
        #: The current client set them itself (else, on a reused channel, they are inherited).
        self.consumer_qos_set = False
        self.global_qos_set = False
        self.parked_since = 0.0
        #: Consumers the client made with no_ack: the proxy consumes them with acks.
        self.auto_ack_tags: set[str] | None = None
        #: The delivery tag of such a consumer's message on its way to the client, and how
        #: much of its content is still to come (HEADER_EXPECTED: its header).
        self.delivering = 0
        self.delivery_left = NO_CONTENT
        #: Deliveries handed to the client, to ack once they have left for its socket.
        self.auto_acks: list[int] = []
        #: The message being received has properties RabbitMQ could not read.
        self.unreadable = False

    # --- sending upstream -------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.upstream.send(data)

    def send_request(self, data: bytes, mid: int, kind: Request = Request.FORWARD) -> None:
        """Send a synchronous request (method `mid`) whose reply will come on this channel."""
        self.requests.append((kind, self.publishes, m.ANSWERS[mid]))
        self.upstream.send(data)

    def open_upstream(self) -> None:
        self.send_request(
            frame(METHOD, self.upstream_number, CHANNEL_OPEN_PAYLOAD), m.CHANNEL_OPEN, Request.OPEN
        )

    def _send_marker(self) -> None:
        self.send_request(
            frame(METHOD, self.upstream_number, MARKER_PAYLOAD), m.EXCHANGE_DECLARE, Request.MARKER
        )

    def publish(self, data: bytes) -> None:
        self.publishes += 1
        self.upstream.send(data)

    @property
    def clean(self) -> bool:
        """Nothing sent on it can still be answered or close it: fit for another client."""
        return not self.requests and self.publishes == self.synced_publishes

    @property
    def unsynced(self) -> bool:
        """Publishes went upstream since the broker last answered on this channel."""
        return self.publishes > self.synced_publishes

    @property
    def awaits_reply(self) -> bool:
        """The client awaits the broker's answer to a request of its own (the proxy's own
        requests, whose replies it never sees, do not count)."""
        return any(request[0] in CLIENT_REPLIES for request in self.requests)

    @property
    def unanswered(self) -> bool:
        """The client published since the broker last answered here, or awaits an answer:
        its Channel.Close is answered after that (close_policy processed), as the broker's
        would be."""
        return self.publishes > self.synced_publishes or self.awaits_reply

    @property
    def client_open(self) -> bool:
        """The client may use the channel (it has not closed it, nor been told it is closed)."""
        return not (self.owes_close_ok or self.awaits_close_ok)

    def set_prefetch(self, prefetch_count: int, global_: bool, kind: Request) -> None:
        """Send Basic.Qos upstream and remember what the upstream channel now has."""
        if global_:
            self.global_prefetch = prefetch_count
        else:
            self.consumer_prefetch = prefetch_count
        self.send_request(
            frame(METHOD, self.upstream_number, qos_payload(prefetch_count, global_)),
            m.BASIC_QOS,
            kind,
        )

    def reset_inherited_prefetch(self) -> None:
        """Before a consumer starts on a reused channel: no prefetch the client did not ask
        for (an earlier client's, per consumer or global) may apply to it."""
        if self.consumer_prefetch and not self.consumer_qos_set:
            self.set_prefetch(0, False, Request.DROP)
        if self.global_prefetch and not self.global_qos_set:
            self.set_prefetch(0, True, Request.DROP)

    # --- the client closes or leaves ---------------------------------------------------------

    def client_close(self, payload: memoryview | None, wait: bool, for_connection: bool) -> bool:
        """The client closes this channel (Channel.Close, or its Connection.Close). Returns
        True when the close is complete now, False when the client must wait (the broker's
        answer is due first); the client is then told through `close_synced`."""
        self.close_for_connection = for_connection
        if self.up is not Up.OPEN:
            # The broker closed it already; the client is told (or was) by that Close.
            return True
        if not self.safe:
            must_wait = not for_connection or (wait and self.unsynced)
            self._close_upstream(payload)
            if must_wait:
                self.owes_close_ok = True
                return False
            self.client = None
            return True
        # after a Connection.Close the client discards everything but the CloseOk: only
        # what it published matters then
        if wait and (self.unsynced if for_connection else self.unanswered):
            self.owes_close_ok = True
            self._send_marker()
            return False
        self.client_left()
        return True

    def client_left(self) -> None:
        """The client is gone from this channel: close it upstream, or park it once clean."""
        self.client = None
        self.owes_close_ok = self.awaits_close_ok = self.forwarding = self.unreadable = False
        self.content_parts.clear()
        self.content_expected = NO_CONTENT
        if self.up is not Up.OPEN:
            return  # closing (the CloseOk frees the number) or closed already
        upstream = self.upstream
        if not (self.safe and upstream.can_park):
            self._close_upstream(None)
        elif not self.clean:
            if not any(request[0] is Request.MARKER for request in self.requests):
                self._send_marker()
        else:
            assert upstream.pool is not None  # a connection with channels has its vhost open
            upstream.pool.park(self)

    def close_parked(self) -> None:
        """A parked channel's time is up (idle, or its connection retires)."""
        self._close_upstream(None)

    def _close_upstream(self, client_close: memoryview | None) -> None:
        if self.up is not Up.OPEN:
            return
        self.up = Up.CLOSING
        if client_close is not None:
            data = frame(METHOD, self.upstream_number, client_close)
        else:
            data = m.close_frame(self.upstream_number, m.REPLY_SUCCESS, "client disconnected")
        self.upstream.send(data)

    def reuse(self, client: ClientSide, client_number: int) -> None:
        """Hand a parked upstream channel to a new client channel."""
        self.client = client
        self.client_number = client_number
        self.safe = True
        self.consumer_qos_set = self.global_qos_set = False
        self.consumer_tags = None
        self.last_publish = b""

    # --- what the broker sends ---------------------------------------------------------------

    def broker_method(self, mid: int, payload: memoryview) -> None:
        """A method from the broker on this channel: update the state, pass it on or not."""
        forward = self.client is not None and not self.awaits_close_ok
        if mid in m.REPLIES:
            request = self._answered(mid)
            if request is not None:
                kind, publishes, _ = request
                if publishes > self.synced_publishes:
                    self.synced_publishes = publishes
                if kind is not Request.FORWARD:
                    forward = self._proxy_reply(kind, payload)
            if not self.requests and self.client is None and self.up is Up.OPEN:
                self.client_left()  # clean now: park it
            elif self.owes_close_ok and not (
                self.unsynced if self.close_for_connection else self.unanswered
            ):
                self._close_synced()
        elif mid == m.CHANNEL_CLOSE:
            self._broker_close(payload)
            return
        elif mid == m.CHANNEL_CLOSE_OK:
            self._close_ok()
            return
        elif mid == m.BASIC_DELIVER or mid == m.BASIC_GET_OK:
            self.upstream.stats.delivered += 1
            if self.auto_ack_tags and forward and mid == m.BASIC_DELIVER:
                self._delivery_started(payload)
        elif mid == m.BASIC_CANCEL:
            self._forget_tag(payload)
            if forward and "consumer_cancel_notify" not in self.client.capabilities:  # type: ignore[union-attr]
                forward = False
        self.forwarding = forward
        if forward:
            self.client.deliver(METHOD, self.client_number, payload)  # type: ignore[union-attr]

    def _answered(self, mid: int) -> tuple[Request, int, frozenset[int]] | None:
        """The oldest pending request that reply `mid` answers, taken off the list."""
        requests = self.requests
        for i, request in enumerate(requests):
            if mid in request[2]:
                del requests[i]
                return request
        return None

    def _proxy_reply(self, kind: Request, payload: memoryview) -> bool:
        """A reply to a request the proxy made or rewrote; True when the client gets it."""
        client = self.client
        if kind is Request.EXCLUSIVE or kind is Request.EXCLUSIVE_UNASKED:
            ok = m.decode_broker_method(payload)
            assert isinstance(ok, m.commands.Queue.DeclareOk)
            queue = ok.queue or ""
            if client is not None:
                client.exclusive_declared(self, queue)
            else:  # its client left before the DeclareOk: nobody else will delete it
                self.upstream.delete_queues({queue}, ())
            return kind is Request.EXCLUSIVE and client is not None
        if kind in _CONSUMES:
            ok = m.decode_broker_method(payload)
            assert isinstance(ok, m.commands.Basic.ConsumeOk)
            self.consumer_started(ok.consumer_tag or "", kind is not Request.CONSUME)
            return kind is not Request.CONSUME_AUTO_ACK_UNASKED and (
                client is not None and not self.awaits_close_ok
            )
        if kind is Request.UNREADABLE and client is not None:
            client.unreadable_answered(self, True)
        return False  # OPEN, DROP, MARKER, UNREADABLE

    def consumer_started(self, tag: str, auto_ack: bool) -> None:
        if self.consumer_tags is None:
            self.consumer_tags = set()
        self.consumer_tags.add(tag)
        if auto_ack:
            if self.auto_ack_tags is None:
                self.auto_ack_tags = set()
            self.auto_ack_tags.add(tag)

    # --- deliveries of consumers the proxy acks for their clients -----------------------------

    def _delivery_started(self, payload: memoryview) -> None:
        length = payload[4]
        tag = bytes(payload[5 : 5 + length]).decode("utf-8", "surrogateescape")
        if tag in self.auto_ack_tags:  # type: ignore[operator]
            self.delivering = _U64.unpack_from(payload, 5 + length)[0]
            self.delivery_left = HEADER_EXPECTED

    def content_forwarded(self, frame_type: int, payload: memoryview) -> None:
        """A content frame of the delivery in `delivering` went to the client."""
        if self.delivery_left == HEADER_EXPECTED:
            self.delivery_left = _U64.unpack_from(payload, 4)[0]
        else:
            self.delivery_left -= len(payload)
        if self.delivery_left <= 0:
            self.auto_acks.append(self.delivering)
            self.delivering = 0
            self.delivery_left = NO_CONTENT
            if self.client is not None:
                self.client.acks_due(self)

    def send_auto_acks(self) -> None:
        """The client's socket has taken these deliveries: ack them upstream, where the
        proxy consumed them with acks on the client's behalf."""
        if self.up is Up.OPEN:
            number = self.upstream_number
            self.upstream.send(
                b"".join(
                    frame(METHOD, number, ACK_METHOD + _U64.pack(tag) + ACK_ONE)
                    for tag in self.auto_acks
                )
            )
        self.auto_acks.clear()

    def client_acked(self, payload: memoryview) -> None:
        """The client acked (or nacked) deliveries itself: those need no ack of ours."""
        if not self.auto_acks:
            return
        tag = _U64.unpack_from(payload, 4)[0]
        if payload[12] & 1 and payload[3] != 0x5A:  # multiple (Basic.Reject has none)
            self.auto_acks[:] = [t for t in self.auto_acks if t > tag]
        elif tag in self.auto_acks:
            self.auto_acks.remove(tag)

    def _forget_tag(self, payload: memoryview) -> None:
        if self.consumer_tags:
            length = payload[4]
            self.consumer_tags.discard(
                bytes(payload[5 : 5 + length]).decode("utf-8", "surrogateescape")
            )

    def _broker_close(self, payload: memoryview) -> None:
        """The broker closed the channel (404 and the like). RabbitMQ may send one Close per
        failing pipelined command: only the first is answered."""
        if self.requests and self.requests[0][0] is Request.OPEN:
            return  # a late Close for the previous channel with this number: not ours
        if self.close_answered or self.up is Up.CLOSED:
            return
        self.close_answered = True
        self.upstream.send(frame(METHOD, self.upstream_number, CHANNEL_CLOSE_OK_PAYLOAD))
        unreadable = any(request[0] is Request.UNREADABLE for request in self.requests)
        if unreadable:
            # the exchange of an unreadable message is missing: the publish's own 404
            close = m.decode_broker_method(payload)
            assert isinstance(close, m.commands.Channel.Close)
            payload = memoryview(
                m.close_frame(1, close.reply_code or 0, close.reply_text, 60, 40)[7:-1]
            )
        self.requests.clear()
        released = self.up is Up.OPEN
        if released:
            self._release()
        # (else both sides closed at once: the CloseOk to ours releases the number)
        client = self.client
        if client is None:
            return
        if not self.awaits_close_ok:
            self.awaits_close_ok = True
            client.deliver(METHOD, self.client_number, payload)
        if unreadable:
            client.unreadable_answered(self, False)
        if self.owes_close_ok and released:
            # RabbitMQ answers a Close that crosses its own with CloseOk
            self._close_synced()

    def _close_ok(self) -> None:
        if self.up is not Up.CLOSING:
            return
        self._release()
        if self.owes_close_ok:
            self._close_synced()

    def _close_synced(self) -> None:
        """The client's close is answered: the broker processed what it sent before it."""
        self.owes_close_ok = False
        client = self.client
        assert client is not None
        if self.close_for_connection:
            self.client_left()
        else:
            client.send(frame(METHOD, self.client_number, CHANNEL_CLOSE_OK_PAYLOAD))
            if not self.awaits_close_ok:
                self.client_left()
        client.close_synced(self)

    def client_close_ok(self) -> bool:
        """The client confirmed our Channel.Close; True when the link is done with it."""
        self.awaits_close_ok = False
        if self.owes_close_ok:
            return False
        self.client_left()
        return True

    def _release(self) -> None:
        self.up = Up.CLOSED
        self.upstream.release_number(self)

    def upstream_gone(self) -> None:
        """The upstream connection is gone (its clients are told at the connection level)."""
        self.up = Up.CLOSED
        self.requests.clear()

    def touch_parked(self) -> None:
        self.parked_since = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"<ChannelLink client={self.client_number} upstream={self.upstream_number} "
            f"up={self.up.value} owes_close_ok={self.owes_close_ok} "
            f"awaits_close_ok={self.awaits_close_ok} requests={len(self.requests)}>"
        )
