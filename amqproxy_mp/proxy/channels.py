"""A client channel and the upstream channel it rides on: the one place their state changes.

A `ChannelLink` is the object both hops look up, the client session by its channel number
and the upstream connection by the upstream number. Each side has its own close handshake,
so each has its own state: the client side (`owes_close_ok`, `awaits_close_ok`, `error_due`)
and the upstream side (`up`). Every change of either is a method below; `_set_up` is the only
code that changes `up`, and it keeps the pool's park list in step with it. The link also
keeps the requests it sent upstream and not yet seen answered (requests.py): a reply proves
that the broker has processed everything sent on the channel before its request, which is
how the proxy knows when a departing client's publishes can no longer close the channel (so
that it may be handed to the next client), and when to answer a client's close.

Life of the upstream channel (the client side is open until the client closes or leaves):

    OPEN --client leaves, unsafe----------------------> CLOSING --CloseOk--> CLOSED
    OPEN --client leaves, safe, clean-----------------> PARKED --next client--> OPEN
    OPEN --client leaves, safe, not clean: marker; once answered--> PARKED
    PARKED --idle timeout, connection retires---------> CLOSING
    OPEN, PARKED --broker Channel.Close---------------> CLOSED
    any --connection gone-----------------------------> CLOSED
"""

from __future__ import annotations

import asyncio
import enum
import struct
import time
from typing import Final, Generic, TypeVar

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import METHOD, frame, renumbered
from amqproxy_mp.proxy import prefetch
from amqproxy_mp.proxy.auto_ack import AutoAcks, consumer_tag
from amqproxy_mp.proxy.confirms import ClientConfirms, Unconfirmed, UpstreamConfirms
from amqproxy_mp.proxy.prefetch import Prefetch
from amqproxy_mp.proxy.publishing import HEADER_EXPECTED, NO_CONTENT, IncomingMessage
from amqproxy_mp.proxy.requests import (
    CLIENT_REPLIES,
    CONSUMES,
    EXCLUSIVE_DECLARES,
    SERVER_NAMED,
    PendingRequests,
    Request,
)
from amqproxy_mp.proxy.sides import ClientSide, UpstreamSide

_U64: Final = struct.Struct(">Q")
#: Basic.Ack's and Basic.Nack's delivery tag and flags (bit 0: multiple).
_ACK_ARGUMENTS: Final = struct.Struct(">QB")
#: Basic.Ack's method id, and its flags octet when it acks one delivery.
ACK_METHOD: Final = spec.BASIC_ACK.to_bytes(4, "big")
ACK_ONE: Final = b"\x00"


#: The upstream connection class, as the link's user knows it (the link needs only UpstreamSide).
UpstreamT = TypeVar("UpstreamT", bound=UpstreamSide)


class Up(enum.Enum):
    """The upstream channel's state."""

    OPEN = "open"
    #: Clean, its client gone: in its pool's park list, waiting for the next client.
    PARKED = "parked"
    #: The proxy sent Channel.Close; the number is freed when the broker's CloseOk arrives.
    CLOSING = "closing"
    #: The broker confirmed the close, or closed it and got its CloseOk: the number is free.
    CLOSED = "closed"


class ChannelLink(Generic[UpstreamT]):
    """One client channel mapped onto one upstream channel."""

    __slots__ = (
        "auto_acks",
        "awaits_close_ok",
        "client",
        "client_confirms",
        "client_number",
        "close_answered",
        "close_confirmed",
        "close_due",
        "close_for_connection",
        "confirms",
        "consumer_tags",
        "delivery_left",
        "error_due",
        "forwarding",
        "incoming",
        "owes_close_ok",
        "parked_since",
        "pinned",
        "prefetch",
        "publishes",
        "requests",
        "safe",
        "settle_after_content",
        "synced_publishes",
        "transactional",
        "up",
        "upstream",
        "upstream_number",
    )

    def __init__(
        self,
        client: ClientSide | None,
        client_number: int,
        upstream: UpstreamT,
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
        self.requests = PendingRequests()
        #: Publishes sent upstream, and how many of them a reply has shown to be processed.
        self.publishes = 0
        self.synced_publishes = 0
        #: The last method from the broker went to the client: so do its content frames.
        self.forwarding = False
        #: The message the client is publishing.
        self.incoming = IncomingMessage()
        #: The consumer tags in use on this channel (the broker refuses a second one with 530).
        self.consumer_tags: set[str] | None = None
        #: Only complete publishes, Basic.Get with no_ack and Basic.Qos happened on it: it may
        #: be handed to the next client once clean (see `client_left`).
        self.safe = True
        #: The client's channel has state only this upstream channel holds (see not_reusable).
        self.pinned = False
        self.prefetch = Prefetch()
        self.parked_since = 0.0
        #: From the client's first no_ack consumer on (see auto_ack.py).
        self.auto_acks: AutoAcks | None = None
        #: How much of the content of a message being tracked on its way to the client is
        #: still to come (HEADER_EXPECTED: its header; see `content_forwarded`).
        self.delivery_left = NO_CONTENT
        #: A reply with content (GetOk) is on its way to the client: what its reply settles
        #: (a close, a park) waits for the content, which the client must get first.
        self.settle_after_content = False
        #: The client selected transactions: acks of the proxy's would join them.
        self.transactional = False
        #: The upstream channel's confirm mode, which the proxy selects (confirms.py).
        self.confirms: UpstreamConfirms | None = None
        #: The client's own confirm mode (it sent Confirm.Select), until it leaves.
        self.client_confirms: ClientConfirms | None = None
        #: The client's close is answered once the broker confirmed its publishes
        #: (close_policy confirmed), not merely processed them.
        self.close_confirmed = False
        #: A Channel.Close to send upstream once the broker has confirmed what is pending
        #: (a channel's close would lose the confirms still due).
        self.close_due: bytes | None = None

    @classmethod
    def closed_for_client(
        cls, client: ClientSide, client_number: int, upstream: UpstreamT
    ) -> ChannelLink[UpstreamT]:
        """A channel the proxy closed on the client's side with no upstream channel behind
        it, until the client confirms (see ClientSession.channel_error_due)."""
        link = cls(client, client_number, upstream, 0)
        link.up = Up.CLOSED
        link.awaits_close_ok = True
        return link

    # --- the upstream channel's state -------------------------------------------------------

    def _set_up(self, state: Up) -> None:
        """The one place the upstream channel's state changes; the park list follows it."""
        was = self.up
        if was is state:
            return
        self.up = state
        pool = self.upstream.pool
        if was is Up.PARKED and pool is not None:
            pool.unparked(self)
        if state is Up.PARKED:
            assert pool is not None  # a connection with channels has its vhost open
            self.parked_since = time.monotonic()
            pool.parked(self)

    @property
    def upstream_open(self) -> bool:
        return self.up is Up.OPEN or self.up is Up.PARKED

    # --- sending upstream -------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.upstream.send(data)

    def send_nowait(self, data: bytes) -> None:
        """A method without a reply (a nowait declare...): the channel can no longer move,
        as nothing would tell whether the broker had it when its connection ended."""
        self.pinned = True
        self.upstream.send(data)

    def send_request(
        self,
        data: bytes,
        mid: int,
        kind: Request = Request.FORWARD,
        subject: str = "",
        waiter: asyncio.Future[bool] | None = None,
    ) -> None:
        """Send a synchronous request (method `mid`) whose reply will come on this channel."""
        self.requests.add(kind, self.publishes, mid, subject, waiter)
        self.upstream.send(data)

    def open_upstream(self) -> None:
        data = frame(METHOD, self.upstream_number, spec.CHANNEL_OPEN_PAYLOAD)
        self.send_request(data, spec.CHANNEL_OPEN, Request.OPEN)

    def sync(
        self, kind: Request = Request.MARKER, waiter: asyncio.Future[bool] | None = None
    ) -> None:
        """Ask for a reply that shows the broker has processed all sent so far (a request
        with no effect: a passive declare of amq.direct)."""
        data = frame(METHOD, self.upstream_number, spec.MARKER_PAYLOAD)
        self.send_request(data, spec.EXCHANGE_DECLARE, kind, waiter=waiter)

    def when_synced(self) -> asyncio.Future[bool]:
        """True once the broker has answered everything sent on the channel so far; False
        if the channel closes first."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.sync(Request.SYNC, waiter)
        return waiter

    def publish(self) -> None:
        """The client's message is complete: send it in one piece, and keep it until the
        broker confirms it (unless the channel is transactional)."""
        self.publishes += 1
        data = self.incoming.take()
        if self.transactional:
            self.upstream.send(data)
            return
        confirms = self.confirms
        if confirms is None:
            confirms = self._select_confirms()
        self.upstream.send(data)
        confirms.add(Unconfirmed(data, self.client_confirms), self.client)

    def _select_confirms(self) -> UpstreamConfirms:
        self.upstream.send(frame(METHOD, self.upstream_number, spec.CONFIRM_SELECT_NOWAIT_PAYLOAD))
        self.confirms = UpstreamConfirms(self.upstream.unconfirmed)
        return self.confirms

    def select_confirms(self, nowait: bool) -> None:
        """The client's Confirm.Select (sent on as it is, for the broker's SelectOk in order):
        its publishes are numbered from 1 on, and answered under those numbers."""
        if self.confirms is None:
            self.confirms = UpstreamConfirms(self.upstream.unconfirmed)
        if self.client_confirms is None and self.client is not None:
            self.client_confirms = ClientConfirms(self.client, self.client_number)
        if not nowait and self.client_confirms is not None:
            self.client_confirms.selects_due += 1

    def republish(self, messages: list[Unconfirmed]) -> None:
        """Send again what another upstream channel could not get confirmed. On a channel
        of the proxy's own, it parks once the broker has confirmed them."""
        confirms = self.confirms or self._select_confirms()
        number, frame_max = self.upstream_number, self.upstream.frame_max
        for message in messages:
            message.data = renumbered(message.data, number, frame_max)
            confirms.adopt(message)
        self.publishes += len(messages)
        self.upstream.send(b"".join(message.data for message in messages))
        self.upstream.stats.resent += len(messages)
        if self.client is None:
            self.client_left()

    @property
    def movable(self) -> bool:
        """Its client's channel could go on on another upstream channel: it holds no state
        of the channel's (consumers, deliveries, a transaction), awaits no reply but a
        Confirm.Select's (asked again there: see `took_over`), and is in no close or error
        of its own."""
        selects = self.client_confirms.selects_due if self.client_confirms is not None else 0
        return (
            self.up is Up.OPEN
            and not self.pinned
            and self.requests.replies_due == selects
            and not (self.awaits_close_ok or self.error_due or self.settle_after_content)
        )

    def took_over(self, old: ChannelLink[UpstreamT], messages: list[Unconfirmed]) -> None:
        """This new upstream channel carries `old`'s client channel from now on (`old`'s
        connection ended): the client's state moves here, and what the broker had not
        confirmed is published here again first, in its order."""
        self.safe = old.safe
        prefetch.moved(old, self)
        self.client_confirms, old.client_confirms = old.client_confirms, None
        self.incoming, old.incoming = old.incoming, self.incoming
        self.incoming.parts = [
            renumbered(part, self.upstream_number, self.upstream.frame_max)
            for part in self.incoming.parts
        ]
        self.owes_close_ok = old.owes_close_ok
        self.close_for_connection = old.close_for_connection
        self.close_confirmed = old.close_confirmed
        old.client = None
        selecting = self.client_confirms
        if selecting is not None and selecting.selects_due:
            # the client awaits its SelectOk (the one reply a movable channel may await): its
            # Confirm.Select is asked again here, and the broker's answer goes to it
            self.confirms = UpstreamConfirms(self.upstream.unconfirmed)
            select = frame(METHOD, self.upstream_number, spec.CONFIRM_SELECT_PAYLOAD)
            for _ in range(selecting.selects_due):
                self.send_request(select, spec.CONFIRM_SELECT)
        elif selecting is not None and self.confirms is None:
            self._select_confirms()  # (the client's confirm mode: its Tx.Select stays a 406)
        if messages:
            self.republish(messages)
        if self.owes_close_ok:
            self.sync()  # its answer answers the client's close (see `_settle`)

    def _detach_confirms(self) -> None:
        """The client is gone from the channel: answers to its publishes are dropped."""
        if self.client_confirms is not None:
            self.client_confirms.client = None
            self.client_confirms = None

    @property
    def awaits_confirms(self) -> bool:
        """Messages sent on the channel wait for the broker's confirm."""
        return self.confirms is not None and self.confirms.unconfirmed > 0

    def take_unconfirmed(self) -> list[Unconfirmed]:
        """The connection ends: what the broker has not confirmed, to be sent again."""
        return self.confirms.take() if self.confirms is not None else []

    @property
    def clean(self) -> bool:
        """Nothing sent on it can still be answered or close it, nor waits for a confirm:
        fit for another client."""
        return (
            not self.requests
            and self.publishes == self.synced_publishes
            and not self.awaits_confirms
        )

    @property
    def unsynced(self) -> bool:
        """Publishes went upstream since the broker last answered on this channel."""
        return self.publishes > self.synced_publishes

    @property
    def awaits_reply(self) -> bool:
        """The client awaits the broker's answer to a request of its own (the proxy's own
        requests, whose replies it never sees, do not count)."""
        return self.requests.replies_due > 0

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

    # --- what the client does with it ---------------------------------------------------------

    def not_reusable(self, pinned: bool = True) -> None:
        """The client did something whose effects outlive it on the channel (a consumer,
        a transaction, unacked deliveries...): the channel is closed when it leaves.
        `pinned`: and the client's channel could not move to another upstream channel
        (spec.PINNING_METHODS; not so after a declare, bind or delete, whose effects are
        not the channel's)."""
        self.safe = False
        if pinned:
            self.pinned = True

    def select_tx(self) -> None:
        """Tx.Select: from now on the proxy's own acks would join the client's transaction,
        so what is due is acked before."""
        if self.auto_acks is not None:
            self.auto_acks.settle()
        self.transactional = True

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
        if nowait and self.auto_acks is not None and tag in self.auto_acks.tags:
            return Request.CANCEL_UNASKED
        return None

    def error_found(self, code: int, text: str, mid: int) -> None:
        """The proxy found an error the broker would close this channel for (405 for another
        client's exclusive queue, 406 for a message over max_message_size). Like the
        broker's, its Channel.Close comes after the answers to what the client sent before;
        until then the client's frames on the channel are dropped."""
        self.error_due = (code, text, mid)
        if self.unanswered:
            if self.unsynced:
                self.sync()
            return
        assert self.client is not None
        self.client.channel_error_due(self)

    # --- the client closes or leaves ---------------------------------------------------------

    def client_close(
        self, payload: memoryview | None, wait: bool, for_connection: bool, confirmed: bool
    ) -> bool:
        """The client closes this channel (Channel.Close, or its Connection.Close). Returns
        True when the close is complete now, False when the client must wait (the broker's
        answer, or with `confirmed` its confirms, are due first); the client is then told
        through `close_synced`."""
        self.close_for_connection = for_connection
        self.close_confirmed = confirmed
        self.error_due = None
        if self.up is not Up.OPEN:
            # The broker closed it already; the client is told (or was) by that Close.
            return True
        unconfirmed = confirmed and self.awaits_confirms
        if not self.safe:
            must_wait = not for_connection or (wait and self.unsynced) or unconfirmed
            self._close_upstream(payload)
            if must_wait:
                self.owes_close_ok = True
                return False
            self.client = None
            self._detach_confirms()
            return True
        # after a Connection.Close the client discards everything but the CloseOk: only
        # what it published matters then
        if wait and (self.unsynced if for_connection else self.unanswered):
            self.owes_close_ok = True
            self.sync()
            return False
        if unconfirmed:
            self.owes_close_ok = True  # answered by the last confirm (see `_confirmed`)
            return False
        self.client_left()
        return True

    def client_left(self) -> None:
        """The client is gone from this channel: close it upstream, or park it once clean."""
        self.client = None
        self.owes_close_ok = self.awaits_close_ok = self.forwarding = False
        self.error_due = None
        self._detach_confirms()
        self.settle_after_content = False
        if self.auto_acks is not None:
            self.auto_acks.delivering = 0
        self.delivery_left = NO_CONTENT
        self.incoming.drop()
        if self.up is not Up.OPEN:
            return  # parked, closing (the CloseOk frees the number) or closed already
        if not (self.safe and self.upstream.can_park):
            self._close_upstream(None)
        elif self.requests or self.unsynced:
            if not self.requests.has(Request.MARKER):
                self.sync()
        elif not self.awaits_confirms:
            self._set_up(Up.PARKED)
        # (else parked by the last confirm: see `_confirmed`)

    def reuse(self, client: ClientSide, client_number: int) -> None:
        """Hand a parked upstream channel to a new client channel."""
        self._set_up(Up.OPEN)
        self.client = client
        self.client_number = client_number
        self.safe = True
        self.pinned = False
        self.prefetch.reused()
        self.consumer_tags = None
        self.incoming.last_publish = b""

    def close_parked(self) -> None:
        """A parked channel's time is up (idle, or its connection retires)."""
        self._close_upstream(None)

    def _close_upstream(self, client_close: memoryview | None) -> None:
        if not self.upstream_open:
            return
        if client_close is not None:
            data = frame(METHOD, self.upstream_number, client_close)
        else:
            data = m.close_frame(self.upstream_number, spec.REPLY_SUCCESS, "client disconnected")
        if self.awaits_confirms:
            self.close_due = data  # sent by the last confirm (see `_confirmed`)
            return
        self._set_up(Up.CLOSING)
        self.upstream.send(data)

    def client_close_ok(self) -> bool:
        """The client confirmed our Channel.Close; True when the link is done with it."""
        self.awaits_close_ok = False
        if self.owes_close_ok:
            return False
        self.client_left()
        return True

    def upstream_gone(self) -> None:
        """The upstream connection is gone (its clients are told at the connection level;
        what it had not confirmed was taken first: see `take_unconfirmed`)."""
        self._set_up(Up.CLOSED)
        self.requests.clear()
        self.close_due = None

    # --- what the broker sends ---------------------------------------------------------------

    def broker_method(self, mid: int, payload: memoryview) -> None:
        """A method from the broker on this channel: update the state, pass it on or not."""
        # (a client whose close waits for the last confirm gets nothing more, as after the
        # broker's close: deliveries stay unacked, and are requeued by the close)
        forward = self.client is not None and not self.awaits_close_ok and self.close_due is None
        if mid in spec.REPLIES:
            self._reply(mid, payload, forward)
            return
        if mid == spec.CHANNEL_CLOSE:
            self._broker_close(payload)
            return
        if mid == spec.CHANNEL_CLOSE_OK:
            self._close_ok()
            return
        if mid == spec.BASIC_ACK or mid == spec.BASIC_NACK:
            # (every confirm-mode channel has `confirms`; one for the previous channel with
            # this number, closed by the broker, is not this one's)
            if self.confirms is not None and not self.requests.first_is(Request.OPEN):
                self._confirmed(mid == spec.BASIC_ACK, payload)
            return
        if mid == spec.BASIC_DELIVER:
            self.upstream.stats.delivered += 1
            if self.auto_acks is not None and self.auto_acks.tags and forward:
                tracked = self.auto_acks.delivery(payload)
                forward = tracked is not None
                if tracked:
                    self.delivery_left = HEADER_EXPECTED
        elif mid == spec.BASIC_CANCEL:
            self._forget_tag(consumer_tag(payload))
            if forward and "consumer_cancel_notify" not in self.client.capabilities:  # type: ignore[union-attr]
                forward = False
        self.forwarding = forward
        if forward:
            self.client.deliver(METHOD, self.client_number, payload)  # type: ignore[union-attr]

    def _reply(self, mid: int, payload: memoryview, forward: bool) -> None:
        """A reply to a request sent on this channel: the client gets it (and its content)
        before whatever it settles."""
        request = self.requests.answered(mid)
        if request is not None:
            if request.publishes > self.synced_publishes:
                self.synced_publishes = request.publishes
            if request.kind is not Request.FORWARD:
                forward = self._proxy_reply(request.kind, payload, request.subject)
            elif mid == spec.CONFIRM_SELECT_OK and self.client_confirms is not None:
                self.client_confirms.selects_due -= 1
        self.forwarding = forward
        auto_acks = self.auto_acks
        if mid == spec.BASIC_GET_OK:
            self.upstream.stats.delivered += 1
            if auto_acks is not None:
                auto_acks.got(payload)
        elif auto_acks is not None:
            if mid == spec.BASIC_CANCEL_OK:
                auto_acks.tags.discard(consumer_tag(payload))
            elif mid == spec.BASIC_RECOVER_OK:
                auto_acks.recover_ok()
        if forward:
            self.client.deliver(METHOD, self.client_number, payload)  # type: ignore[union-attr]
            if mid == spec.BASIC_GET_OK:
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
            (self.unsynced if self.close_for_connection else self.unanswered)
            or (self.close_confirmed and self.awaits_confirms)
            or self.close_due is not None  # (answered by the broker's CloseOk)
        ):
            self._close_synced()
        elif self.error_due is not None and not self.unanswered:
            self.client.channel_error_due(self)

    def _confirmed(self, ack: bool, payload: memoryview) -> None:
        """The broker confirmed publishes: the clients that selected confirms get their own
        answers; a nack of a message whose client did not is counted and logged (the broker
        refused it: sending it again would not help)."""
        assert self.confirms is not None
        self.forwarding = False  # (a Return's content, if any, is complete)
        tag, flags = _ACK_ARGUMENTS.unpack_from(payload, 4)
        answers: dict[ClientConfirms, list[int]] | None = None
        for message in self.confirms.settle(tag, bool(flags & 1)):
            if message.confirms is not None:
                if answers is None:
                    answers = {}
                answers.setdefault(message.confirms, []).append(message.client_seq)
            if not ack:
                self.upstream.stats.publish_nacks += 1
                if message.confirms is None or message.confirms.client is None:
                    self.confirms.buffer.refused(message)
        if answers is not None:
            for confirms, seqs in answers.items():
                confirms.answer(seqs, ack)
        if self.awaits_confirms:
            return
        if self.close_due is not None:
            data, self.close_due = self.close_due, None
            self._set_up(Up.CLOSING)
            self.upstream.send(data)
        elif not self.requests:
            self._settle()

    def _proxy_reply(self, kind: Request, payload: memoryview, subject: str) -> bool:
        """A reply to a request the proxy made or rewrote; True when the client gets it."""
        client = self.client
        if kind is Request.DELETE_EXCLUSIVE or kind is Request.DELETE_EXCLUSIVE_UNASKED:
            if client is not None:
                self.upstream.exclusive.deleted(subject, client)
            return kind is Request.DELETE_EXCLUSIVE and client is not None
        if kind is Request.EXCLUSIVE or kind is Request.EXCLUSIVE_UNASKED:
            ok = m.decode_broker_method(payload)
            assert isinstance(ok, m.commands.Queue.DeclareOk)
            queue = ok.queue or ""
            if client is not None:
                self.upstream.exclusive.declared(queue, client)
            else:  # its client left before the DeclareOk: nobody else will delete it
                self.upstream.exclusive.orphaned(queue)
            return kind is Request.EXCLUSIVE and client is not None
        if kind in CONSUMES:
            tag = consumer_tag(payload)
            if kind in SERVER_NAMED:
                self.consumer_tag_taken(tag)
            if kind is not Request.CONSUME:
                if self.auto_acks is None:
                    self.auto_acks = AutoAcks(self._ack)
                self.auto_acks.tags.add(tag)
            return kind in CLIENT_REPLIES and client is not None and not self.awaits_close_ok
        if kind is Request.UNREADABLE and client is not None:
            client.unreadable_answered(self, True)
        return False  # OPEN, DROP, MARKER, SYNC, UNREADABLE, CANCEL_UNASKED

    def _forget_tag(self, tag: str) -> None:
        """The broker cancelled a consumer (its queue is gone): its deliveries are over."""
        if self.consumer_tags:
            self.consumer_tags.discard(tag)
        if self.auto_acks is not None:
            self.auto_acks.tags.discard(tag)

    def _broker_close(self, payload: memoryview) -> None:
        """The broker closed the channel (404 and the like). RabbitMQ may send one Close per
        failing pipelined command: only the first is answered."""
        if self.requests.first_is(Request.OPEN):
            return  # a late Close for the previous channel with this number: not ours
        if self.close_answered or self.up is Up.CLOSED:
            return
        self.close_answered = True
        self.upstream.send(frame(METHOD, self.upstream_number, spec.CHANNEL_CLOSE_OK_PAYLOAD))
        unreadable = self.requests.has(Request.UNREADABLE)
        if unreadable:
            # the exchange of an unreadable message is missing: the publish's own 404
            close = m.decode_broker_method(payload)
            assert isinstance(close, m.commands.Channel.Close)
            payload = memoryview(
                m.close_frame(1, close.reply_code or 0, close.reply_text, 60, 40)[7:-1]
            )
        if self.client is None:  # declares of a departed client that will not be answered
            for queue in self.requests.subjects(EXCLUSIVE_DECLARES):
                self.upstream.exclusive.orphan_failed(queue)
        self.requests.clear()
        # the broker processed, in order, what came before the error: no confirm will come
        # for it now, and sending it again would duplicate it
        if self.confirms is not None:
            self.confirms.drop()
        self.close_due = None
        self.error_due = None  # the broker's error came first: the client gets that one
        released = self.upstream_open
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
            client.send(frame(METHOD, self.client_number, spec.CHANNEL_CLOSE_OK_PAYLOAD))
            if not self.awaits_close_ok:
                self.client_left()
        client.close_synced(self)

    def _release(self) -> None:
        self._set_up(Up.CLOSED)
        self.upstream.release_number(self)

    # --- content on its way to the client -------------------------------------------------

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
        if self.auto_acks is not None and self.auto_acks.delivered() and self.client is not None:
            self.client.acks_due(self)
        if self.settle_after_content:
            self.settle_after_content = False
            self._settle()

    def _ack(self, tags: list[int]) -> None:
        """Acks of the proxy's, for the deliveries of the client's no_ack consumers."""
        if self.up is Up.OPEN and tags:
            number = self.upstream_number
            self.upstream.send(
                b"".join(
                    frame(METHOD, number, ACK_METHOD + _U64.pack(tag) + ACK_ONE) for tag in tags
                )
            )

    def __repr__(self) -> str:
        return (
            f"<ChannelLink client={self.client_number} upstream={self.upstream_number} "
            f"up={self.up.value} owes_close_ok={self.owes_close_ok} "
            f"awaits_close_ok={self.awaits_close_ok} requests={len(self.requests)}>"
        )
