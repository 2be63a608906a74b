"""Programs: K clients' AMQP operations in one global order (grammar.py generates them).

A program is a list of steps. Each step is one client doing one thing (a method and the
wait for its reply, a pipelined burst, a connect or a disconnect); any sub-list of a program
is a program too (a step whose channel or connection is missing meets the same error on
both targets), which is what shrinking relies on.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands

from .runner import Run
from .wire import Event, method_frame

QUEUES = ("q0", "q1", "q2")
EXCLUSIVE_QUEUES = ("e0", "e1")
AUTO_DELETE_QUEUES = ("a0",)
EXCHANGES = ("x0", "x1")
MISSING_QUEUE, MISSING_EXCHANGE = "nq", "nx"
EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
PHP_CLIENT = 99


# --- field tables: every type RabbitMQ reads, with edge values --------------------------------


def _long(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _table(*entries: tuple[bytes, bytes]) -> bytes:
    return _long(b"".join(bytes([len(k)]) + k + v for k, v in entries))


def _nested(depth: int) -> bytes:
    value = b"F" + _long(b"")
    for _ in range(depth):
        value = b"F" + _long(b"\x00" + value)
    return value


EVERY_TYPE = _table(
    (b"t", b"t\x01"), (b"b", b"b\x80"), (b"B", b"B\xff"), (b"s", b"s\x80\x00"),
    (b"u", b"u\xff\xff"), (b"I", b"I\x80\x00\x00\x00"), (b"i", b"i\xff\xff\xff\xff"),
    (b"l", b"l" + struct.pack(">q", -(2**63))), (b"L", b"L" + struct.pack(">q", 2**63 - 1)),
    (b"f", b"f" + struct.pack(">f", -0.0)), (b"d", b"d" + struct.pack(">d", 1e308)),
    (b"D", b"D\x02" + struct.pack(">I", 12345)), (b"T", b"T" + struct.pack(">Q", 2**64 - 1)),
    (b"V", b"V"), (b"S", b"S" + _long("é\x00".encode())), (b"S0", b"S" + _long(b"")),
    (b"x", b"x" + _long(b"\x00\xce\xff")), (b"A", b"A" + _long(b"t\x01V" + b"S" + _long(b"a"))),
    (b"A0", b"A" + _long(b"")), (b"F0", b"F" + _long(b"")), (b"deep", _nested(300)),
    (b"k" * 255, b"V"),
)  # fmt: skip
#: header tables a publish may carry (raw, with their length); the last ones RabbitMQ refuses
HEADERS = {
    "none": b"",
    "simple": _table((b"k", b"S" + _long(b"v"))),
    "every type": EVERY_TYPE,
    "NaN": _table((b"k", b"d" + struct.pack(">d", float("nan")))),
}
#: queue arguments
ARGUMENTS = {
    "none": _table(),
    "max-length": _table((b"x-max-length", b"l" + struct.pack(">q", 1000))),
    "ttl": _table((b"x-message-ttl", b"I" + struct.pack(">i", 60000))),
    "every type": EVERY_TYPE,
}
BODIES = {"empty": 0, "small": 20, "split": 5000, "frame_max+": 140_000}


def body_of(size: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))


# --- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    client: int

    def run(self, run: Run) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if k != "client" and v not in ("", None)
        )
        return f"client {self.client}: {type(self).__name__}({fields})"

    #: may cause deliveries, returns or closes that arrive after its reply
    lingers = False


@dataclass(frozen=True)
class Connect(Step):
    mechanism: str = "PLAIN"
    login: str = "ok"  # ok, bad password, bad vhost
    frame_max: int = 131072
    vhost: str = "/"

    def run(self, run: Run) -> None:
        wire = run.connect(self.client)
        wire.send(b"AMQP\x00\x00\x09\x01")
        if run.wait(self.client, 0, ("Connection.Start",)) is None:
            return
        password = "wrong" if self.login == "bad password" else "guest"
        if self.mechanism == "PLAIN":
            response = f"\0guest\0{password}"
        else:
            entries = [(b"LOGIN", b"guest"), (b"PASSWORD", password.encode())]
            response = b"".join(bytes([len(k)]) + k + b"S" + _long(v) for k, v in entries).decode()
        capabilities = {
            "authentication_failure_close": True, "connection.blocked": True,
            "consumer_cancel_notify": True, "basic.nack": True, "publisher_confirms": True,
        }  # fmt: skip
        start_ok = commands.Connection.StartOk(
            {"product": "differential", "capabilities": capabilities}, self.mechanism, response
        )
        wire.send(method_frame(0, start_ok))
        tune = run.wait(self.client, 0, ("Connection.Tune",))
        if tune is None or tune.name != "Connection.Tune":
            return
        fmax = min(self.frame_max, int(tune.fields["frame_max"]) or self.frame_max)
        run.client(self.client).frame_max = fmax
        wire.send(
            method_frame(0, commands.Connection.TuneOk(int(tune.fields["channel_max"]), fmax, 0))
        )
        vhost = self.vhost if self.login != "bad vhost" else f"{run.prefix}-nowhere"
        wire.send(method_frame(0, commands.Connection.Open(vhost)))
        opened = run.wait(self.client, 0, ("Connection.OpenOk",))
        run.client(self.client).connected = (
            opened is not None and opened.name == "Connection.OpenOk"
        )


@dataclass(frozen=True)
class Disconnect(Step):
    """Connection.Close and its CloseOk (abrupt: the socket closed without a word)."""

    abrupt: bool = False

    def run(self, run: Run) -> None:
        client = run.client(self.client)
        if client.wire is None:
            return
        if self.abrupt or not client.connected:
            # (a library whose connection the server closed only closes its socket)
            run.drop(self.client)
            return
        client.closing = True
        client.wire.record(0, CLIENT_CLOSED)
        run.send(self.client, method_frame(0, commands.Connection.Close(200, "bye", 0, 0)))
        run.wait(self.client, 0, ("Connection.CloseOk",))

    lingers = True


#: Recorded when a client sends Connection.Close: from then on it discards everything but
#: the channels' and the connection's closes (AMQP 0-9-1, 1.4.2.5.2; docs/differences.md).
CLIENT_CLOSED = Event("client sent Connection.Close")


@dataclass(frozen=True)
class OpenChannel(Step):
    channel: int = 1

    def run(self, run: Run) -> None:
        run.send(self.client, method_frame(self.channel, commands.Channel.Open()))
        if run.wait(self.client, self.channel, ("Channel.OpenOk",)):
            run.client(self.client).channels.add(self.channel)


@dataclass(frozen=True)
class CloseChannel(Step):
    channel: int = 1

    def run(self, run: Run) -> None:
        since = run.mark(self.client)
        run.send(self.client, method_frame(self.channel, commands.Channel.Close(200, "bye", 0, 0)))
        # (a broker's Close may cross it: the client confirms it and still waits for its own)
        run.wait(self.client, self.channel, ("Channel.CloseOk",), since=since, close_ends=False)
        run.client(self.client).channels.discard(self.channel)

    lingers = True


@dataclass(frozen=True)
class Call(Step):
    """One synchronous channel method and the wait for its reply."""

    channel: int = 1
    method: str = ""
    args: tuple[Any, ...] = ()

    def build(self, run: Run) -> tuple[bytes, tuple[str, ...]]:
        n, a = run.name, self.args
        m = self.method
        if m == "exchange.declare":  # name, type, passive, durable, auto_delete
            declare = commands.Exchange.Declare(
                exchange=n(a[0]), exchange_type=a[1], passive=a[2], durable=a[3], auto_delete=a[4]
            )
            return method_frame(self.channel, declare), ("Exchange.DeclareOk",)
        if m == "exchange.delete":
            return method_frame(
                self.channel, commands.Exchange.Delete(exchange=n(a[0]), if_unused=a[1])
            ), ("Exchange.DeleteOk",)
        if m == "queue.declare":  # name, passive, exclusive, auto_delete, arguments
            payload = (
                struct.pack(">HHH", 50, 10, 0) + _short(n(a[0]))
                + bytes([a[1] | a[2] << 2 | a[3] << 3]) + ARGUMENTS[a[4]]
            )  # fmt: skip
            return _frame(self.channel, payload), ("Queue.DeclareOk",)
        if m in ("queue.bind", "queue.unbind"):  # queue, exchange, routing key, arguments
            index = 20 if m == "queue.bind" else 50
            flags = b"\x00" if m == "queue.bind" else b""
            payload = (
                struct.pack(">HHH", 50, index, 0) + _short(n(a[0])) + _short(n(a[1]))
                + _short(a[2]) + flags + ARGUMENTS[a[3]]
            )  # fmt: skip
            reply = "Queue.BindOk" if m == "queue.bind" else "Queue.UnbindOk"
            return _frame(self.channel, payload), (reply,)
        if m == "queue.purge":
            return method_frame(self.channel, commands.Queue.Purge(queue=n(a[0]))), (
                "Queue.PurgeOk",
            )
        if m == "queue.delete":
            delete = commands.Queue.Delete(queue=n(a[0]), if_unused=a[1], if_empty=a[2])
            return method_frame(self.channel, delete), ("Queue.DeleteOk",)
        if m == "basic.qos":
            qos = commands.Basic.Qos(prefetch_count=a[0], global_=a[1])
            return method_frame(self.channel, qos), ("Basic.QosOk",)
        if m == "basic.get":
            get = commands.Basic.Get(queue=n(a[0]), no_ack=a[1])
            return method_frame(self.channel, get), ("Basic.GetOk", "Basic.GetEmpty")
        if m == "basic.consume":  # queue, tag, no_ack, exclusive
            consume = commands.Basic.Consume(
                queue=n(a[0]), consumer_tag=a[1], no_ack=a[2], exclusive=a[3]
            )
            return method_frame(self.channel, consume), ("Basic.ConsumeOk",)
        if m == "basic.cancel":
            tags = run.client(self.client).consumer_tags.get(self.channel) or ["no-such-tag"]
            tag = tags[a[0] % len(tags)]
            return method_frame(self.channel, commands.Basic.Cancel(tag)), ("Basic.CancelOk",)
        if m == "basic.recover":
            return method_frame(self.channel, commands.Basic.Recover(requeue=True)), (
                "Basic.RecoverOk",
            )
        if m == "confirm.select":
            return method_frame(self.channel, commands.Confirm.Select()), ("Confirm.SelectOk",)
        if m == "tx.select":
            return method_frame(self.channel, commands.Tx.Select()), ("Tx.SelectOk",)
        if m == "tx.commit":
            return method_frame(self.channel, commands.Tx.Commit()), ("Tx.CommitOk",)
        if m == "tx.rollback":
            return method_frame(self.channel, commands.Tx.Rollback()), ("Tx.RollbackOk",)
        if m == "sync":  # a request with no effect: what came before has been processed
            declare = commands.Exchange.Declare(exchange="amq.direct", passive=True)
            return method_frame(self.channel, declare), ("Exchange.DeclareOk",)
        raise ValueError(m)

    def run(self, run: Run) -> None:
        data, replies = self.build(run)
        run.send(self.client, data)
        run.wait(self.client, self.channel, replies)

    @property
    def lingers(self) -> bool:  # type: ignore[override]
        return self.method in ("basic.consume", "basic.cancel", "basic.recover", "queue.delete")


def _short(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def _frame(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


@dataclass(frozen=True)
class Publish(Step):
    channel: int = 1
    exchange: str = ""
    routing_key: str = ""
    mandatory: bool = False
    headers: str = "none"
    body: str = "small"

    def frames(self, run: Run) -> bytes:
        exchange = run.name(self.exchange)
        routing_key = (
            run.name(self.routing_key) if self.routing_key in QUEUE_LIKE else self.routing_key
        )
        data = method_frame(
            self.channel,
            commands.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=self.mandatory
            ),
        )
        body = body_of(BODIES[self.body], zlib.crc32(self.describe().encode()) & 0xFF)
        table = HEADERS[self.headers]
        flags = 0x2000 if table else 0
        props = struct.pack(">HHQH", 60, 0, len(body), flags | 0x8000) + _short("text/x") + table
        data += struct.pack(">BHI", 2, self.channel, len(props)) + props + b"\xce"
        step = run.client(self.client).frame_max - 8
        for i in range(0, len(body), step):
            chunk = body[i : i + step]
            data += struct.pack(">BHI", 3, self.channel, len(chunk)) + chunk + b"\xce"
        return data

    def run(self, run: Run) -> None:
        run.send(self.client, self.frames(run))

    lingers = True


QUEUE_LIKE = set(QUEUES) | set(EXCLUSIVE_QUEUES) | set(AUTO_DELETE_QUEUES) | {MISSING_QUEUE}


@dataclass(frozen=True)
class Acknowledge(Step):
    """Basic.Ack, Nack or Reject of a delivery this client received on the channel."""

    channel: int = 1
    method: str = "ack"
    which: int | None = -1  # index into the channel's delivery tags; None: tag 0 (all)
    multiple: bool = False
    requeue: bool = True

    def run(self, run: Run) -> None:
        tags = run.client(self.client).delivery_tags.get(self.channel) or [0]
        tag = 0 if self.which is None else tags[self.which % len(tags)]
        if self.method == "ack":
            method: Any = commands.Basic.Ack(tag, self.multiple)
        elif self.method == "nack":
            method = commands.Basic.Nack(tag, self.multiple, self.requeue)
        else:
            method = commands.Basic.Reject(tag, self.requeue)
        run.send(self.client, method_frame(self.channel, method))

    lingers = True


@dataclass(frozen=True)
class Burst(Step):
    """Frames sent in one write, then the waits: what pipelining clients do.

    reuse: a publish to a missing exchange and the close of its channel, a new channel and a
    good publish and its close (the upstream channel of the first is the one the proxy
    would like to give the second). fail-close: a failing publish and the channel's close,
    crossing the broker's Channel.Close. get-close: a Basic.Get and its channel's close (the
    reply, and its message, before the CloseOk).
    """

    kind: str = "reuse"
    channel: int = 5
    other: int = 6
    queue: str = "q0"

    def run(self, run: Run) -> None:
        close = commands.Channel.Close(200, "bye", 0, 0)
        if self.kind == "reuse":
            missing = Publish(self.client, self.channel, MISSING_EXCHANGE, "k", body="small")
            good = Publish(self.client, self.other, "", self.queue, body="small")
            data = (
                method_frame(self.channel, commands.Channel.Open()) + missing.frames(run)
                + method_frame(self.channel, close)
                + method_frame(self.other, commands.Channel.Open()) + good.frames(run)
                + method_frame(self.other, close)
            )  # fmt: skip
            since = run.mark(self.client)
            run.send(self.client, data)
            for channel in (self.channel, self.other):
                self._until_closed(run, channel, since)
        elif self.kind == "get-close":
            get = commands.Basic.Get(queue=run.name(self.queue), no_ack=True)
            since = run.mark(self.client)
            run.send(
                self.client, method_frame(self.channel, get) + method_frame(self.channel, close)
            )
            self._until_closed(run, self.channel, since)
        else:
            missing = Publish(self.client, self.channel, MISSING_EXCHANGE, "k", body="small")
            since = run.mark(self.client)
            run.send(self.client, missing.frames(run) + method_frame(self.channel, close))
            self._until_closed(run, self.channel, since)

    def _until_closed(self, run: Run, channel: int, since: int) -> None:
        """Until the client's own Close on the channel is answered (a broker Close first is
        confirmed by the client, as libraries do)."""
        run.wait(self.client, channel, ("Channel.CloseOk",), since=since, close_ends=False)
        run.client(self.client).channels.discard(channel)

    lingers = True


@dataclass(frozen=True)
class PhpCycles(Step):
    """The PHP-FPM request, `count` times on fresh connections: connect, channel, qos,
    publish, disconnect."""

    count: int = 3
    queue: str = "q0"

    def run(self, run: Run) -> None:
        for i in range(self.count):
            Connect(self.client).run(run)
            if not run.client(self.client).connected:
                return
            OpenChannel(self.client, 1).run(run)
            Call(self.client, 1, "basic.qos", (10, False)).run(run)
            Publish(self.client, 1, "", self.queue, body="small", headers="simple").run(run)
            Disconnect(self.client).run(run)
            del i


# --- programs ---------------------------------------------------------------------------------


@dataclass
class Program:
    seed: int
    steps: list[Step] = field(default_factory=list)

    def queue_names(self) -> list[str]:
        return [*QUEUES, *AUTO_DELETE_QUEUES]

    def exchange_names(self) -> list[str]:
        return list(EXCHANGES)

    def describe(self) -> str:
        return "\n".join(f"{i + 1:3}. {step.describe()}" for i, step in enumerate(self.steps))
