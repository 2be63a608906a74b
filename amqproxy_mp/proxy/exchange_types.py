"""Exchange types the broker is known to accept.

RabbitMQ answers Exchange.Declare of an unknown type (plugins add types, so no
fixed list is right) with 503 COMMAND_INVALID on the whole connection. On a
shared upstream connection that would close every client on it. So a type not
yet seen to succeed is first declared, under a throwaway name, on a disposable
upstream connection with the client's credentials; only if that works does the
client's own declare go to the shared connection.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp.frames import METHOD, frame
from amqproxy_mp.amqp.methods import commands
from amqproxy_mp.proxy.pool import Pool, Pools
from amqproxy_mp.proxy.upstream import Login, UpstreamError, open_upstream

if TYPE_CHECKING:
    from amqproxy_mp.proxy.channels import ChannelLink
    from amqproxy_mp.proxy.client import ClientSession

log = logging.getLogger(__name__)

BUILTIN = frozenset(("direct", "fanout", "topic", "headers"))


class ExchangeTypes:
    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.known: set[str] = set(BUILTIN)

    def check(
        self, client: ClientSession, link: ChannelLink, exchange_type: str, payload: memoryview
    ) -> bool:
        """True when the declare may go upstream now; else the proxy tries the type first and
        forwards or refuses the declare itself."""
        if exchange_type in self.known:
            return True
        client.run_paused(self._try(client, link, exchange_type, bytes(payload)))
        return False

    async def _try(
        self, client: ClientSession, link: ChannelLink, exchange_type: str, payload: bytes
    ) -> None:
        assert client.pool is not None
        try:
            refusal = await self._probe(client.pool, exchange_type, payload)
        except UpstreamError as exc:
            client.close_with(exc.code, exc.text, 40, 10)
            return
        if refusal is not None:
            code, text = refusal
            log.warning(
                "client %s (user=%r vhost=%r) declared an exchange of type %r, which the broker "
                "refuses: %s %s",
                client.peer,
                client.user,
                client.vhost,
                exchange_type,
                code,
                text,
            )
            client.close_with(code, text, 40, 10, kind="protocol_error")
            return
        self.known.add(exchange_type)
        if link.client is client and link.client_open:
            client.send_declare(link, payload)

    async def _probe(
        self, pool: Pool, exchange_type: str, payload: bytes
    ) -> tuple[int, str] | None:
        """Declare a throwaway exchange of that type on a disposable connection; returns the
        connection-level refusal, or None when the type is accepted (a channel-level error,
        e.g. about arguments, is left for the client's own declare to meet)."""
        pools = self.pools
        login = Login(pool.user, pool.password)
        conn = await open_upstream(
            pools.loop, pools.settings, pools.stats, login, Pool(pools, pool.credentials)
        )
        name = f"amqproxy-mp-probe-{uuid.uuid4().hex}"
        try:
            # the client's own arguments, as bytes: the type may read them
            arguments = m.method_arguments(m.EXCHANGE_DECLARE, payload)[-1]
            trial = commands.Exchange.Declare(
                exchange=name, exchange_type=exchange_type, auto_delete=True
            )
            encoded = m.encode_method(1, trial)
            start, end = arguments
            trial_payload = encoded[7:-5] + payload[start - 4 : end]
            result = await conn.probe(frame(METHOD, 1, trial_payload))
            if result is None:
                conn.send(m.encode_method(1, commands.Exchange.Delete(exchange=name, nowait=True)))
                return None
            code, text, connection_level = result
            return (code, text) if connection_level else None
        finally:
            conn.close("exchange type probe done")
