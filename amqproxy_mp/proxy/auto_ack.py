"""Consumers a client made with no_ack, which the proxy consumes with acks on its behalf.

A no_ack consumer on a shared connection would let the broker push without limit and lose
what a departing client had not read. So the proxy consumes with acks and acks each delivery
once it has left for the client's socket. What a direct client could observe must not change:
a Recover or a requeueing Nack must not bring back what a no_ack consumer gave the client,
and "every delivery so far" (tag 0) means the client's own unacked deliveries only. A
channel link owns one of these from the first such consumer on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from amqproxy_mp.amqp import spec

_U64: Final = struct.Struct(">Q")
#: The low octet of Basic.Reject's and Basic.Nack's method ids.
_REJECT: Final = spec.BASIC_REJECT & 0xFF
_NACK: Final = spec.BASIC_NACK & 0xFF


def consumer_tag(payload: memoryview) -> str:
    """The consumer tag that opens the arguments of Deliver, ConsumeOk, Cancel, CancelOk."""
    return bytes(payload[5 : 5 + payload[4]]).decode("utf-8", "surrogateescape")


class AutoAcks:
    """The acks a channel owes the broker for its client's no_ack consumers."""

    __slots__ = ("_ack", "delivering", "manual_unacked", "pending", "recovers", "tags")

    def __init__(self, ack: Callable[[list[int]], None]) -> None:
        #: Sends acks upstream on the channel (nothing once it is closed).
        self._ack = ack
        #: The consumers the proxy acks for.
        self.tags: set[str] = set()
        #: The delivery tag of such a consumer's message on its way to the client.
        self.delivering = 0
        #: Deliveries handed to the client, to ack once they have left for its socket.
        self.pending: list[int] = []
        #: The client's other deliveries on the channel, not yet acked by it.
        self.manual_unacked: set[int] = set()
        #: Recovers sent and not yet answered.
        self.recovers = 0

    def delivery(self, payload: memoryview) -> int | None:
        """A Basic.Deliver: None when the client must not get it, else the tag to track
        to the end of its content (0: the client acks it itself)."""
        tag: int = _U64.unpack_from(payload, 5 + payload[4])[0]
        if consumer_tag(payload) not in self.tags:
            self.manual_unacked.add(tag)
            return 0
        if self.recovers:
            # sent before the broker processed the client's Recover, which requeued it (the
            # proxy had not acked it): the client gets it when it comes again
            return None
        self.delivering = tag
        return tag

    def delivered(self) -> bool:
        """The message on its way has all left for the client: True when an ack is due."""
        if not self.delivering:
            return False
        self.pending.append(self.delivering)
        self.delivering = 0
        return True

    def got(self, payload: memoryview) -> None:
        """A Basic.GetOk: a delivery the client acks itself."""
        self.manual_unacked.add(_U64.unpack_from(payload, 4)[0])

    def flush(self) -> None:
        """Send the acks due (the client's socket has taken those deliveries)."""
        tags, self.pending = self.pending, []
        self._ack(tags)

    def settle(self, upto: int | None = None) -> None:
        """Before a method that requeues unacked deliveries (Recover, Tx.Select; a multiple
        Nack, up to `upto`): ack what the client has of its no_ack consumers, the message on
        its way included, which a direct client would never see again."""
        if self.delivering and (upto is None or self.delivering <= upto):
            self.pending.append(self.delivering)
            self.delivering = 0
        if upto is None:
            self.flush()
            return
        self._ack([t for t in self.pending if t <= upto])
        self.pending = [t for t in self.pending if t > upto]

    def recover(self) -> None:
        """The client asks for its unacked deliveries again: ack what it has of the no_ack
        consumers and drop what the broker sends until the RecoverOk (it requeued those:
        they come again)."""
        self.settle()
        self.manual_unacked.clear()
        self.recovers += 1

    def recover_ok(self) -> None:
        if self.recovers:
            self.recovers -= 1

    def client_acked(self, payload: memoryview) -> bool:
        """The client acked, rejected or nacked deliveries (payload rewritten in place where
        needed): whether to send it (the proxy's own acks due before it are sent)."""
        tag: int = _U64.unpack_from(payload, 4)[0]
        method = payload[3]
        manual = self.manual_unacked
        if not payload[12] & 1 or method == _REJECT:  # one delivery
            manual.discard(tag)
            if tag == self.delivering:
                self.delivering = 0
            elif tag in self.pending:
                self.pending.remove(tag)
            return True
        if tag == 0:
            if not manual:
                return False  # none of the client's own: nothing a direct client would ack
            tag = max(manual)
            payload[4:12] = _U64.pack(tag)
        if manual:
            self.manual_unacked = {t for t in manual if t > tag}
        if method == _NACK:
            self.settle(tag)
            return True
        self.pending = [t for t in self.pending if t > tag]
        if self.delivering <= tag:
            self.delivering = 0
        return True
