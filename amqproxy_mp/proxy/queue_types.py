"""Queue types the proxy has seen declared, and the methods a type makes a connection error.

RabbitMQ answers some methods on stream and quorum queues with 540 NOT_IMPLEMENTED, which
closes the whole connection (Basic.Get or Queue.Purge of a stream, a no_ack consumer of a
stream, a conditional delete of a quorum queue). On a shared upstream connection that would
close every client on it. The type of a queue is not in any reply, so the proxy remembers
the x-queue-type of the declares that pass through it, per vhost, and refuses those methods
itself, with the broker's words, to the client that sent them, as the broker would have.

A queue declared only elsewhere (another proxy, a direct client) is unknown here, and so is
the channel's "last declared queue" that an empty name stands for: such methods still reach
the broker (see docs/security.md).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import FrameError, amqp_error_text
from amqproxy_mp.amqp.validate import table_entries

#: How many queues are remembered per worker (the oldest are forgotten first).
REMEMBERED: Final = 100_000
TYPED: Final = frozenset(("stream", "quorum"))


class QueueTypes:
    def __init__(self, remembered: int = REMEMBERED) -> None:
        self.remembered = remembered
        self._types: OrderedDict[tuple[str, str], str] = OrderedDict()

    def declared(self, vhost: str, queue: str, payload: memoryview, table: tuple[int, int]) -> None:
        """A non-passive Queue.Declare goes upstream: remember an explicit x-queue-type
        (`table` is where its arguments are in `payload`)."""
        declared = None
        for name, tag, start, end in table_entries(payload, *table):
            if name == b"x-queue-type" and tag == ord("S"):
                declared = bytes(payload[start + 4 : end]).decode("utf-8", "replace")
        if not queue or declared is None:
            return  # a declare without the argument leaves an existing queue's type as it is
        key = (vhost, queue)
        if declared in TYPED:
            self._types[key] = declared
            self._types.move_to_end(key)
            if len(self._types) > self.remembered:
                self._types.popitem(last=False)
        else:
            self._types.pop(key, None)

    def deleted(self, vhost: str, queue: str) -> None:
        self._types.pop((vhost, queue), None)

    def get(self, vhost: str, queue: str) -> str:
        return self._types.get((vhost, queue), "")

    def check(self, vhost: str, mid: int, arguments: list[Any]) -> None:
        """Raise the broker's connection error for this method on a queue of a known type.
        (No local holds the error: it would keep the frame, and the read buffer under it.)"""
        queue = str(arguments[1])
        kind = self._types.get((vhost, queue))
        if kind is None:
            return
        name = f"queue '{queue}' in vhost '{vhost}'"
        text = ""
        if kind == "stream":
            if mid == spec.BASIC_GET:
                text = f"basic.get not supported by stream queues {name}"
            elif mid == spec.QUEUE_PURGE:
                text = f"queue.purge not supported by stream queues {name}"
            elif mid == spec.BASIC_CONSUME and arguments[4]:
                text = f"automatic acknowledgement not supported by stream queues {name}"
        elif kind == "quorum" and mid == spec.QUEUE_DELETE and (arguments[2] or arguments[3]):
            flag = "if-unused" if arguments[2] else "if-empty"
            text = (
                f"cannot delete {name}. queue.delete operations with {flag} flag set are not "
                f"supported by quorum queues"
            )
        if text:
            raise FrameError(
                spec.NOT_IMPLEMENTED,
                amqp_error_text(f"NOT_IMPLEMENTED - {text}"),
                mid >> 16,
                mid & 0xFFFF,
            )
