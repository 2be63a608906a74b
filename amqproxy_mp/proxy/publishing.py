"""A message on its way in from a client, buffered until it is complete.

Basic.Publish, its content header and all its body frames go upstream in one piece, so a
client that dies mid-message never leaves half a message on a shared channel. Frames out of
order, and sizes, are answered as RabbitMQ answers them.
"""

from __future__ import annotations

import enum
from typing import Final

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import (
    BODY,
    CONTENT_HEADER,
    HEADER,
    METHOD,
    OVERHEAD,
    FrameError,
    body_frames,
    frame,
)
from amqproxy_mp.amqp.validate import check_content_header

#: `expected` when no message is under way, and when its header is due.
NO_CONTENT: Final = -1
HEADER_EXPECTED: Final = -2
#: More body than the header announced: RabbitMQ waits for the rest forever.
WEDGED: Final = 1 << 66


class Step(enum.Enum):
    """What a content frame leaves the message at."""

    MORE = "more"
    #: Complete: send it.
    COMPLETE = "complete"
    #: Complete, with properties RabbitMQ could not read (see ClientSession._unreadable).
    UNREADABLE = "unreadable"
    #: Its header announced more than max_message_size: the message is dropped.
    TOO_LARGE = "too large"


def order_error(expected: int) -> FrameError:
    """RabbitMQ's UNEXPECTED_FRAME for a frame out of order with a message's content."""
    if expected == NO_CONTENT:
        text, class_id, method_id = "expected method frame, got non method frame instead", 0, 0
    elif expected == HEADER_EXPECTED:
        text = "expected content header for class 60, got non content header frame instead"
        class_id, method_id = 60, 40
    else:
        text = "expected content body, got non content body frame instead"
        class_id, method_id = 60, 40
    return FrameError(spec.UNEXPECTED_FRAME, f"UNEXPECTED_FRAME - {text}", class_id, method_id)


class IncomingMessage:
    """The publish a client channel is sending: its frames, renumbered for upstream."""

    __slots__ = ("expected", "last_publish", "parts", "size", "unreadable")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        #: NO_CONTENT, HEADER_EXPECTED, WEDGED or the number of body bytes still missing.
        self.expected = NO_CONTENT
        #: The size its header announced.
        self.size = 0
        #: Its properties are ones RabbitMQ could not read.
        self.unreadable = False
        #: The last Basic.Publish payload that passed validation (a publisher repeats
        #: itself: each is checked once).
        self.last_publish = b""

    def check_method(self) -> None:
        """A method frame arrives: no content may be due."""
        if self.expected != NO_CONTENT:
            raise order_error(self.expected)

    def start(self, payload: memoryview, number: int) -> None:
        """Basic.Publish: checked as the broker checks it, then held until complete."""
        if payload != self.last_publish:
            m.method_arguments(spec.BASIC_PUBLISH, payload)
            if payload[-1] & spec.PUBLISH_IMMEDIATE:
                raise FrameError(spec.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true", 60, 40)
            self.last_publish = bytes(payload)
        self.parts.append(frame(METHOD, number, payload))
        self.expected = HEADER_EXPECTED

    def header(self, payload: memoryview, number: int, max_size: int) -> Step:
        if self.expected != HEADER_EXPECTED:
            raise order_error(self.expected)
        try:
            size = check_content_header(payload)
        except FrameError as exc:
            if exc.code != spec.INTERNAL_ERROR:
                raise
            # RabbitMQ reads a message's properties only when it publishes it (and its
            # exchange exists): that is when this one is answered
            size = CONTENT_HEADER.unpack_from(payload)[2]
            self.parts.clear()
            self.unreadable = True
        self.size = size
        if self.unreadable:
            self.expected = size
            return self._done(Step.UNREADABLE) if size == 0 else Step.MORE
        if size > max_size:
            self.drop()
            return Step.TOO_LARGE
        self.parts.append(frame(HEADER, number, payload))
        self.expected = size
        return self._done(Step.COMPLETE) if size == 0 else Step.MORE

    def body(self, payload: memoryview, number: int, frame_max: int) -> Step:
        """A body frame; `frame_max` is the upstream hop's (a smaller one re-splits it)."""
        expected = self.expected
        if expected < 0:
            raise order_error(expected)
        if len(payload) > expected:
            # RabbitMQ counts below zero and waits for the rest forever: the message is
            # never published, and the next method on the channel is an UNEXPECTED_FRAME
            self.parts.clear()
            self.expected = WEDGED
            return Step.MORE
        if expected == WEDGED:
            return Step.MORE
        self.expected = expected - len(payload)
        if self.unreadable:
            return self._done(Step.UNREADABLE) if self.expected == 0 else Step.MORE
        if len(payload) + OVERHEAD <= frame_max:
            self.parts.append(frame(BODY, number, payload))
        else:
            self.parts.extend(body_frames(number, payload, frame_max))
        return self._done(Step.COMPLETE) if self.expected == 0 else Step.MORE

    def _done(self, step: Step) -> Step:
        self.expected = NO_CONTENT
        self.unreadable = False
        return step

    def take(self) -> bytes:
        """The complete message, as one write."""
        data = b"".join(self.parts)
        self.parts.clear()
        return data

    def drop(self) -> None:
        self.parts.clear()
        self.expected = NO_CONTENT
        self.unreadable = False
