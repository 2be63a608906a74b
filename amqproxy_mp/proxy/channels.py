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
    #: The same for a consumer the client made with no_ack, which the proxy acks for it
    #: from its ConsumeOk on (its deliveries come after it, those of an earlier consumer
    #: with the same tag before).
    CONSUME_AUTO_ACK = "consume-auto-ack"
    #: The same, asked by the proxy for a client's nowait consume: the reply is dropped.
    CONSUME_AUTO_ACK_UNASKED = "consume-auto-ack-unasked"
    #: A no_ack consumer with a tag of the client's choosing, acked by the proxy from its
    #: ConsumeOk on; and the same for a nowait one (the reply is dropped).
    NAMED_AUTO_ACK = "named-auto-ack"
    NAMED_AUTO_ACK_UNASKED = "named-auto-ack-unasked"
    #: A nowait Basic.Cancel of a consumer the proxy acks, asked with a reply so that the
    #: proxy learns where its deliveries end: the reply is dropped.
    CANCEL_UNASKED = "cancel-unasked"
    #: A client's Queue.Delete of its own exclusive queue (the request's subject): once
    #: answered, the queue is no longer the client's to delete when it goes. The same for a
    #: nowait one, asked with a reply that is dropped.
    DELETE_EXCLUSIVE = "delete-exclusive"
    DELETE_EXCLUSIVE_UNASKED = "delete-exclusive-unasked"
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

    def channel_error_due(self, link: ChannelLink) -> None: ...

    def exclusive_declared(self, link: ChannelLink, queue: str) -> None: ...

    def exclusive_deleted(self, link: ChannelLink, queue: str) -> None: ...

    def acks_due(self, link: ChannelLink) -> None: ...

    def unreadable_answered(self, link: ChannelLink, exchange_found: bool) -> None: ...

    def upstream_blocked(self, upstream: UpstreamConnection) -> None: ...

    def upstream_unblocked(self, upstream: UpstreamConnection) -> None: ...

    def hold_reading(self, holder: object) -> None: ...

    def release_reading(self, holder: object) -> None: ...

    def close_with(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None: ...


#: Requests whose replies go to the client.
CLIENT_REPLIES: Final = frozenset(
    (
        Request.FORWARD,
        Request.EXCLUSIVE,
        Request.CONSUME,
        Request.CONSUME_AUTO_ACK,
        Request.NAMED_AUTO_ACK,
        Request.DELETE_EXCLUSIVE,
    )
)
#: Consumes whose ConsumeOk the proxy reads: it names the tag, or starts the proxy's acks.
_CONSUMES: Final = frozenset(
    (
        Request.CONSUME,
        Request.CONSUME_AUTO_ACK,
        Request.CONSUME_AUTO_ACK_UNASKED,
        Request.NAMED_AUTO_ACK,
        Request.NAMED_AUTO_ACK_UNASKED,
    )
)
_SERVER_NAMED: Final = frozenset(
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
#: The low octet of Basic.Reject's and Basic.Nack's method ids.
_REJECT: Final = m.commands.Basic.Reject.index & 0xFF
_NACK: Final = m.commands.Basic.Nack.index & 0xFF


def _consumer_tag(payload: memoryview) -> str:
    """The consumer tag that opens the arguments of Deliver, ConsumeOk, Cancel, CancelOk."""
    return bytes(payload[5 : 5 + payload[4]]).decode("utf-8", "surrogateescape")


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
        "error_due",
        "forwarding",
        "global_prefetch",
        "global_qos_set",
        "last_publish",
        "manual_unacked",
        "owes_close_ok",
        "parked_since",
        "publishes",
        "recovers",
        "replies_due",
        "requests",
        "safe",
        "settle_after_content",
        "synced_publishes",
        "transactional",
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
        #: A Channel.Close (code, text, method id) the proxy owes the client for an error it
        #: found itself, sent once the broker has answered what came before (as it would).
        self.error_due: tuple[int, str, int] | None = None
        #: The proxy confirmed a Channel.Close from the broker (never twice: RabbitMQ may
        #: send one per failing pipelined command, and a second CloseOk closes the connection).
        self.close_answered = False
        #: Synchronous requests sent upstream, oldest first: what to do with the reply, the
        #: publish count when it was sent, the methods that answer it, and what it is about
        #: (a queue name, for the kinds that need one).
        self.requests: deque[tuple[Request, int, frozenset[int], str]] = deque()
        #: How many of them the client awaits the reply to (CLIENT_REPLIES).
        self.replies_due = 0
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
        #: On a channel with such consumers, the client's other deliveries not yet acked.
        self.manual_unacked: set[int] = set()
        #: Recovers sent and not yet answered on such a channel.
        self.recovers = 0
        #: A reply with content (GetOk) is on its way to the client: what its reply settles
        #: (a close, a park) waits for the content, which the client must get first.
        self.settle_after_content = False
        #: The client selected transactions: acks of the proxy's would join them.
        self.transactional = False
        #: The message being received has properties RabbitMQ could not read.
        self.unreadable = False

    # --- sending upstream -------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.upstream.send(data)

    def send_request(
        self, data: bytes, mid: int, kind: Request = Request.FORWARD, subject: str = ""
    ) -> None:
        """Send a synchronous request (method `mid`) whose reply will come on this channel."""
        self.requests.append((kind, self.publishes, m.ANSWERS[mid], subject))
        if kind in CLIENT_REPLIES:
            self.replies_due += 1
        self.upstream.send(data)

    def open_upstream(self) -> None:
        self.send_request(
            frame(METHOD, self.upstream_number, CHANNEL_OPEN_PAYLOAD), m.CHANNEL_OPEN, Request.OPEN
        )

    def sync(self) -> None:
        """Ask for a reply that shows the broker has processed all sent so far."""
        self._send_marker()

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
        return self.replies_due > 0

    @property
    def unanswered(self) -> bool:
        """The client published since the broker last answered here, or awaits an answer:
        its Channel.Close is answered after that (close_policy processed), as the broker's
        would be."""
        return self.publishes > self.synced_publishes or self.awaits_reply

    @property
    def client_open(self) -> bool:
        """The client may use the channel (it has not closed it, nor been told it is closed,
        nor made an error the proxy found)."""
        return not (self.owes_close_ok or self.awaits_close_ok or self.error_due)

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
        self.error_due = None
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
        self.error_due = None
        self.settle_after_content = False
        self.delivering = 0
        self.delivery_left = NO_CONTENT
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
            self._reply(mid, payload, forward)
            return
        if mid == m.CHANNEL_CLOSE:
            self._broker_close(payload)
            return
        if mid == m.CHANNEL_CLOSE_OK:
            self._close_ok()
            return
        if mid == m.BASIC_DELIVER:
            self.upstream.stats.delivered += 1
            if self.auto_ack_tags and forward:
                forward = self._delivery_started(payload)
        elif mid == m.BASIC_CANCEL:
            self._forget_tag(payload)
            if forward and "consumer_cancel_notify" not in self.client.capabilities:  # type: ignore[union-attr]
                forward = False
        self.forwarding = forward
        if forward:
            self.client.deliver(METHOD, self.client_number, payload)  # type: ignore[union-attr]

    def _reply(self, mid: int, payload: memoryview, forward: bool) -> None:
        """A reply to a request sent on this channel: the client gets it (and its content)
        before whatever it settles."""
        request = self._answered(mid)
        if request is not None:
            kind, publishes, _, subject = request
            if publishes > self.synced_publishes:
                self.synced_publishes = publishes
            if kind is not Request.FORWARD:
                forward = self._proxy_reply(kind, payload, subject)
        self.forwarding = forward
        if mid == m.BASIC_GET_OK:
            self.upstream.stats.delivered += 1
            if self.auto_ack_tags is not None:
                self.manual_unacked.add(_U64.unpack_from(payload, 4)[0])
        elif self.auto_ack_tags is not None:
            if mid == m.BASIC_CANCEL_OK:
                self.auto_ack_tags.discard(_consumer_tag(payload))
            elif mid == m.BASIC_RECOVER_OK and self.recovers:
                self.recovers -= 1
        if forward:
            self.client.deliver(METHOD, self.client_number, payload)  # type: ignore[union-attr]
            if mid == m.BASIC_GET_OK:
                self.settle_after_content = True
                self.delivery_left = HEADER_EXPECTED
                return
        self._settle()

    def _settle(self) -> None:
        """After a reply (and its content): park the channel once clean if its client left,
        or answer the client's close once the broker has answered what came before it."""
        if self.client is None:
            if not self.requests and self.up is Up.OPEN:
                self.client_left()  # clean now: park it
        elif self.owes_close_ok and not (
            self.unsynced if self.close_for_connection else self.unanswered
        ):
            self._close_synced()
        elif self.error_due is not None and not self.unanswered:
            self.client.channel_error_due(self)

    def _answered(self, mid: int) -> tuple[Request, int, frozenset[int], str] | None:
        """The oldest pending request that reply `mid` answers, taken off the list."""
        requests = self.requests
        for i, request in enumerate(requests):
            if mid in request[2]:
                del requests[i]
                if request[0] in CLIENT_REPLIES:
                    self.replies_due -= 1
                return request
        return None

    def _forget_requests(self) -> None:
        self.requests.clear()
        self.replies_due = 0

    def _proxy_reply(self, kind: Request, payload: memoryview, subject: str) -> bool:
        """A reply to a request the proxy made or rewrote; True when the client gets it."""
        client = self.client
        if kind is Request.DELETE_EXCLUSIVE or kind is Request.DELETE_EXCLUSIVE_UNASKED:
            if client is not None:
                client.exclusive_deleted(self, subject)
            return kind is Request.DELETE_EXCLUSIVE and client is not None
        if kind is Request.EXCLUSIVE or kind is Request.EXCLUSIVE_UNASKED:
            ok = m.decode_broker_method(payload)
            assert isinstance(ok, m.commands.Queue.DeclareOk)
            queue = ok.queue or ""
            if client is not None:
                client.exclusive_declared(self, queue)
            else:  # its client left before the DeclareOk: nobody else will delete it
                self.upstream.delete_queues({queue}, None, ())
            return kind is Request.EXCLUSIVE and client is not None
        if kind in _CONSUMES:
            tag = _consumer_tag(payload)
            if kind in _SERVER_NAMED:
                self.consumer_tag_taken(tag)
            if kind is not Request.CONSUME:
                if self.auto_ack_tags is None:
                    self.auto_ack_tags = set()
                self.auto_ack_tags.add(tag)
            return kind in CLIENT_REPLIES and client is not None and not self.awaits_close_ok
        if kind is Request.UNREADABLE and client is not None:
            client.unreadable_answered(self, True)
        return False  # OPEN, DROP, MARKER, UNREADABLE, CANCEL_UNASKED

    def consumer_tag_taken(self, tag: str) -> None:
        """A consumer tag is in use on the channel (the broker refuses it a second time)."""
        if self.consumer_tags is None:
            self.consumer_tags = set()
        self.consumer_tags.add(tag)

    def cancel_kind(self, tag: str, nowait: bool) -> Request | None:
        """The client cancels a consumer: the request to send its Cancel as (None when the
        proxy need not see the reply), with the nowait flag to clear."""
        if self.consumer_tags:
            self.consumer_tags.discard(tag)
        if nowait and self.auto_ack_tags and tag in self.auto_ack_tags:
            return Request.CANCEL_UNASKED
        return None

    # --- deliveries of consumers the proxy acks for their clients -----------------------------

    def _delivery_started(self, payload: memoryview) -> bool:
        """A delivery on a channel with no_ack consumers; False when the client must not
        get it."""
        tag = _U64.unpack_from(payload, 5 + payload[4])[0]
        if _consumer_tag(payload) not in self.auto_ack_tags:  # type: ignore[operator]
            self.manual_unacked.add(tag)
            return True
        if self.recovers:
            # sent before the broker processed the client's Recover, which requeued it (the
            # proxy had not acked it): the client gets it when it comes again
            return False
        self.delivering = tag
        self.delivery_left = HEADER_EXPECTED
        return True

    def content_forwarded(self, frame_type: int, payload: memoryview) -> None:
        """A content frame of a message being tracked (a delivery to ack for the client,
        a GetOk whose reply settles something) went to the client."""
        if self.delivery_left == HEADER_EXPECTED:
            self.delivery_left = _U64.unpack_from(payload, 4)[0]
        else:
            self.delivery_left -= len(payload)
        if self.delivery_left > 0:
            return
        self.delivery_left = NO_CONTENT
        if self.delivering:
            self.auto_acks.append(self.delivering)
            self.delivering = 0
            if self.client is not None:
                self.client.acks_due(self)
        if self.settle_after_content:
            self.settle_after_content = False
            self._settle()

    def send_auto_acks(self) -> None:
        """The client's socket has taken these deliveries: ack them upstream, where the
        proxy consumed them with acks on the client's behalf."""
        self._ack(self.auto_acks)
        self.auto_acks.clear()

    def settle_auto_acks(self, upto: int | None = None) -> None:
        """Before a method that requeues unacked deliveries (Recover; a multiple Nack, up to
        `upto`): ack what the client has of its no_ack consumers, the message on its way
        included, which a direct client would never see again."""
        if self.delivering and (upto is None or self.delivering <= upto):
            self.auto_acks.append(self.delivering)
            self.delivering = 0
        if upto is None:
            self.send_auto_acks()
        else:
            self._ack([t for t in self.auto_acks if t <= upto])
            self.auto_acks[:] = [t for t in self.auto_acks if t > upto]

    def _ack(self, tags: list[int]) -> None:
        if self.up is Up.OPEN and tags:
            number = self.upstream_number
            self.upstream.send(
                b"".join(
                    frame(METHOD, number, ACK_METHOD + _U64.pack(tag) + ACK_ONE) for tag in tags
                )
            )

    def recover(self) -> None:
        """The client asks for its unacked deliveries again (Basic.Recover). A direct
        client's no_ack deliveries are not among them; here they are unacked upstream, so
        the proxy acks what the client has and drops what the broker sends until the
        RecoverOk (it requeued those: they come again)."""
        self.settle_auto_acks()
        self.manual_unacked.clear()
        self.recovers += 1

    def client_acked(self, payload: memoryview) -> bool:
        """The client acked, rejected or nacked deliveries on a channel with no_ack consumers
        (False: nothing to send). Those need no ack of ours. A requeueing Nack of many must
        not requeue what a no_ack consumer gave it; and "every delivery so far" (tag 0)
        means the client's own unacked deliveries, not the proxy's."""
        tag = _U64.unpack_from(payload, 4)[0]
        method = payload[3]
        manual = self.manual_unacked
        if not payload[12] & 1 or method == _REJECT:  # one delivery
            manual.discard(tag)
            if tag == self.delivering:
                self.delivering = 0
            elif tag in self.auto_acks:
                self.auto_acks.remove(tag)
            return True
        if tag == 0:
            if not manual:
                return False  # none of the client's own: nothing a direct client would ack
            tag = max(manual)
            payload[4:12] = _U64.pack(tag)
        if manual:
            self.manual_unacked = {t for t in manual if t > tag}
        if method == _NACK:
            self.settle_auto_acks(tag)
            return True
        self.auto_acks[:] = [t for t in self.auto_acks if t > tag]
        if self.delivering <= tag:
            self.delivering = 0
        return True

    def _forget_tag(self, payload: memoryview) -> None:
        """The broker cancelled a consumer (its queue is gone): its deliveries are over."""
        tag = _consumer_tag(payload)
        if self.consumer_tags:
            self.consumer_tags.discard(tag)
        if self.auto_ack_tags:
            self.auto_ack_tags.discard(tag)

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
        self._forget_requests()
        self.error_due = None  # the broker's error came first: the client gets that one
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
        self._forget_requests()

    def touch_parked(self) -> None:
        self.parked_since = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"<ChannelLink client={self.client_number} upstream={self.upstream_number} "
            f"up={self.up.value} owes_close_ok={self.owes_close_ok} "
            f"awaits_close_ok={self.awaits_close_ok} requests={len(self.requests)}>"
        )
