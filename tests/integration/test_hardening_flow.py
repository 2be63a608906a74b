"""Issue 4, memory: the proxy never buffers without bound for anybody.

- Broker flow control (memory alarm): when the broker stops reading an upstream connection,
  the proxy stops reading the clients publishing on it, so their data waits in their own
  sockets; the publisher is told Connection.Blocked, and nothing is lost once the alarm clears.
- A consumer that does not read is disconnected once the proxy holds client_max_buffer bytes
  for it (log line, metric), and the publisher on the same upstream connection is not slowed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from pamqp import body as pbody
from pamqp import commands, frame, header

from tests.support.broker import Names, queue_counts, rabbitmqctl
from tests.support.memory import RssSampler
from tests.support.proxy import ProxyProcess
from tests.support.raw_client import RawClient, RawClosed
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")

RSS_GROWTH_LIMIT = 50 * 1024 * 1024


def message_frames(queue: str, size: int) -> bytes:
    props = commands.Basic.Properties(delivery_mode=1)
    return b"".join(
        (
            frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1),
            frame.marshal(header.ContentHeader(0, size, props), 1),
            frame.marshal(pbody.ContentBody(b"m" * size), 1),
        )
    )


class RawPublisher:
    """Publishes one message after another as fast as its socket takes them (thread), and
    records the connection-class methods the proxy sends it (another thread)."""

    def __init__(self, p: ProxyProcess, queue: str, size: int) -> None:
        self.c = RawClient(p.host, p.port, timeout=60)
        assert "open_ok" in self.c.handshake()
        self.c.send(commands.Channel.Open(), 1)
        assert isinstance(self.c.read_method()[1], commands.Channel.OpenOk)
        self.message = message_frames(queue, size)
        self.sent = 0  # messages completely handed to the socket
        self.events: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.go = threading.Event()
        self.stop = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        try:
            while not self.stop.is_set():
                self.go.wait()
                self.c.sock.sendall(self.message)
                self.sent += 1
        except OSError as exc:
            self.errors.append(f"publisher: {exc!r}")

    def _read(self) -> None:
        try:
            while True:
                ch, m = self.c.read_method()
                if isinstance(m, commands.Connection.Blocked):
                    self.events.append(("blocked", m.reason))
                elif isinstance(m, commands.Connection.Unblocked):
                    self.events.append(("unblocked", ""))
                else:
                    self.errors.append(f"unexpected {m.name} on channel {ch}")
        except (RawClosed, OSError):
            pass

    def finish(self) -> int:
        self.stop.set()
        self.go.set()
        self._writer.join(30)
        assert not self._writer.is_alive(), "the publisher is still blocked"
        return self.sent

    def close(self) -> None:
        self.c.close()


def stalls(read: Callable[[], int], quiet: float, timeout: float) -> int:
    """Wait until read() has not changed for ``quiet`` seconds; return its value."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"still moving after {timeout}s: {value}"
        time.sleep(0.1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def test_memory_alarm_blocks_a_fast_publisher_without_buffering_in_the_proxy(
    proxy_factory: ProxyFactory, names: Names, restore_watermark: Callable[[], None]
) -> None:
    p = proxy_factory("-t", "60", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    q = names.queue("alarm")
    setup = p.connect()
    setup.channel().queue_declare(q)
    setup.close()
    pub = RawPublisher(p, q, size=16 * 1024)
    try:
        pub.go.set()
        wait_for(lambda: pub.sent >= 200, 10, what="publishing")
        pub.go.clear()
        with RssSampler(p, interval=0.1) as rss:
            rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
            wait_for(
                lambda: "memory" in rabbitmqctl("-q", "eval", "rabbit_alarm:get_alarms()."),
                15,
                what="the memory alarm",
            )
            before_alarm = pub.sent
            pub.go.set()  # publishing as fast as it can, into the alarm
            wait_for(lambda: pub.events, 15, what="Connection.Blocked for the publisher")
            assert pub.events == [("blocked", "low on memory")]
            # the publisher keeps trying, but its socket stops taking data: the proxy no
            # longer reads it (the broker does not read the upstream connection)
            stalled_at = stalls(lambda: pub.sent, quiet=1.5, timeout=20)
            p.wait_log(r"is not reading; pausing its clients")
            held = queue_counts(q)[0]
            time.sleep(1.0)
            assert pub.sent == stalled_at
            assert queue_counts(q)[0] == held  # nothing gets through while blocked
        assert rss.growth < RSS_GROWTH_LIMIT, f"worker RSS grew by {rss.growth / 2**20:.1f} MiB"
        restore_watermark()
        wait_for(lambda: len(pub.events) == 2, 30, what="Connection.Unblocked")
        assert pub.events == [("blocked", "low on memory"), ("unblocked", "")]
        wait_for(lambda: pub.sent > stalled_at + 100, 20, what="publishing again")
        total = pub.finish()
        assert pub.errors == []
        # everything the publisher handed over arrives, exactly once
        wait_for(lambda: queue_counts(q)[0] == total, 30, what=f"{total} messages in {q}")
        time.sleep(0.3)
        assert queue_counts(q) == (total, 0)
        p.wait_log(r"reads again; resuming its clients")
        growth = rss.growth / 2**20
        print(f"alarm: {before_alarm} sent before it, {stalled_at} when stalled, {total} in all")
        print(f"alarm: worker RSS +{growth:.1f} MiB")
    finally:
        pub.stop.set()
        pub.go.set()
        pub.close()


@pytest.mark.parametrize("no_ack", [True, False], ids=["auto-ack", "manual-ack-no-prefetch"])
def test_slow_consumer_is_slowed_loses_nothing_and_the_publisher_goes_on(
    proxy_factory: ProxyFactory, names: Names, no_ack: bool
) -> None:
    """A consumer that stops reading is neither disconnected nor fed without bound: the proxy
    consumes for it with a window of its own (acking auto-ack deliveries only once they have
    left for the client's socket), so the broker keeps the rest. When it reads again it gets
    every message, once, in order."""
    p = proxy_factory(
        "-t", "60", "--client-max-buffer", "1048576", "--consumer-window", "16", direct_ok=False
    )  # fmt: skip
    assert isinstance(p, ProxyProcess)
    q = names.queue("slowconsumer")
    publisher = p.connect()
    pch = publisher.channel()
    pch.queue_declare(q)
    pch.confirm_delivery()
    slow = RawClient(p.host, p.port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert "open_ok" in slow.handshake()
    slow.send(commands.Channel.Open(), 1)
    assert isinstance(slow.read_method()[1], commands.Channel.OpenOk)
    slow.send(commands.Basic.Consume(queue=q, consumer_tag="slow", no_ack=no_ack), 1)
    assert isinstance(slow.read_method()[1], commands.Basic.ConsumeOk)
    ports = p.upstream_local_ports()
    assert len(ports) == 1  # publisher and slow consumer share the upstream connection
    count, size = 400, 32 * 1024
    slowest = 0.0
    try:
        with RssSampler(p, interval=0.1) as rss:
            for i in range(count):  # ... and the slow client does not read for now
                started = time.monotonic()
                pch.basic_publish("", q, i.to_bytes(4, "big") + b"p" * (size - 4))
                slowest = max(slowest, time.monotonic() - started)
            time.sleep(1)
        assert slowest < 2.0, f"a publish waited {slowest:.2f} s for its confirm"
        # the broker keeps what the slow consumer has not taken: 16 in the proxy's window at
        # most, and what the kernel's socket buffers hold (at most some 4 MiB on loopback)
        waiting, consumers = queue_counts(q)
        assert consumers == 1 and waiting >= count // 4, (waiting, consumers)
        assert rss.growth < RSS_GROWTH_LIMIT, f"worker RSS grew by {rss.growth / 2**20:.1f} MiB"
        assert "disconnecting it" not in p.log_text()
        # now it reads: every message, once, in order
        got: list[int] = []
        slow.sock.settimeout(20)
        while len(got) < count:
            _, method = slow.read_frame()
            if isinstance(method, commands.Basic.Deliver) and not no_ack:
                slow.send(commands.Basic.Ack(method.delivery_tag), 1)
            elif isinstance(method, pbody.ContentBody):  # each body is one frame here
                got.append(int.from_bytes(method.value[:4], "big"))
        assert got == list(range(count))
        wait_for(lambda: queue_counts(q) == (0, 1), 10, what="an empty queue")
        assert publisher.is_open
        assert p.upstream_local_ports() == ports
        growth = rss.growth / 2**20
        print(f"slow consumer: slowest confirm {slowest * 1000:.0f} ms, RSS +{growth:.1f} MiB")
    finally:
        slow.close()
        publisher.close()
