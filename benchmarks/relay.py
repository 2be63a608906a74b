"""A userspace latency relay: a TCP forwarder that delays each direction by a fixed time.

    python benchmarks/relay.py --listen-port 25672 --target 127.0.0.1:5672 --delay-ms 25

Every chunk read from one side is written to the other side `delay` later, in the order it
was read (one FIFO and one timer per direction), so 25 ms each way is a 50 ms round trip.
A close is passed on after the data before it. The TCP handshake itself is not delayed
(the relay accepts at once), so an AMQP connection pays the delay on its AMQP round trips
only: like a broker whose TCP connection was already established. This machine has no
`tc netem`; this stands in for it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import sys

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


class Direction:
    """Bytes from one peer to the other, each chunk released `delay` after it arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.target: asyncio.Transport | None = None

    def push(self, data: bytes | None) -> None:
        """Queue data (None: the peer closed)."""
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None and self.target is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def attach(self, target: asyncio.Transport) -> None:
        self.target = target
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def release(self) -> None:
        self.timer = None
        now = self.loop.time()
        queue = self.queue
        out: list[bytes] = []
        close = False
        while queue and queue[0][0] <= now:
            data = queue.popleft()[1]
            if data is None:
                close = True
                break
            out.append(data)
        target = self.target
        assert target is not None
        if out and not target.is_closing():
            target.write(b"".join(out))
        if close:
            queue.clear()
            if not target.is_closing():
                target.close()
            return
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self.release)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class OpenCounter:
    """Counts Channel.Open methods in a client-to-broker byte stream (frame headers only)."""

    total = 0

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        size = len(buf)
        if size >= 8 and buf[:4] == b"AMQP":
            pos = 8
        while size - pos >= 11:
            length = int.from_bytes(buf[pos + 3 : pos + 7], "big")
            end = pos + 8 + length
            if end > size:
                break
            if buf[pos] == 1 and buf[pos + 7 : pos + 11] == b"\x00\x14\x00\x0a":
                OpenCounter.total += 1
            pos = end
        del buf[:pos]


class Side(asyncio.Protocol):
    """One socket of a relayed connection; what it reads goes into `out`."""

    def __init__(
        self, out: Direction, inbound: Direction, counter: OpenCounter | None = None
    ) -> None:
        self.out = out
        self.inbound = inbound
        self.counter = counter
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.inbound.attach(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.counter is not None:
            self.counter.feed(data)
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(None)
        return True  # keep the socket until the delayed close reaches it

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # reset: pass it on at once
            self.inbound.cancel()
            self.out.cancel()
            if self.out.target is not None:
                self.out.target.abort()
        else:
            self.out.push(None)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def serve(
    listen_host: str,
    listen_port: int,
    target: tuple[str, int],
    delay: float,
    stats: str | None = None,
) -> None:
    loop = asyncio.get_running_loop()

    class ClientSide(Side):
        def __init__(self) -> None:
            to_server = Direction(loop, delay)
            to_client = Direction(loop, delay)
            super().__init__(to_server, to_client, OpenCounter() if stats else None)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            transport.set_write_buffer_limits(high=4 << 20)  # type: ignore[attr-defined]
            self.connecting = loop.create_task(self._connect())

        async def _connect(self) -> None:
            try:
                await loop.create_connection(
                    lambda: Side(self.inbound, self.out), target[0], target[1]
                )
            except OSError:
                if self.transport is not None:
                    self.transport.abort()

    server = await loop.create_server(ClientSide, listen_host, listen_port, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _set_once, stop)
    print(f"relay listening on {listen_host}:{listen_port}", flush=True)
    if stats:
        written = -1
        while not stop.done():
            if OpenCounter.total != written:
                written = OpenCounter.total
                with open(stats + ".tmp", "w") as file:
                    file.write(f"{written}\n")
                os.replace(stats + ".tmp", stats)
            await asyncio.wait([stop], timeout=0.1)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target", default="127.0.0.1:5672", help="host:port")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay")
    parser.add_argument(
        "--stats", metavar="FILE", help="keep the count of Channel.Open sent to the target here"
    )
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.listen_host,
                args.listen_port,
                (host, int(port)),
                args.delay_ms / 1000,
                args.stats,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
