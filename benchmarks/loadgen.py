"""Load generator: the client side of every benchmark scenario except the PHP ones.

Everything runs in one uvloop event loop on pre-encoded frames (see `amqpclient`). Each
function returns a dict with at least `count` (messages or cycles) and `elapsed` (seconds).
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

from amqpclient import (
    BASIC_ACK,
    BASIC_CONSUME_OK,
    BASIC_DELIVER,
    BASIC_NACK,
    BASIC_QOS_OK,
    CHANNEL_CLOSE_OK,
    CHANNEL_OPEN_OK,
    CONFIRM_SELECT_OK,
    CONNECTION_CLOSE_FRAME,
    CONNECTION_CLOSE_OK,
    CONNECTION_OPEN_OK,
    CONNECTION_START,
    CONNECTION_TUNE,
    EXCHANGE_DECLARE_OK,
    METHOD,
    METHOD_ID,
    PROTOCOL_HEADER,
    QUEUE_DECLARE_OK,
    QUEUE_DELETE_OK,
    SYNC_FRAMES,
    U64,
    AMQPError,
    Client,
    Handshake,
    ack_frame,
    connect,
    encode,
    frame,
    publish_frames,
)
from pamqp import commands

CHANNEL_OPEN = frame(METHOD, 1, b"\x00\x14\x00\x0a\x00")
# php-amqp's AMQPChannel constructor: Basic.Qos(prefetch_count=3); its disconnect: Channel.Close.
PHP_QOS = encode(1, commands.Basic.Qos(prefetch_count=3))
CHANNEL_CLOSE = encode(1, commands.Channel.Close(200, "", 0, 0))
CONFIRM_SELECT_NOWAIT = encode(1, commands.Confirm.Select(nowait=True))


# --- setup helpers (always run directly against the broker) ------------------------------


async def declare_queue(
    host: str, port: int, login: Handshake, queue: str, arguments: dict[str, Any] | None = None
) -> None:
    client = await connect(host, port, login)
    try:
        await client.open_channel(1)
        await client.call(
            encode(1, commands.Queue.Declare(queue=queue, arguments=arguments or {})),
            1,
            QUEUE_DECLARE_OK,
        )
    finally:
        await client.close()


async def delete_queue(host: str, port: int, login: Handshake, queue: str) -> None:
    client = await connect(host, port, login)
    try:
        await client.open_channel(1)
        await client.call(encode(1, commands.Queue.Delete(queue=queue)), 1, QUEUE_DELETE_OK)
    finally:
        await client.close()


async def queue_depth(host: str, port: int, login: Handshake, queue: str) -> int:
    client = await connect(host, port, login)
    try:
        await client.open_channel(1)
        payload = await client.call(
            encode(1, commands.Queue.Declare(queue=queue, passive=True)), 1, QUEUE_DECLARE_OK
        )
        name_len = payload[4]
        return int(struct.unpack_from(">I", payload, 5 + name_len)[0])
    finally:
        await client.close()


async def fill_queue(
    host: str, port: int, login: Handshake, queue: str, count: int, body_size: int
) -> None:
    """Publish `count` messages to `queue` (through the default exchange) and wait until the
    broker has them all."""
    client = await connect(host, port, login)
    try:
        await client.open_channel(1)
        one = publish_frames(1, "", queue, b"x" * body_size, client.frame_max)
        batch = 200
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            client.write(one * n)
            sent += n
            await client.drain()
        await client.sync(1)
        for _ in range(200):
            if await queue_depth(host, port, login, queue) >= count:
                return
            await asyncio.sleep(0.05)
        raise AMQPError(f"queue {queue} did not reach {count} messages")
    finally:
        await client.close()


# --- publish throughput --------------------------------------------------------------------


class Publisher(Client):
    """Counts the broker's answers to the markers (passive declares) sent between chunks."""

    answered = 0
    _wake: asyncio.Future[None] | None = None

    def method_received(self, channel: int, mid: int, buf: Any, start: int, end: int) -> None:
        if mid == EXCHANGE_DECLARE_OK:
            self.answered += 1
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
        else:
            super().method_received(channel, mid, buf, start, end)
            if self.error is not None and self._wake is not None and not self._wake.done():
                self._wake.set_exception(self.error)

    async def wait_answered(self, count: int) -> None:
        while self.answered < count:
            if self.error is not None:
                raise self.error
            self._wake = self.loop.create_future()
            await self._wake


#: Publishes in flight (sent, marker not yet answered), over all connections: far more than a
#: round trip's worth, so the pipe never runs dry, yet little enough that a run ends soon after
#: its duration (no deep socket backlog to drain). Split into MARKERS_IN_FLIGHT chunks.
IN_FLIGHT_BYTES = 16 << 20
IN_FLIGHT_MESSAGES = 16000
MARKERS_IN_FLIGHT = 2


async def _publisher(
    host: str,
    port: int,
    login: Handshake,
    queue: str,
    body: bytes,
    duration: float,
    start: asyncio.Event,
    connections: int,
    confirm_mode: bool,
) -> tuple[int, float, float]:
    client = await connect(host, port, login, factory=Publisher)
    assert isinstance(client, Publisher)
    client.transport.set_write_buffer_limits(high=4 << 20)  # type: ignore[union-attr]
    try:
        await client.open_channel(1)
        if confirm_mode:  # the broker's share of confirms: it acks, nobody waits
            client.write(CONFIRM_SELECT_NOWAIT)
        one = publish_frames(1, "", queue, body, client.frame_max)
        budget = min(IN_FLIGHT_BYTES // len(one), IN_FLIGHT_MESSAGES) // connections
        per_chunk = max(1, budget // MARKERS_IN_FLIGHT)
        chunk = one * per_chunk + SYNC_FRAMES[1]
        await start.wait()
        began = time.perf_counter()
        deadline = began + duration
        markers = 0
        while time.perf_counter() < deadline:
            if markers - client.answered >= MARKERS_IN_FLIGHT:
                await client.wait_answered(markers - MARKERS_IN_FLIGHT + 1)
            client.write(chunk)
            markers += 1
        # Every publish sent is processed by the broker's channel once its marker is answered.
        await client.wait_answered(markers)
        return markers * per_chunk, began, time.perf_counter()
    finally:
        await client.close()


async def publish(
    host: str,
    port: int,
    login: Handshake,
    queue: str,
    *,
    connections: int,
    body_size: int,
    duration: float,
    confirm_mode: bool = False,
) -> dict[str, Any]:
    """Publishes as fast as the broker takes them; with `confirm_mode`, on channels in
    confirm mode whose acks nobody waits for (what the proxy's own confirms cost the broker)."""
    start = asyncio.Event()
    body = b"x" * body_size
    tasks = [
        asyncio.ensure_future(
            _publisher(host, port, login, queue, body, duration, start, connections, confirm_mode)
        )
        for _ in range(connections)
    ]
    await asyncio.sleep(0.05)
    start.set()
    results = await asyncio.gather(*tasks)
    began = min(r[1] for r in results)
    ended = max(r[2] for r in results)
    return {"count": sum(r[0] for r in results), "elapsed": ended - began}


# --- publish with confirms -----------------------------------------------------------------


class ConfirmingPublisher(Client):
    """Keeps `window` publishes unconfirmed: each batch of acks is refilled in one write."""

    window = 100
    one = b""
    sending = True

    def start_confirming(self, one: bytes, window: int) -> asyncio.Future[None]:
        self.one = one
        self.window = window
        self.published = 0
        self.confirmed = 0
        self.nacked = 0
        self._upto = 0
        self._singles: set[int] = set()
        self.sending = True
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.handler = self._confirm_frame
        self.write(one * window)
        self.published = window
        return self.done

    def _confirm_frame(self, frame_type: int, channel: int, buf: Any, start: int, end: int) -> None:
        if frame_type != METHOD:
            return
        mid = METHOD_ID.unpack_from(buf, start)[0]
        if mid in (BASIC_ACK, BASIC_NACK):
            tag = U64.unpack_from(buf, start + 4)[0]
            before = self.confirmed
            singles = self._singles
            if buf[start + 12] & 1:  # multiple: every tag up to this one
                if tag > self._upto:
                    below = [t for t in singles if t <= tag] if singles else ()
                    singles.difference_update(below)
                    self.confirmed += tag - self._upto - len(below)
                    self._upto = tag
            elif tag > self._upto and tag not in singles:
                singles.add(tag)
                self.confirmed += 1
                while self._upto + 1 in singles:
                    self._upto += 1
                    singles.discard(self._upto)
            if mid == BASIC_NACK:
                self.nacked += self.confirmed - before
            if self.sending:
                room = self.window - (self.published - self.confirmed)
                if room > 0:
                    self.write(self.one * room)
                    self.published += room
            elif self.confirmed >= self.published and not self.done.done():
                self.done.set_result(None)
        else:
            self.method_received(channel, mid, buf, start, end)
            if self.error is not None and not self.done.done():
                self.done.set_exception(self.error)

    def stop_sending(self) -> None:
        self.sending = False
        if self.confirmed >= self.published and not self.done.done():
            self.done.set_result(None)


async def publish_confirms(
    host: str, port: int, login: Handshake, queue: str, *, body_size: int, window: int,
    duration: float,
) -> dict[str, Any]:  # fmt: skip
    client = await connect(host, port, login, factory=ConfirmingPublisher)
    assert isinstance(client, ConfirmingPublisher)
    try:
        await client.open_channel(1)
        await client.call(encode(1, commands.Confirm.Select()), 1, CONFIRM_SELECT_OK)
        one = publish_frames(1, "", queue, b"x" * body_size, client.frame_max)
        began = time.perf_counter()
        done = client.start_confirming(one, window)
        await asyncio.sleep(duration)
        client.stop_sending()
        await asyncio.wait_for(done, 30)
        elapsed = time.perf_counter() - began
        if client.nacked:
            raise AMQPError(f"{client.nacked} publishes nacked")
        return {"count": client.confirmed, "elapsed": elapsed}
    finally:
        client.handler = client._method_frame
        await client.close()


# --- consume -------------------------------------------------------------------------------


class Consumer(Client):
    """Acks every delivery (one ack frame each, all acks of one read in one write)."""

    def start_consuming(self, expected: int) -> asyncio.Future[float]:
        self.expected = expected
        self.received = 0
        self.done: asyncio.Future[float] = self.loop.create_future()
        self._acks: list[bytes] = []
        self.handler = self._consume_frame
        return self.done

    def _consume_frame(self, frame_type: int, channel: int, buf: Any, start: int, end: int) -> None:
        if frame_type != METHOD:
            return
        mid = METHOD_ID.unpack_from(buf, start)[0]
        if mid == BASIC_DELIVER:
            tag_at = start + 5 + buf[start + 4]  # after the consumer tag (shortstr)
            self._acks.append(ack_frame(channel, U64.unpack_from(buf, tag_at)[0]))
            self.received += 1
            if self.received == self.expected and not self.done.done():
                self.done.set_result(time.perf_counter())
        else:
            self.method_received(channel, mid, buf, start, end)
            if self.error is not None and not self.done.done():
                self.done.set_exception(self.error)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.handler == self._consume_frame and self._acks:
            self.write(b"".join(self._acks))
            self._acks.clear()


async def consume(
    host: str, port: int, login: Handshake, queue: str, *, count: int, prefetch: int
) -> dict[str, Any]:
    client = await connect(host, port, login, factory=Consumer)
    assert isinstance(client, Consumer)
    try:
        await client.open_channel(1)
        await client.call(encode(1, commands.Basic.Qos(prefetch_count=prefetch)), 1, BASIC_QOS_OK)
        consume_ok = client.expect(1, BASIC_CONSUME_OK)
        done = client.start_consuming(count)
        began = time.perf_counter()
        client.write(encode(1, commands.Basic.Consume(queue=queue, consumer_tag="bench")))
        await asyncio.wait_for(consume_ok, 10)
        ended = await asyncio.wait_for(done, 120)
        return {"count": client.received, "elapsed": ended - began}
    finally:
        client.handler = client._method_frame
        await client.close()


# --- connect / channel / publish / disconnect cycles ---------------------------------------


async def one_cycle(host: str, port: int, login: Handshake, one: bytes) -> None:
    """php-amqp's cycle: connect, Channel.Open, Basic.Qos, publish, Channel.Close,
    Connection.Close, each step awaiting its reply as php-amqp does."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(loop), host, port)
    try:
        started = client.expect(0, CONNECTION_START)
        client.write(PROTOCOL_HEADER)
        await started
        tune = await client.call(login.start_ok, 0, CONNECTION_TUNE)
        await client.call(login.tune_ok(tune)[0], 0, CONNECTION_OPEN_OK)
        await client.call(CHANNEL_OPEN, 1, CHANNEL_OPEN_OK)
        await client.call(PHP_QOS, 1, BASIC_QOS_OK)
        client.write(one)
        await client.call(CHANNEL_CLOSE, 1, CHANNEL_CLOSE_OK)
        await client.call(CONNECTION_CLOSE_FRAME, 0, CONNECTION_CLOSE_OK)
    finally:
        client.transport.close()  # type: ignore[union-attr]


async def cycles(
    host: str, port: int, login: Handshake, queue: str, *, parallel: int, duration: float
) -> dict[str, Any]:
    one = publish_frames(1, "", queue, b"x" * 100)
    latencies: list[float] = []
    began = time.perf_counter()
    deadline = began + duration

    async def worker() -> None:
        perf = time.perf_counter
        while perf() < deadline:
            t0 = perf()
            await asyncio.wait_for(one_cycle(host, port, login, one), 10)
            latencies.append(perf() - t0)

    await asyncio.gather(*(worker() for _ in range(parallel)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    return {
        "count": n,
        "elapsed": elapsed,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


# --- connection storm ----------------------------------------------------------------------


async def storm_open(
    host: str, port: int, login: Handshake, count: int, timeout: float
) -> tuple[list[Client], float, int, dict[str, Any]]:
    """Open `count` connections, each with one channel, all at once; returns the clients, the
    seconds until all were open, how many failed and when half and 90 % were open."""
    began = time.perf_counter()
    done_at: list[float] = []

    async def one() -> Client:
        client = await connect(host, port, login, timeout=timeout)
        await asyncio.wait_for(client.open_channel(1), timeout)
        done_at.append(time.perf_counter() - began)
        return client

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    elapsed = time.perf_counter() - began
    clients = [r for r in results if isinstance(r, Client)]
    done_at.sort()
    n = len(done_at)
    times = {
        "p50_s": done_at[n // 2] if n else 0.0,
        "p90_s": done_at[int(n * 0.9)] if n else 0.0,
        "errors": sorted({repr(r) for r in results if not isinstance(r, Client)})[:3],
    }
    return clients, elapsed, count - len(clients), times


async def storm_close(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def warm_up(host: str, port: int, login: Handshake, connections: int = 10) -> None:
    """Open and close a few connections with a channel each (fills both workers' pools)."""
    for _ in range(connections):
        client = await connect(host, port, login)
        await client.open_channel(1)
        await client.sync(1)
        await client.close()
