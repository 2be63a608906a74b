"""What a channel link needs of the two connections it joins, as small interfaces.

The link (channels.py) sits below both connection classes and talks to them only through
these, so neither half imports the other, nor the link either of them. (Links are passed
back as `Any`: this module sits below channels.py, which implements them.)
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any, Protocol

from amqproxy_mp.metrics import Disconnect, Stats
from amqproxy_mp.proxy.confirms import Unconfirmed, UnconfirmedBuffer


class ClientSide(Protocol):
    """A client session, as its channels and its upstream connection see it."""

    peer: str

    @property
    def capabilities(self) -> Set[str]: ...

    def send(self, data: bytes) -> None: ...

    def deliver(self, frame_type: int, channel: int, payload: memoryview) -> None: ...

    def close_synced(self, link: Any) -> None: ...

    def channel_error_due(self, link: Any) -> None: ...

    def acks_due(self, link: Any) -> None: ...

    def unreadable_answered(self, link: Any, exchange_found: bool) -> None: ...

    def upstream_blocked(self, upstream: Any) -> None: ...

    def movable(self, upstream: Any) -> bool: ...

    def move_from(
        self, upstream: Any, moving: list[tuple[Any, list[Any]]], close: tuple[int, str, int, int]
    ) -> None: ...

    def upstream_unblocked(self, upstream: Any) -> None: ...

    def hold_reading(self, holder: object) -> None: ...

    def release_reading(self, holder: object) -> None: ...

    def close_with(
        self,
        code: int,
        text: str,
        class_id: int = 0,
        method_id: int = 0,
        close_ok_timeout: float | None = ...,
        kind: Disconnect = ...,
    ) -> None: ...


class ParkingLot(Protocol):
    """The owner of the park list (the pool): told when a link enters or leaves it."""

    def parked(self, link: Any) -> None: ...

    def unparked(self, link: Any) -> None: ...


class ExclusiveRecord(Protocol):
    """Who owns the exclusive queues declared through an upstream connection (exclusive.py)."""

    def declared(self, queue: str, client: ClientSide) -> None: ...

    def deleted(self, queue: str, client: ClientSide) -> None: ...

    def orphaned(self, queue: str) -> None: ...

    def orphan_failed(self, queue: str) -> None: ...


class UpstreamSide(Protocol):
    """An upstream connection, as the channel links on it see it."""

    @property
    def stats(self) -> Stats: ...

    @property
    def pool(self) -> ParkingLot | None: ...

    @property
    def exclusive(self) -> ExclusiveRecord: ...

    @property
    def can_park(self) -> bool: ...

    @property
    def channels(self) -> Mapping[int, Any]: ...

    @property
    def unconfirmed(self) -> UnconfirmedBuffer: ...

    @property
    def frame_max(self) -> int: ...

    def send(self, data: bytes) -> None: ...

    def release_number(self, link: Any) -> None: ...


class PoolSide(ParkingLot, Protocol):
    """A pool, as its upstream connections see it."""

    @property
    def user(self) -> str: ...

    @property
    def vhost(self) -> str: ...

    @property
    def unconfirmed(self) -> UnconfirmedBuffer: ...

    def resend(self, channels: list[list[Unconfirmed]], lost: str) -> None: ...

    def connection_gone(self, conn: Any) -> None: ...
