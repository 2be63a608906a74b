"""Prefetch: Basic.Qos answered locally, the upstream channel's prefetch, consumer windows.

Basic.QosOk carries nothing from the broker, so the proxy answers Basic.Qos at once when no
reply to the client is due first on the channel, and the Qos follows upstream unless the
upstream channel has that prefetch already (a reused channel: php-amqp sets the same prefetch
on every channel). A consumer the client made with no_ack is consumed upstream with acks
(auto_ack.py) and, like one with no prefetch limit, with a window of consumer_window
deliveries: a client that reads slowly slows the broker down instead of filling the proxy's
memory, and a client that goes away loses nothing the broker would not have kept for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import FrameError
from amqproxy_mp.proxy.requests import Request

#: Basic.Consume's flags octet: no_local 0x01, no_ack 0x02, exclusive 0x04, nowait 0x08.
CONSUME_NO_ACK_BIT: Final = 0x02
CONSUME_NOWAIT_BIT: Final = 0x08
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"


class Link(Protocol):
    """What these steps use of a channel link (channels.py, which holds a Prefetch)."""

    prefetch: Prefetch
    upstream_number: int
    transactional: bool
    consumer_tags: set[str] | None

    @property
    def awaits_reply(self) -> bool: ...

    def send_request(
        self, data: bytes, mid: int, kind: Request = ..., subject: str = ...
    ) -> None: ...

    def not_reusable(self) -> None: ...

    def consumer_tag_taken(self, tag: str) -> None: ...


class Prefetch:
    """The upstream channel's prefetch (per consumer, and global) as last asked, and whether
    the channel's current client set each itself (else, on a reused channel, inherited)."""

    __slots__ = ("consumer", "consumer_set", "global_", "global_set")

    def __init__(self) -> None:
        self.consumer = self.global_ = 0
        self.consumer_set = self.global_set = False

    def reused(self) -> None:
        self.consumer_set = self.global_set = False


def set_prefetch(link: Link, count: int, global_: bool, kind: Request) -> None:
    """Send Basic.Qos upstream and remember what the upstream channel now has."""
    if global_:
        link.prefetch.global_ = count
    else:
        link.prefetch.consumer = count
    qos = m.encode_method(link.upstream_number, m.commands.Basic.Qos(0, count, global_))
    link.send_request(qos, spec.BASIC_QOS, kind)


def moved(old: Link, new: Link) -> None:
    """The client's channel moves to a new upstream channel: the prefetch it set follows."""
    before = old.prefetch
    if before.consumer_set and before.consumer:
        set_prefetch(new, before.consumer, False, Request.DROP)
    if before.global_set and before.global_:
        set_prefetch(new, before.global_, True, Request.DROP)
    new.prefetch.consumer_set = before.consumer_set
    new.prefetch.global_set = before.global_set


def answer_qos(link: Link, size: int, count: int, global_: bool) -> bool:
    """The client's Basic.Qos: True when the proxy answers it now (the client gets QosOk),
    False when the broker's answer goes to the client (one of its replies is due first)."""
    if size:
        # RabbitMQ closes the whole connection for this (540): keep it to this client.
        raise FrameError(
            spec.NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - prefetch_size!=0 ({size})", 60, 10
        )
    prefetch = link.prefetch
    if global_:
        prefetch.global_set, current = True, prefetch.global_
    else:
        prefetch.consumer_set, current = True, prefetch.consumer
    if link.awaits_reply:
        # a reply to the client is due first: the broker's QosOk must not overtake it
        set_prefetch(link, count, global_, Request.FORWARD)
        return False
    if count != current:
        set_prefetch(link, count, global_, Request.DROP)
    return True


def _reset_inherited(link: Link) -> None:
    """Before a consumer starts on a reused channel: no prefetch the client did not ask for
    (an earlier client's, per consumer or global) may apply to it."""
    prefetch = link.prefetch
    if prefetch.consumer and not prefetch.consumer_set:
        set_prefetch(link, 0, False, Request.DROP)
    if prefetch.global_ and not prefetch.global_set:
        set_prefetch(link, 0, True, Request.DROP)


def consume(
    link: Link,
    payload: memoryview,
    arguments: list[Any],
    window: int,
    stream: bool,
    send: Callable[[Request], None],
) -> None:
    """Start a consumer (`send` sends the Basic.Consume, as the request kind given): one the
    client made with no_ack is consumed with acks, and it or one with no prefetch limit gets
    a window of `window` deliveries (a stream consumer sets its own: RabbitMQ refuses it one
    without)."""
    queue, tag, nowait = str(arguments[1]), str(arguments[2]), arguments[6]
    # (RabbitMQ pushes direct reply-to replies itself and refuses an acking consumer;
    # on a transactional channel the proxy's acks would wait for the client's commit)
    no_ack = arguments[4] and queue != DIRECT_REPLY_TO and not link.transactional
    link.not_reusable()
    _reset_inherited(link)
    tags = link.consumer_tags
    if tag and tags is not None and tag in tags:
        # RabbitMQ closes the whole connection for this: keep it to this client
        raise FrameError(
            spec.NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'", 60, 20
        )
    kind = Request.FORWARD
    if tag:
        link.consumer_tag_taken(tag)
    if no_ack:
        kind = Request.NAMED_AUTO_ACK if tag else Request.CONSUME_AUTO_ACK
    elif not (tag or nowait):
        kind = Request.CONSUME
    flags = 4 + 2 + 1 + len(queue.encode("utf-8", "surrogateescape")) + 1
    flags += len(tag.encode("utf-8", "surrogateescape"))
    if no_ack:
        payload[flags] &= ~CONSUME_NO_ACK_BIT
        if nowait:  # the proxy acks from the ConsumeOk on: it asks for one
            payload[flags] &= ~CONSUME_NOWAIT_BIT
            arguments[6] = False
            kind = Request.NAMED_AUTO_ACK_UNASKED if tag else Request.CONSUME_AUTO_ACK_UNASKED
    previous = link.prefetch.consumer
    windowed = no_ack or not (previous or queue == DIRECT_REPLY_TO or stream)
    if windowed:
        set_prefetch(link, window, False, Request.DROP)
    send(kind)
    if windowed:
        set_prefetch(link, previous, False, Request.DROP)
