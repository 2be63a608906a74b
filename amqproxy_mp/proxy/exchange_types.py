"""Exchange types the broker is known to accept.

RabbitMQ answers Exchange.Declare of an unknown type (plugins add types, so no
fixed list is right) with 503 COMMAND_INVALID on the whole connection. On a
shared upstream connection that would close every client on it. So a type not
yet seen to succeed is first declared, under a throwaway name, on a disposable
upstream connection with the client's credentials; only if that works does the
client's own declare go to the shared connection.
"""

from __future__ import annotations

import uuid

from amqproxy_mp.amqp import methods as m
from amqproxy_mp.amqp import spec
from amqproxy_mp.amqp.frames import METHOD, frame
from amqproxy_mp.amqp.methods import commands
from amqproxy_mp.proxy.pool import Pool

BUILTIN = frozenset(("direct", "fanout", "topic", "headers"))


class ExchangeTypes:
    """The exchange types the broker has been seen to accept (the built-in ones at first)."""

    def __init__(self) -> None:
        self.known: set[str] = set(BUILTIN)

    async def trial(self, pool: Pool, exchange_type: str, payload: bytes) -> tuple[int, str] | None:
        """Declare a throwaway exchange of that type (with the client's arguments: the type
        may read them) on a disposable connection; returns the connection-level refusal, or
        None when the type is accepted (a channel-level error, e.g. about arguments, is left
        for the client's own declare to meet)."""
        name = f"amqproxy-mp-probe-{uuid.uuid4().hex}"
        start, end = m.method_arguments(spec.EXCHANGE_DECLARE, payload)[-1]
        trial = commands.Exchange.Declare(
            exchange=name, exchange_type=exchange_type, auto_delete=True
        )
        trial_payload = m.encode_method(1, trial)[7:-5] + payload[start - 4 : end]
        delete = m.encode_method(1, commands.Exchange.Delete(exchange=name, nowait=True))
        result = await pool.trial(
            frame(METHOD, 1, trial_payload), then=delete, purpose="exchange type probe"
        )
        if result is None:
            self.known.add(exchange_type)
            return None
        code, text, connection_level = result
        return (code, text) if connection_level else None
