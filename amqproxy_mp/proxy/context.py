"""What every client session of a worker shares, built once by the worker from its config.

This is the only place the proxy reads the configuration: each setting the data path uses is
read here, once, into the settings below.
"""

from __future__ import annotations

import asyncio
import platform
import ssl
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pamqp.common import FieldTable

from amqproxy_mp import __version__
from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.transport import DEFAULT_FRAME_MAX
from amqproxy_mp.config import Config
from amqproxy_mp.metrics import Disconnect, Stats
from amqproxy_mp.proxy.exchange_types import ExchangeTypes
from amqproxy_mp.proxy.login import UpstreamSettings
from amqproxy_mp.proxy.nodes import Nodes
from amqproxy_mp.proxy.pool import Pools, PoolSettings
from amqproxy_mp.proxy.queue_types import QueueTypes

SERVER_PROPERTIES: Final[FieldTable] = {
    "product": "amqproxy-mp",
    "version": __version__,
    "platform": f"Python {platform.python_version()}",
    "copyright": "amqproxy-mp contributors",
    "information": "AMQP 0-9-1 proxy with connection and channel pooling",
    "capabilities": {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "consumer_priorities": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "direct_reply_to": True,
    },
}


@dataclass(frozen=True)
class ClientSettings:
    """The settings of the client side."""

    #: Bytes unsent to a client above which it is disconnected (client_max_buffer).
    max_buffer: int
    #: Larger messages get 406, as RabbitMQ's max_message_size (max_message_size).
    max_message_size: int
    #: close_policy processed (or confirmed): a close is answered once the broker processed
    #: what came before.
    wait_for_broker: bool
    #: close_policy confirmed: and once the broker confirmed the client's publishes.
    wait_for_confirms: bool
    #: Prefetch of the consumers the proxy gives a window to (consumer_window).
    consumer_window: int
    #: Clients past Connection.OpenOk per worker (max_client_connections; 0: no limit).
    max_connections: int
    #: Seconds to complete the handshake (client_handshake_timeout).
    handshake_timeout: float


class Session(Protocol):
    """A client session, as the worker sees it."""

    channels: dict[int, Any]

    def check_heartbeat(self, now: float) -> None: ...

    def abort(self) -> None: ...

    def close_with(
        self,
        code: int,
        text: str,
        class_id: int = 0,
        method_id: int = 0,
        close_ok_timeout: float | None = ...,
        kind: Disconnect = ...,
    ) -> None: ...


@dataclass
class ProxyContext:
    """A worker's shared state, handed to each client session."""

    settings: ClientSettings
    stats: Stats
    pools: Pools
    exchange_types: ExchangeTypes
    queue_types: QueueTypes
    #: The handshake frames every client gets, encoded once.
    connection_start: bytes
    connection_tune: bytes
    sessions: set[Session] = field(default_factory=set)
    #: Sessions past Connection.OpenOk (what max_connections limits).
    active_sessions: int = 0


def build_context(
    config: Config,
    loop: asyncio.AbstractEventLoop,
    stats: Stats,
    upstream_tls: ssl.SSLContext | None,
) -> ProxyContext:
    nodes = Nodes(
        config.upstream,
        config.upstream_policy,
        config.upstream_node_connect_timeout,
        upstream_tls,
        stats,
    )
    pools = Pools(
        loop,
        stats,
        PoolSettings(
            upstream=UpstreamSettings(
                connect_timeout=config.upstream_connect_timeout,
                heartbeat=config.upstream_heartbeat,
            ),
            max_channels=config.max_upstream_channels,
            max_connections=config.max_upstream_connections,
            max_lifetime=config.upstream_max_lifetime,
            idle_timeout=config.idle_connection_timeout,
            rebalance=config.upstream_rebalance,
            unconfirmed_buffer=config.unconfirmed_buffer,
        ),
        nodes,
    )
    start = m.commands.Connection.Start(
        version_major=0,
        version_minor=9,
        server_properties=SERVER_PROPERTIES,
        mechanisms="PLAIN AMQPLAIN",
        locales="en_US",
    )
    tune = m.commands.Connection.Tune(
        channel_max=spec.CHANNEL_MAX, frame_max=DEFAULT_FRAME_MAX, heartbeat=config.client_heartbeat
    )
    return ProxyContext(
        settings=ClientSettings(
            max_buffer=config.client_max_buffer,
            max_message_size=config.max_message_size,
            wait_for_broker=config.close_policy != "local",
            wait_for_confirms=config.close_policy == "confirmed",
            consumer_window=config.consumer_window,
            max_connections=config.max_client_connections,
            handshake_timeout=config.client_handshake_timeout,
        ),
        stats=stats,
        pools=pools,
        exchange_types=ExchangeTypes(),
        queue_types=QueueTypes(),
        connection_start=m.encode_method(0, start),
        connection_tune=m.encode_method(0, tune),
    )
