"""Runs a program against one target (RabbitMQ itself, or a proxy in front of it) and returns
what every client observed, and what the broker holds afterwards.

Steps run one after the other; each synchronous step waits for its reply, and after each step
the run waits until nothing more arrives for a moment (`quiet`), so that deliveries, returns
and closes caused by a step are seen before the next step. Clients react as libraries do:
they confirm a broker's Channel.Close and Connection.Close.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
from pamqp import commands

from .wire import Event, Wire, method_frame

if TYPE_CHECKING:
    from .program import Program

BROKER = ("127.0.0.1", 5672)


@dataclass
class Client:
    """A client's view of its own connection (what its library would know)."""

    wire: Wire | None = None
    connected: bool = False
    closing: bool = False
    frame_max: int = 131072
    channels: set[int] = field(default_factory=set)
    #: delivery tags received per channel, in order (to ack them)
    delivery_tags: dict[int, list[int]] = field(default_factory=dict)
    #: consumer tags per channel (from ConsumeOk)
    consumer_tags: dict[int, list[str]] = field(default_factory=dict)
    handled: int = 0  # events of the wire already looked at
    #: every connection this client had (a reconnect starts a new wire), for comparison
    wires: list[Wire] = field(default_factory=list)


@dataclass
class Observation:
    """Everything observed in one run."""

    #: per client: per connection it had: (channel, event), in the order they arrived
    clients: dict[int, list[list[tuple[int, Event]]]]
    #: per queue (short name): its messages in order, or None when it does not exist
    queues: dict[str, list[tuple[bytes, bytes, bool]] | None]


class Run:
    def __init__(self, host: str, port: int, prefix: str, quiet: float = 0.01) -> None:
        self.host, self.port = host, port
        self.prefix = prefix
        self.quiet_time = quiet
        self.clients: dict[int, Client] = {}
        #: server-named queues the program created that outlive their client
        self.generated_queues: set[str] = set()
        self.selector = selectors.DefaultSelector()
        #: the program step under way, and whether a consumer may be getting deliveries
        self.step = -1
        self.consumers = False

    def at_step(self, step: int) -> None:
        self.step = step
        for client in self.clients.values():
            if client.wire is not None:
                client.wire.step = step

    # --- names -----------------------------------------------------------------------------

    def name(self, short: str) -> str:
        """A program's name in this run (empty and reserved names stay as they are)."""
        if not short or short.startswith("amq."):
            return short
        return f"{self.prefix}-{short}"

    # --- clients -----------------------------------------------------------------------------

    def client(self, index: int) -> Client:
        return self.clients.setdefault(index, Client())

    def connect(self, index: int) -> Wire:
        client = self.client(index)
        self.drop(index)
        wire = Wire(self.host, self.port)
        wire.step = self.step
        client.wire = wire
        client.wires.append(wire)
        client.connected = False
        client.closing = False
        client.channels.clear()
        client.delivery_tags.clear()
        client.consumer_tags.clear()
        client.handled = 0
        if wire.eof:
            return wire
        with contextlib.suppress(KeyError, ValueError):  # a dead wire had this descriptor
            self.selector.unregister(wire.sock.fileno())
        self.selector.register(wire.sock, selectors.EVENT_READ, wire)
        return wire

    def drop(self, index: int) -> None:
        """Close the client's socket without a word."""
        client = self.client(index)
        if client.wire is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(client.wire.sock)
            client.wire.close()
        client.wire = None
        client.connected = False

    def send(self, index: int, data: bytes) -> None:
        client = self.client(index)
        if client.wire is not None and not client.wire.eof:
            client.wire.send(data)

    # --- receiving ---------------------------------------------------------------------------

    def pump(self, timeout: float) -> bool:
        """Wait up to `timeout` for data on any client and record it; True if any came."""
        got = False
        for key, _ in self.selector.select(timeout):
            wire: Wire = key.data
            if wire.eof:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(key.fd)
                continue
            if wire.pump():
                got = True
            if wire.eof:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(wire.sock)
        if got:
            self._react()
        return got

    def _react(self) -> None:
        """What a client library does by itself with what arrived."""
        for client in self.clients.values():
            wire = client.wire
            if wire is None:
                continue
            log = wire.log
            for channel, event in log[client.handled :]:
                if event.name == "Channel.Close" and channel:
                    wire.send(method_frame(channel, commands.Channel.CloseOk()))
                    client.channels.discard(channel)
                elif event.name == "Connection.Close":
                    wire.send(method_frame(0, commands.Connection.CloseOk()))
                    client.connected = False
                elif event.name == "socket closed":
                    client.connected = False
                elif event.name in ("Basic.Deliver", "Basic.GetOk"):
                    tag = int(event.fields["delivery_tag"])
                    client.delivery_tags.setdefault(channel, []).append(tag)
                elif event.name == "Basic.ConsumeOk":
                    self.consumers = True
                    client.consumer_tags.setdefault(channel, []).append(
                        str(event.fields["consumer_tag"])
                    )
                elif event.name == "Queue.DeclareOk":
                    name = str(event.fields["queue"])
                    if name.startswith("amq.gen-"):
                        self.generated_queues.add(name)
            client.handled = len(log)

    def mark(self, index: int) -> int:
        """Where the client's log is now (for `wait(..., since=)`)."""
        wire = self.client(index).wire
        return len(wire.log) if wire is not None else 0

    def wait(
        self,
        index: int,
        channel: int,
        names: tuple[str, ...],
        timeout: float = 5.0,
        since: int | None = None,
        close_ends: bool = True,
    ) -> Event | None:
        """Until a reply named in `names` arrives on the channel (or the channel is closed,
        unless not `close_ends`, or the connection or its socket). None and a "timeout"
        event when nothing comes."""
        client = self.client(index)
        wire = client.wire
        if wire is None or wire.eof:
            return None  # (a library raises "connection closed": nothing to observe)
        start = len(wire.log) if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            for ch, event in wire.log[start:]:
                if ch == channel and (
                    event.name in names or (close_ends and event.name == "Channel.Close")
                ):
                    return event
                if ch == 0 and event.name in ("Connection.Close", "socket closed"):
                    return event
            if wire.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                wire.record(channel, Event("timeout", {"waiting for": "/".join(names)}))
                return None
            self.pump(min(left, 0.05))

    def quiet(self) -> None:
        """Until nothing has arrived for `quiet_time`."""
        while self.pump(self.quiet_time):
            pass

    # --- the end -------------------------------------------------------------------------------

    def finish(self) -> None:
        """Every connected client makes sure the broker has processed what it sent (a round
        trip on each open channel), then closes cleanly: the program's end is not a race."""
        for index, client in self.clients.items():
            for channel in sorted(client.channels):
                if client.connected and client.wire is not None and not client.closing:
                    sync = commands.Exchange.Declare(exchange="amq.direct", passive=True)
                    self.send(index, method_frame(channel, sync))
                    self.wait(index, channel, ("Exchange.DeclareOk",))
        self.quiet()
        for index, client in self.clients.items():
            if client.connected and client.wire is not None and not client.closing:
                client.closing = True
                self.send(index, method_frame(0, commands.Connection.Close(200, "end", 0, 0)))
                self.wait(index, 0, ("Connection.CloseOk",))
        self.quiet()
        for index in list(self.clients):
            self.drop(index)
        self.selector.close()

    def observe(self, program: Program) -> Observation:
        clients = {
            index: [list(wire.log) for wire in client.wires]
            for index, client in sorted(self.clients.items())
        }
        return Observation(clients, broker_state(self, program.queue_names()))


class Admin:
    """A raw connection straight to the broker, reading messages byte for byte (pika cannot
    decode every value a program may publish)."""

    def __init__(self) -> None:
        self.run = Run(*BROKER, "admin")
        wire = self.run.connect(0)
        wire.send(b"AMQP\x00\x00\x09\x01")
        self.run.wait(0, 0, ("Connection.Start",))
        wire.send(method_frame(0, commands.Connection.StartOk({}, "PLAIN", "\0guest\0guest")))
        self.run.wait(0, 0, ("Connection.Tune",))
        wire.send(method_frame(0, commands.Connection.TuneOk(2047, 131072, 0)))
        wire.send(method_frame(0, commands.Connection.Open("/")))
        self.run.wait(0, 0, ("Connection.OpenOk",))
        self.channel = 0

    def request(self, method: Any, replies: tuple[str, ...]) -> Event | None:
        """On a fresh channel when the last one was closed by an error."""
        if not self.channel:
            self.channel = max(self.run.client(0).channels, default=0) + 1
            self.run.send(0, method_frame(self.channel, commands.Channel.Open()))
            self.run.wait(0, self.channel, ("Channel.OpenOk",))
            self.run.client(0).channels.add(self.channel)
        self.run.send(0, method_frame(self.channel, method))
        event = self.run.wait(0, self.channel, replies)
        if event is None or event.name == "Channel.Close":
            self.channel = 0
        return event

    def count(self, queue: str) -> int | None:
        event = self.request(
            commands.Queue.Declare(queue=queue, passive=True), ("Queue.DeclareOk",)
        )
        if event is None or event.name != "Queue.DeclareOk":
            return None
        return int(event.fields["message_count"])

    def drain(self, queue: str) -> list[tuple[bytes, bytes, bool]]:
        messages = []
        while True:
            event = self.request(
                commands.Basic.Get(queue=queue, no_ack=True), ("Basic.GetOk", "Basic.GetEmpty")
            )
            if event is None or event.name != "Basic.GetOk":
                return messages
            messages.append((event.body, event.properties, bool(event.fields["redelivered"])))

    def close(self) -> None:
        self.run.finish()


def broker_state(run: Run, names: list[str]) -> dict[str, list[tuple[bytes, bytes, bool]] | None]:
    """The messages in each queue, drained straight from the broker once counts are still."""
    admin = Admin()
    try:
        counts: dict[str, int | None] = {}
        for _ in range(40):
            now = {name: admin.count(run.name(name)) for name in names}
            if now == counts:
                break
            counts = now
            time.sleep(0.05)
        return {
            name: None if counts.get(name) is None else admin.drain(run.name(name))
            for name in names
        }
    finally:
        admin.close()


def cleanup(prefix: str, queues: list[str], exchanges: list[str]) -> None:
    """Remove what a run made (runs share one broker)."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(*BROKER))
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                channel = conn.channel()
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    if kind == "queue":
                        channel.queue_delete(
                            f"{prefix}-{name}" if not name.startswith("amq.") else name
                        )
                    else:
                        channel.exchange_delete(f"{prefix}-{name}")
                with contextlib.suppress(Exception):
                    channel.close()
    finally:
        conn.close()
