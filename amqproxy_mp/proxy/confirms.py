"""Publishes the broker has not confirmed yet, kept by the proxy until it does.

Every upstream channel that carries a publish runs in confirm mode, selected by the proxy
before its first publish (Confirm.Select with nowait) whether or not its clients asked for
confirms, unless the channel is transactional (a commit answers for its publishes). Each
message is kept, as the bytes sent, until the broker acks or nacks it: if the upstream
connection ends first, its pool publishes it again through another connection (pool.py), so
delivery is at least once. A client that selected confirms itself gets the broker's answers
under its own sequence numbers (`ClientConfirms`), whatever channel carried the message.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from typing import Final, Protocol, cast

from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import HEADER_SIZE, METHOD

log = logging.getLogger(__name__)

_ACK: Final = struct.Struct(">IQB")


class ConfirmsClient(Protocol):
    """A client session, as far as confirms need it."""

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None: ...

    def hold_reading(self, holder: object) -> None: ...

    def release_reading(self, holder: object) -> None: ...


class ClientConfirms:
    """A client channel's own confirm mode: its sequence numbers, and those not yet answered."""

    __slots__ = ("client", "next_seq", "number", "selects_due", "unanswered")

    def __init__(self, client: ConfirmsClient, number: int) -> None:
        #: None once the client's channel is gone: answers are then dropped.
        self.client: ConfirmsClient | None = client
        self.number = number
        #: The client's Confirm.Selects whose SelectOk it has not had yet.
        self.selects_due = 0
        self.next_seq = 1
        #: In increasing order (a dict keeps insertion order).
        self.unanswered: dict[int, None] = {}

    def numbered(self) -> int:
        seq = self.next_seq
        self.next_seq = seq + 1
        self.unanswered[seq] = None
        return seq

    def answer(self, seqs: list[int], ack: bool) -> None:
        """The broker acked or nacked these (increasing) numbers of the client's."""
        unanswered = self.unanswered
        for seq in seqs:
            unanswered.pop(seq, None)
        client = self.client
        if client is None:
            return
        last = seqs[-1]
        if ack and len(seqs) > 1 and (not unanswered or next(iter(unanswered)) > last):
            # every earlier number is answered: one multiple ack says it
            client.deliver(METHOD, self.number, memoryview(_ACK.pack(spec.BASIC_ACK, last, 1)))
            return
        mid = spec.BASIC_ACK if ack else spec.BASIC_NACK
        for seq in seqs:
            client.deliver(METHOD, self.number, memoryview(_ACK.pack(mid, seq, 0)))


class Unconfirmed:
    """One message the broker has not confirmed: its frames as last sent, and whose it is."""

    __slots__ = ("client_seq", "confirms", "data", "size")

    def __init__(self, data: bytes, confirms: ClientConfirms | None) -> None:
        self.data = data
        #: What the buffer counts for it (its data may be re-split for another channel).
        self.size = len(data)
        #: The client's own confirm mode, when it selected one, and its number there.
        self.confirms = confirms
        self.client_seq = confirms.numbered() if confirms is not None else 0

    def destination(self) -> str:
        """Exchange and routing key, for a log line."""
        data = self.data
        position = HEADER_SIZE + 6  # class, method, reserved short
        names = []
        for _ in range(2):
            size = data[position]
            names.append(data[position + 1 : position + 1 + size].decode("utf-8", "replace"))
            position += 1 + size
        return f"exchange {names[0]!r}, routing key {names[1]!r}"


class UnconfirmedBuffer:
    """All unconfirmed messages of a worker: their count and bytes, bounded by `limit`.

    Over the limit, each client that publishes is held (not read) until the buffer is
    back under half of it: publishers are slowed, never dropped.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.size = 0
        self._held: set[ConfirmsClient] = set()
        #: Nacks not logged yet, and when the last line was (see `refused`).
        self._refusals = 0
        self._refusal_logged = -1.0

    def added(self, size: int, client: ConfirmsClient | None) -> None:
        self.count += 1
        self.size += size
        if self.size > self.limit and client is not None and client not in self._held:
            if not self._held:
                log.warning(
                    "%d unconfirmed messages (%d bytes) over the buffer of %d bytes: "
                    "holding publishers until the broker confirms",
                    self.count, self.size, self.limit,
                )  # fmt: skip
            self._held.add(client)
            client.hold_reading(self)

    def removed(self, messages: list[Unconfirmed]) -> None:
        """These are confirmed, nacked, or given up on: no longer counted."""
        self.count -= len(messages)
        self.size -= sum(m.size for m in messages)
        if self._held and self.size <= self.limit // 2:
            held, self._held = self._held, set()
            for client in held:
                client.release_reading(self)

    def refused(self, message: Unconfirmed) -> None:
        """The broker nacked a message whose client did not ask for confirms (or has left):
        logged, at most once a second with how many there were (a queue that refuses
        publishes, or is electing a leader, can nack thousands a second)."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            log.warning(
                "the broker refused (nack) %d message(s) whose clients did not ask for "
                "confirms; the last to %s",
                self._refusals, message.destination(),
            )  # fmt: skip
            self._refusals = 0
            self._refusal_logged = now

    def forget(self, client: object) -> None:
        """A client is gone (see ClientConnection.connection_lost)."""
        self._held.discard(client)  # type: ignore[arg-type,unused-ignore]


class UpstreamConfirms:
    """An upstream channel's confirm mode: the messages sent on it and not yet confirmed,
    in the broker's sequence (which starts at 1 with the first publish after the
    Confirm.Select and counts every publish). The broker acks mostly in order, many at once
    (multiple): a deque from the oldest unconfirmed, whose slot a single out-of-order ack
    empties (None)."""

    __slots__ = ("buffer", "first_seq", "next_seq", "pending", "unconfirmed")

    def __init__(self, buffer: UnconfirmedBuffer) -> None:
        self.buffer = buffer
        #: The sequence number of pending[0], and of the next publish.
        self.first_seq = self.next_seq = 1
        self.pending: deque[Unconfirmed | None] = deque()
        self.unconfirmed = 0

    def __len__(self) -> int:
        return self.unconfirmed

    def add(self, message: Unconfirmed, client: ConfirmsClient | None) -> None:
        self.pending.append(message)  # (adopt's steps, once per publish: no call more)
        self.next_seq += 1
        self.unconfirmed += 1
        self.buffer.added(message.size, client)

    def adopt(self, message: Unconfirmed) -> None:
        """A message taken from another channel (`take`), still counted in the buffer."""
        self.pending.append(message)
        self.next_seq += 1
        self.unconfirmed += 1

    def settle(self, tag: int, multiple: bool) -> list[Unconfirmed]:
        """The broker's Basic.Ack or Nack: the messages it answers, in order."""
        pending = self.pending
        index = tag - self.first_seq
        if multiple:
            index = min(index, len(pending) - 1)  # (a broker never acks ahead; if it did)
        if index < 0 or index >= len(pending):
            return []
        if multiple:
            popleft = pending.popleft
            taken = [popleft() for _ in range(index + 1)]
            if self.unconfirmed == len(pending) + len(taken):  # no holes: no None in it
                settled = cast("list[Unconfirmed]", taken)
            else:  # (single acks left holes)
                settled = [m for m in taken if m is not None]
            self.first_seq += index + 1
        else:
            message = pending[index]
            if message is None:
                return []
            pending[index] = None
            settled = [message]
            while pending and pending[0] is None:
                pending.popleft()
                self.first_seq += 1
        self.unconfirmed -= len(settled)
        self.buffer.removed(settled)
        return settled

    def take(self) -> list[Unconfirmed]:
        """Everything unconfirmed, in order, to be sent again elsewhere (still counted)."""
        taken = [m for m in self.pending if m is not None]
        self.pending.clear()
        self.first_seq = self.next_seq
        self.unconfirmed = 0
        return taken

    def drop(self) -> int:
        """Forget everything unconfirmed (the broker processed it and closed the channel)."""
        dropped = self.take()
        self.buffer.removed(dropped)
        return len(dropped)
