"""The synchronous requests a channel link has sent upstream and not yet seen answered.

The broker processes a channel's methods in order, so a reply proves that it has processed
everything sent on the channel before its request. Replies of one kind come in order; a
ConsumeOk, CancelOk or CommitOk may come after the replies to later requests (RabbitMQ sends
them once a queue has answered), so a reply is matched to the oldest request of its kind.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Final, NamedTuple

from amqproxy_mp.amqp import spec


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
    #: A marker someone awaits (see ChannelLink.when_synced): dropped.
    SYNC = "sync"


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
CONSUMES: Final = frozenset(
    (
        Request.CONSUME,
        Request.CONSUME_AUTO_ACK,
        Request.CONSUME_AUTO_ACK_UNASKED,
        Request.NAMED_AUTO_ACK,
        Request.NAMED_AUTO_ACK_UNASKED,
    )
)
#: Exclusive declares, whose DeclareOk makes the queue the client's.
EXCLUSIVE_DECLARES: Final = frozenset((Request.EXCLUSIVE, Request.EXCLUSIVE_UNASKED))
SERVER_NAMED: Final = frozenset(
    (Request.CONSUME, Request.CONSUME_AUTO_ACK, Request.CONSUME_AUTO_ACK_UNASKED)
)


class Pending(NamedTuple):
    kind: Request
    #: The link's publish count when it was sent: its reply shows those processed.
    publishes: int
    #: The methods that answer it.
    answers: frozenset[int]
    #: What it is about (a queue name, for the kinds that need one).
    subject: str
    #: Told True when it is answered, False when the channel closes first (Request.SYNC).
    waiter: asyncio.Future[bool] | None = None


class PendingRequests:
    """A link's unanswered requests, oldest first, and how many of them its client awaits."""

    __slots__ = ("_queue", "replies_due")

    def __init__(self) -> None:
        self._queue: deque[Pending] = deque()
        #: How many of them the client awaits the reply to (CLIENT_REPLIES).
        self.replies_due = 0

    def add(
        self,
        kind: Request,
        publishes: int,
        mid: int,
        subject: str,
        waiter: asyncio.Future[bool] | None = None,
    ) -> None:
        self._queue.append(Pending(kind, publishes, spec.ANSWERS[mid], subject, waiter))
        if kind in CLIENT_REPLIES:
            self.replies_due += 1

    def answered(self, mid: int) -> Pending | None:
        """The oldest pending request that reply `mid` answers, taken off the list."""
        queue = self._queue
        for i, request in enumerate(queue):
            if mid in request.answers:
                del queue[i]
                if request.kind in CLIENT_REPLIES:
                    self.replies_due -= 1
                if request.waiter is not None and not request.waiter.done():
                    request.waiter.set_result(True)
                return request
        return None

    def subjects(self, kinds: frozenset[Request]) -> list[str]:
        """What the pending requests of these kinds are about."""
        return [request.subject for request in self._queue if request.kind in kinds]

    def has(self, kind: Request) -> bool:
        return any(request.kind is kind for request in self._queue)

    def first_is(self, kind: Request) -> bool:
        return bool(self._queue) and self._queue[0].kind is kind

    def clear(self) -> None:
        for request in self._queue:
            if request.waiter is not None and not request.waiter.done():
                request.waiter.set_result(False)
        self._queue.clear()
        self.replies_due = 0

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)
