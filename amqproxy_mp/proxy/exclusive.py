"""Exclusive queues on shared upstream connections: ownership, locking and cleanup.

RabbitMQ ties an exclusive queue to the connection that declared it, and deletes it when
that connection closes. Here that connection is shared and outlives the client, so the proxy
keeps, per upstream connection, which client owns each exclusive queue declared through it:
it refuses the queue to the other clients of that connection (405, as RabbitMQ would across
connections), and deletes a client's queues when the client goes. A queue is the client's
from its DeclareOk until its DeleteOk, which for a departing client's queues is the proxy's:
until then the names stay locked, so that nobody declares a queue the delete then removes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.proxy.channels import ChannelLink, Up
from amqproxy_mp.proxy.requests import EXCLUSIVE_DECLARES, Request
from amqproxy_mp.proxy.sides import ClientSide, UpstreamSide

log = logging.getLogger(__name__)

#: Queue.Declare's and Basic.Consume's nowait bit, in the flags octet after the queue name.
DECLARE_NOWAIT_BIT = 0x10
#: Queue.Delete's flags octet (its last): if_unused 0x01, if_empty 0x02, nowait 0x04.
DELETE_NOWAIT_BIT = 0x04
#: The methods that name a queue (their second argument), to check for exclusivity.
QUEUE_METHODS = frozenset(
    method.index
    for method in (
        m.commands.Queue.Declare, m.commands.Queue.Bind, m.commands.Queue.Unbind,
        m.commands.Queue.Purge, m.commands.Queue.Delete, m.commands.Basic.Consume,
        m.commands.Basic.Get,
    )
)  # fmt: skip


def locked_text(queue: str, vhost: str) -> str:
    return (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in "
        f"vhost '{vhost}'. It could be originally declared on another connection or the "
        f"exclusive property value does not match that of the original declaration."
    )


class ExclusiveQueues:
    """The exclusive queues declared through one upstream connection, and their owners."""

    def __init__(
        self, upstream: UpstreamSide, spare_link: Callable[[], ChannelLink[Any] | None]
    ) -> None:
        self._upstream = upstream
        #: A new channel on the connection (None once it is closing), for deletes when the
        #: owner has none left open there.
        self._spare_link = spare_link
        self._owners: dict[str, ClientSide] = {}
        self._by_client: dict[ClientSide, set[str]] = {}

    def owner(self, queue: str) -> ClientSide | None:
        return self._owners.get(queue)

    def owners(self) -> list[ClientSide]:
        """The clients with queues here: they lose them if the connection goes."""
        return list(self._by_client)  # (only clients that own one: see _disown)

    def locks_out(self, client: ClientSide, mid: int, arguments: list[Any]) -> str | None:
        """The queue a method of `client` names, when another client owns it here."""
        queue = str(arguments[1])
        if not queue or (
            mid == spec.QUEUE_DECLARE and not arguments[2] and queue.startswith("amq.")
        ):  # the broker's own answer (403 for a reserved name) comes first
            return None
        owner = self._owners.get(queue)
        return queue if owner is not None and owner is not client else None

    def declared(self, queue: str, client: ClientSide) -> None:
        """The broker confirmed the queue to this connection for `client` (two clients may
        have declared it at once: the last DeclareOk decides, as the broker saw one owner)."""
        previous = self._owners.get(queue)
        if previous is not None and previous is not client:
            self._disown(queue, previous)
        self._owners[queue] = client
        self._by_client.setdefault(client, set()).add(queue)

    def deleted(self, queue: str, client: ClientSide) -> None:
        """The owner's delete was answered: the name is free again, for others too."""
        if self._owners.get(queue) is client:
            del self._owners[queue]
            self._disown(queue, client)

    def _disown(self, queue: str, client: ClientSide) -> None:
        queues = self._by_client.get(client)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._by_client[client]

    def orphaned(self, queue: str) -> None:
        """Declared for a client that left before the DeclareOk: nobody else will delete it.
        (A name it asked for has been locked since it left: see client_gone.) Unless another
        client of this connection declared it meanwhile: on this connection that is the same
        queue, and it is theirs now (or will be, at their DeclareOk)."""
        owner = self._owners.get(queue)
        if owner is not None and owner in self._by_client:
            return
        declaring = (
            link for link in self._upstream.channels.values()
            if link.client is not None and queue in link.requests.subjects(EXCLUSIVE_DECLARES)
        )  # fmt: skip
        if next(declaring, None) is None:
            self._delete({queue}, None, owner)

    def orphan_failed(self, queue: str) -> None:
        """The declare of a client that left was refused: there is no queue to delete, and
        the name it locked is free."""
        owner = self._owners.get(queue)
        if owner is not None and owner not in self._by_client:  # (a departed client's)
            del self._owners[queue]

    def client_gone(
        self, client: ClientSide, links: Iterable[ChannelLink[Any]]
    ) -> list[asyncio.Future[bool]]:
        """Delete a departing client's queues: on one of its channels still open here, or on
        a channel opened for just that. The deletes are requests, so that channel is parked
        (or closed) only once they are done. What it returns is done when they are
        answered: RabbitMQ ends a connection only after deleting its exclusive queues."""
        here = [x for x in links if x.client is client and x.upstream is self._upstream]
        for link in here:
            # a named exclusive declare still unanswered: its DeclareOk will make the queue
            # nobody's, and its delete follows; until then nobody else may declare the name
            # (or the delete would take their queue)
            for queue in link.requests.subjects(EXCLUSIVE_DECLARES):
                if queue and queue not in self._owners:
                    self._owners[queue] = client
        queues = self._by_client.pop(client, None)
        if not queues:
            return []
        mine = (x for x in here if x.up is Up.OPEN and x.client_open)
        return self._delete(queues, next(mine, None), client)

    def _delete(
        self, queues: set[str], link: ChannelLink[Any] | None, owner: ClientSide | None
    ) -> list[asyncio.Future[bool]]:
        """The owner keeps each name (locked to others) until its delete is answered."""
        temporary = link is None
        if link is None:
            link = self._spare_link()
            if link is None:  # the connection is closing: the broker deletes them itself
                for queue in queues:
                    self._freed(queue, owner)
                return []
        done = []
        for queue in sorted(queues):
            delete = m.encode_method(link.upstream_number, m.commands.Queue.Delete(queue=queue))
            answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            answered.add_done_callback(
                functools.partial(self._delete_answered, queue, owner, temporary)
            )
            link.send_request(delete, spec.QUEUE_DELETE, Request.DROP, waiter=answered)
            done.append(answered)
        if temporary:
            link.client_left()
        return done

    def _delete_answered(
        self, queue: str, owner: ClientSide | None, spare: bool, answered: asyncio.Future[bool]
    ) -> None:
        """The name is free once the broker deleted the queue. If the channel closed first
        (the departed client's own, closed by an error of its own), the delete goes again on
        a spare channel; if that fails too, the name stays locked while the queue may be
        there, as long as the connection lasts."""
        if answered.result():
            self._freed(queue, owner)
        elif not spare:
            self._delete({queue}, None, owner)

    def _freed(self, queue: str, owner: ClientSide | None) -> None:
        if owner is not None and self._owners.get(queue) is owner:
            del self._owners[queue]


def declare_request(
    registry: ExclusiveQueues, client: ClientSide, payload: memoryview, arguments: list[Any]
) -> Request:
    """How to send a Queue.Declare: the proxy learns the name of an exclusive queue from
    the DeclareOk, asking for one (and keeping it from the client) when the client asked
    for none (nowait) and the broker chooses the name."""
    queue, passive, exclusive, nowait = arguments[1], arguments[2], arguments[4], arguments[6]
    if not exclusive or passive:
        return Request.FORWARD
    if not nowait:
        return Request.EXCLUSIVE
    if queue:
        registry.declared(queue, client)
        return Request.FORWARD
    payload[4 + 2 + 1] &= ~DECLARE_NOWAIT_BIT  # (after the empty name's length octet)
    arguments[6] = False
    return Request.EXCLUSIVE_UNASKED


def delete_request(
    registry: ExclusiveQueues, client: ClientSide, payload: memoryview, arguments: list[Any]
) -> Request | None:
    """How to send a Queue.Delete of the client's own exclusive queue (None: not one): its
    answer frees the name; the proxy asks for it (and drops it) when the client did not."""
    if registry.owner(str(arguments[1])) is not client:
        return None
    if arguments[4]:  # nowait
        payload[-1] &= ~DELETE_NOWAIT_BIT
        arguments[4] = False
        return Request.DELETE_EXCLUSIVE_UNASKED
    return Request.DELETE_EXCLUSIVE
