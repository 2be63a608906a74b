"""A minimal, fast AMQP 0-9-1 client for the load generator (asyncio Protocol, uvloop).

Frames the generator sends are encoded once with pamqp and then written as bytes; frames it
receives are scanned in place (frame header and method id only), never decoded unless the
handshake needs them. This keeps the generator's cost per message to a few bytes copied and a
few integer comparisons, so that the broker or the proxy, not the generator, is the bottleneck.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp import frame as pamqp_frame

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_HEADER = struct.Struct(">BHI")
METHOD_ID = struct.Struct(">I")
U64 = struct.Struct(">Q")
# A complete Basic.Ack frame: type, channel, size, class, method, delivery tag, multiple, end.
ACK_FRAME = struct.Struct(">BHIHHQBB")

METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8

CONNECTION_START = 0x000A000A
CONNECTION_TUNE = 0x000A001E
CONNECTION_OPEN_OK = 0x000A0029
CONNECTION_CLOSE = 0x000A0032
CONNECTION_CLOSE_OK = 0x000A0033
CONNECTION_BLOCKED = 0x000A003C
CHANNEL_OPEN_OK = 0x0014000B
CHANNEL_CLOSE = 0x00140028
CHANNEL_CLOSE_OK = 0x00140029
EXCHANGE_DECLARE_OK = 0x0028000B
QUEUE_DECLARE_OK = 0x0032000B
QUEUE_DELETE_OK = 0x00320029
QUEUE_PURGE_OK = 0x0032001F
BASIC_QOS_OK = 0x003C000B
BASIC_CONSUME_OK = 0x003C0015
BASIC_DELIVER = 0x003C003C
BASIC_ACK = 0x003C0050
BASIC_NACK = 0x003C0078
CONFIRM_SELECT_OK = 0x0055000B

CLIENT_PROPERTIES: dict[str, Any] = {
    "product": "amqproxy-mp benchmark",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
    },
}


class AMQPError(Exception):
    pass


def encode(channel: int, method: Any) -> bytes:
    return bytes(pamqp_frame.marshal(method, channel))


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(frame_type, channel, len(payload)) + payload + b"\xce"


def publish_frames(
    channel: int, exchange: str, routing_key: str, body: bytes, frame_max: int = 131072
) -> bytes:
    """One complete Basic.Publish (method, content header without properties, body frames)."""
    method = encode(channel, commands.Basic.Publish(exchange=exchange, routing_key=routing_key))
    header = frame(HEADER, channel, struct.pack(">HHQH", 60, 0, len(body), 0))
    limit = frame_max - 8
    bodies = b"".join(frame(BODY, channel, body[i : i + limit]) for i in range(0, len(body), limit))
    return method + header + bodies


def ack_frame(channel: int, tag: int, multiple: bool = False) -> bytes:
    return ACK_FRAME.pack(METHOD, channel, 13, 60, 80, tag, int(multiple), 0xCE)


class Handshake:
    """Pre-encoded frames of one (user, password, vhost) login."""

    def __init__(self, user: str, password: str, vhost: str) -> None:
        self.start_ok = encode(
            0,
            commands.Connection.StartOk(
                client_properties=CLIENT_PROPERTIES,
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
        )
        self.open = encode(0, commands.Connection.Open(virtual_host=vhost))
        self._tune_ok: dict[bytes, bytes] = {}

    def tune_ok(self, tune_payload: bytes) -> tuple[bytes, int]:
        """TuneOk (+ Open) for a Tune payload, cached: servers send the same Tune every time."""
        cached = self._tune_ok.get(tune_payload)
        if cached is None:
            channel_max, frame_max, _ = struct.unpack_from(">HIH", tune_payload, 4)
            tune_ok = encode(
                0,
                commands.Connection.TuneOk(
                    channel_max=channel_max, frame_max=frame_max or 131072, heartbeat=0
                ),
            )
            cached = self._tune_ok[tune_payload] = tune_ok + self.open
        frame_max = struct.unpack_from(">I", tune_payload, 6)[0] or 131072
        return cached, frame_max


FrameHandler = Callable[[int, int, Any, int, int], None]


class Client(asyncio.Protocol):
    """One connection. `await wait_method(channel, method_id)` waits for a reply; hot loops
    install `handler(frame_type, channel, buf, start, end)` instead (payload is buf[start:end])."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self.handler: FrameHandler = self._method_frame
        self._waiter: asyncio.Future[bytes] | None = None
        self._want: tuple[int, int] = (0, 0)
        self._drain: asyncio.Future[None] | None = None
        self.paused = False
        self.error: Exception | None = None
        self.closed = False
        self.frame_max = 131072
        self.blocked = False

    # -- asyncio ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.error is None:
            self.error = AMQPError(f"connection lost: {exc}" if exc else "connection closed")
        self._fail(self.error)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(self.error)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            data = buf  # type: ignore[assignment]
        size = len(data)
        pos = 0
        handler = self.handler
        unpack = FRAME_HEADER.unpack_from
        while size - pos >= 8:
            frame_type, channel, length = unpack(data, pos)
            end = pos + 7 + length
            if end >= size:
                break
            handler(frame_type, channel, data, pos + 7, end)
            pos = end + 1
        if buf:
            del buf[:pos]
        elif pos < size:
            buf += data[pos:]

    # -- replies ------------------------------------------------------------------------

    def _method_frame(self, frame_type: int, channel: int, buf: Any, start: int, end: int) -> None:
        if frame_type != METHOD:
            return
        mid = METHOD_ID.unpack_from(buf, start)[0]
        self.method_received(channel, mid, buf, start, end)

    def method_received(self, channel: int, mid: int, buf: Any, start: int, end: int) -> None:
        if (channel, mid) == self._want and self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(bytes(buf[start:end]))
            return
        if mid in (CONNECTION_CLOSE, CHANNEL_CLOSE):
            code, text_len = struct.unpack_from(">HB", buf, start + 4)
            text = bytes(buf[start + 7 : start + 7 + text_len]).decode(errors="replace")
            what = "connection" if mid == CONNECTION_CLOSE else f"channel {channel}"
            self.error = AMQPError(f"{what} closed by peer: {code} {text}")
            if mid == CONNECTION_CLOSE and self.transport is not None:
                self.transport.write(encode(0, commands.Connection.CloseOk()))
                self.transport.close()
            self._fail(self.error)
        elif mid == CONNECTION_BLOCKED:
            self.blocked = True

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._waiter = None

    def expect(self, channel: int, mid: int) -> asyncio.Future[bytes]:
        """A future for the next method `mid` on `channel` (set it up before writing)."""
        if self.error is not None:
            raise self.error
        self._want = (channel, mid)
        self._waiter = self.loop.create_future()
        return self._waiter

    async def call(self, data: bytes, channel: int, mid: int) -> bytes:
        waiter = self.expect(channel, mid)
        assert self.transport is not None
        self.transport.write(data)
        return await waiter

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self.paused:
            self._drain = self.loop.create_future()
            await self._drain

    # -- operations ---------------------------------------------------------------------

    async def handshake(self, login: Handshake) -> None:
        tune = self.expect(0, CONNECTION_START)
        self.write(PROTOCOL_HEADER)
        await tune
        payload = await self.call(login.start_ok, 0, CONNECTION_TUNE)
        tune_ok, self.frame_max = login.tune_ok(payload)
        await self.call(tune_ok, 0, CONNECTION_OPEN_OK)

    async def open_channel(self, channel: int) -> None:
        await self.call(frame(METHOD, channel, b"\x00\x14\x00\x0a\x00"), channel, CHANNEL_OPEN_OK)

    async def sync(self, channel: int) -> None:
        """A round trip the broker itself answers after everything sent before on `channel`
        (a passive declare of amq.direct; the proxy forwards it, unlike Basic.Qos)."""
        await self.call(SYNC_FRAMES[channel], channel, EXCHANGE_DECLARE_OK)

    async def close(self, timeout: float = 5.0) -> None:
        if self.closed or self.transport is None:
            return
        try:
            await asyncio.wait_for(
                self.call(CONNECTION_CLOSE_FRAME, 0, CONNECTION_CLOSE_OK), timeout
            )
        except (AMQPError, TimeoutError, ConnectionError):
            pass
        finally:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _SyncFrames(dict[int, bytes]):
    def __missing__(self, channel: int) -> bytes:
        data = self[channel] = encode(
            channel,
            commands.Exchange.Declare(exchange="amq.direct", exchange_type="direct", passive=True),
        )
        return data


SYNC_FRAMES = _SyncFrames()
CONNECTION_CLOSE_FRAME = encode(0, commands.Connection.Close(200, "bye", 0, 0))


async def connect(
    host: str,
    port: int,
    login: Handshake,
    *,
    timeout: float = 30.0,
    factory: type[Client] = Client,
) -> Client:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(lambda: factory(loop), host, port)
        try:
            await client.handshake(login)
        except BaseException:
            client.abort()
            raise
    return client
