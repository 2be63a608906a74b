"""Channel operations through the proxy with aio-pika (asyncio, aiormq underneath)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import pytest
from pamqp import commands

from tests.support.broker import Names, queue_counts
from tests.support.targets import Target
from tests.support.util import wait_for

BODY = b"\x00aio\xce\xff" * 1000


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(main())


async def connect(target: Target, **kw: Any) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(target.url(), timeout=10, **kw)


def test_aio_declare_publish_get_properties(proxy: Target, names: Names) -> None:
    x, q = names.exchange("aio"), names.queue("aio")

    async def main() -> None:
        conn = await connect(proxy)
        async with conn:
            ch = await conn.channel()
            ex = await ch.declare_exchange(x, aio_pika.ExchangeType.FANOUT)
            queue = await ch.declare_queue(q, arguments={"x-max-priority": 10})
            await queue.bind(ex)
            headers = {
                "s": "str",
                "i": 7,
                "neg": -3,
                "f": 1.5,
                "b": True,
                "l": [1, "a", {"x": 2}],
                "t": {"nested": {"deeper": "yes"}},
                "bytes": bytearray(b"\x00\xff"),
            }
            msg = aio_pika.Message(
                BODY,
                headers=headers,
                content_type="application/x-aio",
                content_encoding="utf-8",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=3,
                correlation_id="aio-corr",
                reply_to="aio-reply",
                expiration=30,
                message_id="aio-mid",
                timestamp=datetime.datetime(2023, 3, 4, 5, 6, 7, tzinfo=datetime.UTC),
                type="aio.type",
                user_id="guest",
                app_id="aio-app",
            )
            await ex.publish(msg, routing_key="ignored")
            got = None
            for _ in range(250):
                got = await queue.get(no_ack=True, fail=False)
                if got is not None:
                    break
                await asyncio.sleep(0.02)
            assert got is not None
            assert got.body == BODY
            assert got.headers == headers
            assert (got.content_type, got.content_encoding, got.delivery_mode, got.priority) == (
                "application/x-aio",
                "utf-8",
                aio_pika.DeliveryMode.PERSISTENT,
                3,
            )
            assert (got.correlation_id, got.reply_to, got.message_id, got.type) == (
                "aio-corr",
                "aio-reply",
                "aio-mid",
                "aio.type",
            )
            assert (got.user_id, got.app_id) == ("guest", "aio-app")
            assert got.expiration == 30
            assert got.timestamp == datetime.datetime(2023, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
            assert (got.exchange, got.routing_key, got.redelivered) == (x, "ignored", False)
            await queue.unbind(ex)
            assert await queue.purge() is not None
            await queue.delete()
            await ex.delete()

    run(main)


def test_aio_publisher_confirms_1000(proxy: Target, names: Names) -> None:
    q = names.queue("aioconf")

    async def main() -> list[Any]:
        conn = await connect(proxy)
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            await ch.declare_queue(q)
            results = await asyncio.gather(
                *(
                    ch.default_exchange.publish(aio_pika.Message(f"a{i}".encode()), q)
                    for i in range(1000)
                )
            )
            return results

    results = run(main)
    assert len(results) == 1000
    assert all(isinstance(r, commands.Basic.Ack) for r in results)
    assert queue_counts(q) == (1000, 0)


def test_aio_publisher_nacks(proxy: Target, names: Names) -> None:
    q = names.queue("aionack")

    async def main() -> tuple[int, int]:
        conn = await connect(proxy)
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            await ch.declare_queue(q, arguments={"x-max-length": 4, "x-overflow": "reject-publish"})
            acked = nacked = 0
            for i in range(10):
                try:
                    r = await ch.default_exchange.publish(aio_pika.Message(f"{i}".encode()), q)
                    assert isinstance(r, commands.Basic.Ack)
                    acked += 1
                except aiormq.exceptions.DeliveryError:
                    nacked += 1
            return acked, nacked

    assert run(main) == (4, 6)
    assert queue_counts(q) == (4, 0)


def test_aio_transactions(proxy: Target, names: Names) -> None:
    q = names.queue("aiotx")

    async def main() -> None:
        conn = await connect(proxy)
        async with conn:
            ch = await conn.channel(publisher_confirms=False)
            await ch.declare_queue(q)
            tx = ch.transaction()
            await tx.select()
            for i in range(4):
                await ch.default_exchange.publish(aio_pika.Message(f"tx{i}".encode()), q)
            await tx.commit()
            await ch.default_exchange.publish(aio_pika.Message(b"gone"), q)
            await tx.rollback()

    run(main)
    assert queue_counts(q) == (4, 0)


def test_aio_consume_qos_ack_reject(proxy: Target, names: Names) -> None:
    q = names.queue("aiocons")

    async def main() -> None:
        conn = await connect(proxy)
        async with conn:
            ch = await conn.channel()
            await ch.set_qos(prefetch_count=3)
            queue = await ch.declare_queue(q)
            for i in range(8):
                await ch.default_exchange.publish(aio_pika.Message(f"c{i}".encode()), q)
            received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(received.put)
            first = [await asyncio.wait_for(received.get(), 5) for _ in range(3)]
            assert [m.body for m in first] == [b"c0", b"c1", b"c2"]
            await asyncio.sleep(0.4)  # a 4th must not come while 3 are unacked
            assert received.qsize() == 0
            await first[0].ack()
            m = await asyncio.wait_for(received.get(), 5)
            assert (m.body, m.redelivered) == (b"c3", False)
            await first[1].nack(requeue=True)
            m = await asyncio.wait_for(received.get(), 5)
            assert (m.body, m.redelivered) == (b"c1", True)
            await first[2].reject(requeue=False)
            m = await asyncio.wait_for(received.get(), 5)
            assert (m.body, m.redelivered) == (b"c4", False)
            await queue.cancel(tag)

    run(main)
    # c0 acked, c2 rejected: the other six are back in the queue (the proxy may finish
    # closing the upstream channel just after the client's close)
    wait_for(lambda: queue_counts(q) == (6, 0), what="six messages back in the queue")


def test_aio_rpc_direct_reply_to(proxy: Target, names: Names) -> None:
    rpc_q = names.queue("aiorpc")

    async def main() -> list[bytes]:
        server = await connect(proxy)
        client = await connect(proxy)
        async with server, client:
            sch = await server.channel()
            squeue = await sch.declare_queue(rpc_q)

            async def serve(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with msg.process():
                    await sch.default_exchange.publish(
                        aio_pika.Message(b"pong:" + msg.body, correlation_id=msg.correlation_id),
                        routing_key=msg.reply_to or "",
                    )

            await squeue.consume(serve)
            cch = await client.channel()
            reply_q = await cch.get_queue("amq.rabbitmq.reply-to", ensure=False)
            replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await reply_q.consume(replies.put, no_ack=True)
            out = []
            for i in range(3):
                await cch.default_exchange.publish(
                    aio_pika.Message(
                        f"ping{i}".encode(), correlation_id=str(i), reply_to="amq.rabbitmq.reply-to"
                    ),
                    routing_key=rpc_q,
                )
                r = await asyncio.wait_for(replies.get(), 5)
                assert r.correlation_id == str(i)
                out.append(r.body)
            return out

    assert run(main) == [b"pong:ping0", b"pong:ping1", b"pong:ping2"]


def test_aio_channel_error_then_new_channel(proxy: Target, names: Names) -> None:
    missing = names.queue("aiomissing")

    async def main() -> None:
        conn = await connect(proxy)
        async with conn:
            ch = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as info:
                await ch.declare_queue(missing, passive=True)
            assert info.value.args[0] == f"NOT_FOUND - no queue '{missing}' in vhost '/'"
            ch2 = await conn.channel()
            q = await ch2.declare_queue(exclusive=True)
            await ch2.default_exchange.publish(aio_pika.Message(b"ok"), q.name)
            got = None
            for _ in range(100):
                got = await q.get(no_ack=True, fail=False)
                if got:
                    break
                await asyncio.sleep(0.02)
            assert got is not None and got.body == b"ok"

    run(main)
