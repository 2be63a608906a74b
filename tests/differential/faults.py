"""Fault mode: programs run through a proxy while the harness breaks what is under it.

The broker cannot be the oracle here (directly, the same faults would hit other things), so
the oracle is weaker, but strict:

- every message a client got a positive answer for (a publisher confirm, a Tx.CommitOk, the
  CloseOk of its channel or connection after it) is in the broker, at least once, unless the
  broker itself refused it (a Basic.Nack);
- every client that lost a message was told so: a Channel.Close or Connection.Close from the
  server, or its socket closed, after the publish (or it dropped its socket itself);
- while only upstream connections of one vhost are killed, the clients of the other vhost
  (on other upstream connections) see nothing at all.

The faults, in turn, each for a third of the time: `rabbitmqctl close_connection` of the
proxy's upstream connections in vhost "/" (clients in the second vhost must not notice),
SIGKILL of a worker (the master starts another), and stalls of every upstream connection,
which go through a relay that stops forwarding for a while (longer than the proxy's upstream
heartbeat allows, sometimes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import selectors
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pika
from pamqp import commands

from .program import CloseChannel, Connect, Disconnect, OpenChannel
from .runner import BROKER, Run
from .wire import Event, method_frame

OTHER_VHOST = "differential-faults"
QUEUES = ("f0", "f1")
SENT = "client sent Basic.Publish"
DROPPED = "client dropped its socket"
#: what tells a client that something of its may be lost
TOLD = ("Channel.Close", "Connection.Close", "socket closed", "connect failed")


# --- the relay under the proxy's upstream connections ---------------------------------------


class Relay:
    """A TCP relay to the broker that can stop forwarding (both ways) for a while."""

    def __init__(self, target: tuple[str, int] = BROKER) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.stalled_until = 0.0
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.peers: dict[socket.socket, socket.socket] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def broker_side_ports(self) -> set[int]:
        """The local ports of the relay's connections to the broker (the broker's peer ports
        for the proxy's upstream connections)."""
        ports = set()
        for sock in list(self.peers):
            with contextlib.suppress(OSError):
                if sock.getpeername() == self.target:
                    ports.add(sock.getsockname()[1])
        return ports

    def stall(self, seconds: float) -> None:
        self.stalled_until = time.monotonic() + seconds

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for sock in list(self.peers):
            with contextlib.suppress(OSError):
                sock.close()
        self.listener.close()

    def _loop(self) -> None:
        while not self.stopping:
            if time.monotonic() < self.stalled_until:
                time.sleep(0.05)
                continue
            for key, _ in self.selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                else:
                    self._forward(sock)

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            client, _ = self.listener.accept()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                return
            for a, b in ((client, upstream), (upstream, client)):
                a.setblocking(True)
                self.peers[a] = b
                self.selector.register(a, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        peer = self.peers.get(sock)
        try:
            data = sock.recv(262144)
            if data and peer is not None:
                peer.sendall(data)
                return
        except OSError:
            pass
        for end in (sock, peer):
            if end is not None and end in self.peers:
                self.selector.unregister(end)
                del self.peers[end]
                end.close()


# --- programs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """A publish to one of the run's queues, with a body that names it."""

    client: int
    channel: int
    queue: str

    def run(self, run: Run) -> None:
        client = run.client(self.client)
        if client.wire is None or client.wire.eof or not client.connected:
            return  # (a library publishes on an open connection only)
        body = f"{run.prefix}:{self.client}:{len(client.wire.log)}:{uuid.uuid4().hex[:6]}"
        payload = body.encode()
        data = method_frame(
            self.channel,
            commands.Basic.Publish(exchange="", routing_key=run.name(self.queue)),
        )
        props = (60).to_bytes(2, "big") + b"\x00\x00" + len(payload).to_bytes(8, "big") + b"\0\0"
        data += b"\x02" + self.channel.to_bytes(2, "big") + len(props).to_bytes(4, "big")
        data += props + b"\xce"
        data += b"\x03" + self.channel.to_bytes(2, "big") + len(payload).to_bytes(4, "big")
        data += payload + b"\xce"
        client.wire.record(self.channel, Event(SENT, {"body": payload}))
        run.send(self.client, data)


@dataclass(frozen=True)
class Mode:
    """confirm.select or tx.select on a channel; tx.commit."""

    client: int
    channel: int
    method: str

    def run(self, run: Run) -> None:
        frames = {
            "confirm": (commands.Confirm.Select(), "Confirm.SelectOk"),
            "tx": (commands.Tx.Select(), "Tx.SelectOk"),
            "commit": (commands.Tx.Commit(), "Tx.CommitOk"),
        }
        method, reply = frames[self.method]
        run.send(self.client, method_frame(self.channel, method))
        run.wait(self.client, self.channel, (reply,), timeout=15)


@dataclass(frozen=True)
class Drop:
    client: int

    def run(self, run: Run) -> None:
        wire = run.client(self.client).wire
        if wire is not None:
            wire.record(0, Event(DROPPED))
        Disconnect(self.client, abrupt=True).run(run)


def fault_program(seed: int, length: int = 40) -> list[object]:
    """Clients of both vhosts that connect, publish in plain, confirm and tx channels, commit,
    close channels, disconnect cleanly or not, and reconnect."""
    rng = random.Random(seed)
    steps: list[object] = []
    clients = rng.randint(2, 5)
    vhost = {c: "/" if c % 2 == 0 else OTHER_VHOST for c in range(clients)}
    channels: dict[int, dict[int, str]] = {}
    while len(steps) < length:
        c = rng.randrange(clients)
        if c not in channels:
            steps.append(Connect(c, rng.choice(["PLAIN", "AMQPLAIN"]), vhost=vhost[c]))
            channels[c] = {}
            continue
        open_ = channels[c]
        roll = rng.random()
        if not open_ or (roll < 0.1 and len(open_) < 3):
            n = min(set(range(1, 4)) - set(open_))
            steps.append(OpenChannel(c, n))
            mode = rng.choice(["plain", "plain", "confirm", "tx"])
            if mode != "plain":
                steps.append(Mode(c, n, mode))
            open_[n] = mode
            continue
        n = rng.choice(sorted(open_))
        if roll < 0.15:
            steps.append(CloseChannel(c, n))
            del open_[n]
        elif roll < 0.2:
            steps.append(Disconnect(c) if rng.random() < 0.7 else Drop(c))
            del channels[c]
        elif roll < 0.3 and open_[n] == "tx":
            steps.append(Mode(c, n, "commit"))
        else:
            steps.extend(Send(c, n, rng.choice(QUEUES)) for _ in range(rng.randint(1, 4)))
    return steps


# --- the oracle --------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the clients of one run were promised, and what they were told."""

    promised: set[bytes] = field(default_factory=set)
    refused: set[bytes] = field(default_factory=set)
    #: sent in a transaction: in the broker only once committed (then promised)
    transactional: set[bytes] = field(default_factory=set)
    #: body -> was its client told (or did it drop its socket) after it
    told: dict[bytes, bool] = field(default_factory=dict)
    #: server closes seen by clients of the other vhost
    other_vhost_closes: list[str] = field(default_factory=list)


def read_ledger(run: Run, other_vhost_clients: set[int]) -> Ledger:
    ledger = Ledger()
    for index, client in run.clients.items():
        for wire in client.wires:
            _read_wire(wire.log, ledger, index in other_vhost_clients, index)
    return ledger


def _read_wire(log: list[tuple[int, Event]], ledger: Ledger, other_vhost: bool, who: int) -> None:
    confirm_seq: dict[int, int] = {}
    unconfirmed: dict[int, dict[int, bytes]] = {}
    tx: dict[int, list[bytes]] = {}
    by_channel: dict[int, list[bytes]] = {}
    everything: list[bytes] = []
    ended = False  # the client's Connection.Close was answered: the socket's end is normal
    for channel, event in log:
        name = event.name
        if name == SENT:
            body = event.fields["body"]
            everything.append(body)
            ledger.told.setdefault(body, False)
            if channel in confirm_seq:
                confirm_seq[channel] += 1
                unconfirmed[channel][confirm_seq[channel]] = body
            elif channel in tx:
                tx[channel].append(body)
                ledger.transactional.add(body)
            else:
                by_channel.setdefault(channel, []).append(body)
        elif name == "Channel.OpenOk":  # a new channel with this number: plain again
            confirm_seq.pop(channel, None)
            unconfirmed.pop(channel, None)
            tx.pop(channel, None)
        elif name == "Confirm.SelectOk":
            confirm_seq[channel] = 0
            unconfirmed[channel] = {}
        elif name == "Tx.SelectOk":
            tx[channel] = []
        elif name in ("Basic.Ack", "Basic.Nack") and channel in unconfirmed:
            tag, multiple = int(event.fields["delivery_tag"]), event.fields["multiple"]
            pending = unconfirmed[channel]
            for seq in [s for s in pending if s == tag or (multiple and s <= tag)]:
                (ledger.promised if name == "Basic.Ack" else ledger.refused).add(pending.pop(seq))
        elif name == "Tx.CommitOk":
            ledger.promised.update(tx.get(channel, []))
            tx[channel] = []
        elif name == "Channel.CloseOk":
            ledger.promised.update(by_channel.pop(channel, []))
            tx.pop(channel, None)  # uncommitted: discarded, as the client asked
        elif name == "Connection.CloseOk":
            for bodies in by_channel.values():
                ledger.promised.update(bodies)
            by_channel.clear()
            ended = True
        elif (name in TOLD and not ended) or name == DROPPED:
            for body in everything:
                ledger.told[body] = True
            if other_vhost and name != DROPPED:
                ledger.other_vhost_closes.append(f"client {who}: {event!r}")


def _brief(channel: int, event: Event) -> str:
    code = event.fields.get("reply_code")
    return f"{channel}:{event.name}" + (f"({code})" if code else "")


def broker_bodies(prefix: str) -> dict[bytes, int]:
    """Every message in the run's queues, in both vhosts, drained."""
    counts: dict[bytes, int] = {}
    for vhost in ("/", OTHER_VHOST):
        conn = pika.BlockingConnection(pika.ConnectionParameters(*BROKER, virtual_host=vhost))
        ch = conn.channel()
        for queue in QUEUES:
            name = f"{prefix}-{queue}"
            while True:
                method, _, body = ch.basic_get(name, auto_ack=True)
                if method is None:
                    break
                counts[body] = counts.get(body, 0) + 1
            ch.queue_delete(name)
        conn.close()
    return counts


def declare_queues(prefix: str) -> None:
    for vhost in ("/", OTHER_VHOST):
        conn = pika.BlockingConnection(pika.ConnectionParameters(*BROKER, virtual_host=vhost))
        ch = conn.channel()
        for queue in QUEUES:
            ch.queue_declare(f"{prefix}-{queue}")
        conn.close()


@dataclass
class Outcome:
    seed: int
    steps: int
    promised: int
    violations: list[str]


def run_fault_program(seed: int, host: str, port: int, neighbours_checked: bool) -> Outcome:
    prefix = f"df{seed}-{uuid.uuid4().hex[:6]}"
    declare_queues(prefix)
    steps = fault_program(seed)
    run = Run(host, port, prefix)
    other = {s.client for s in steps if isinstance(s, Connect) and s.vhost == OTHER_VHOST}
    try:
        for index, step in enumerate(steps):
            run.at_step(index)
            step.run(run)  # type: ignore[attr-defined]
            run.quiet()
        run.finish()
    finally:
        with contextlib.suppress(Exception):
            run.selector.close()
    ledger = read_ledger(run, other)
    stored = broker_bodies(prefix)
    violations = [
        f"seed {seed}: promised, not in the broker: {body!r}"
        for body in sorted(ledger.promised - ledger.refused)
        if body not in stored
    ]
    violations += [
        f"seed {seed}: lost without being told: {body!r}"
        for body, told in sorted(ledger.told.items())
        if not told
        and body not in stored
        and body not in ledger.refused
        and body not in ledger.transactional
    ]
    if violations:  # what the clients saw, to explain it
        for index, client in sorted(run.clients.items()):
            for number, wire in enumerate(client.wires):
                seen = ", ".join(_brief(ch, e) for ch, e in wire.log if e.name != SENT)
                violations.append(f"seed {seed}:   client {index} connection {number + 1}: {seen}")
    if neighbours_checked:
        violations += [
            f"seed {seed}: other vhost disturbed: {c}" for c in ledger.other_vhost_closes
        ]
    return Outcome(seed, len(steps), len(ledger.promised), violations)


# --- the faults ---------------------------------------------------------------------------


class Faults:
    def __init__(self, proxy: object, relay: Relay, kind: str, rng: random.Random) -> None:
        self.proxy, self.relay, self.kind, self.rng = proxy, relay, kind, rng
        self.done = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from tests.support.broker import rabbitmqctl

        while not self.done.wait(self.rng.uniform(0.5, 2.5)):
            if self.kind == "close_connection":
                out = rabbitmqctl(
                    "-q", "list_connections", "--no-table-headers", "pid", "vhost", "peer_port",
                    check=False,
                )  # fmt: skip
                relayed = self.relay.broker_side_ports()
                victims = [
                    line.split("\t")[0].strip()
                    for line in out.splitlines()
                    if line.count("\t") == 2
                    and line.split("\t")[1].strip() == "/"
                    and int(line.split("\t")[2]) in relayed
                ]
                if victims:
                    rabbitmqctl("close_connection", self.rng.choice(victims), "fault", check=False)
                    self.count += 1
            elif self.kind == "kill_worker":
                pids = self.proxy.pids()[1:]  # type: ignore[attr-defined]
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.count += 1
            else:
                # (up to 2 heartbeats the proxy waits; beyond, it gives the connection up)
                seconds = self.rng.choice([0.5, 1.0, 2.0, 5.0, 6.0])
                self.relay.stall(seconds)
                self.count += 1
                self.done.wait(seconds)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


def ensure_other_vhost() -> None:
    from tests.support.broker import rabbitmqctl

    rabbitmqctl("add_vhost", OTHER_VHOST, check=False)
    rabbitmqctl("set_permissions", "-p", OTHER_VHOST, "guest", ".*", ".*", ".*")


def run_faults(minutes: float, threads: int, first_seed: int, logdir: Path) -> list[Outcome]:
    """A third of the time for each kind of fault, programs running all along."""
    from tests.support.proxy import ProxyProcess

    ensure_other_vhost()
    relay = Relay()
    proxy = ProxyProcess(
        logdir / "proxy-faults.log",
        ("--workers", "2", "-t", "60", "--upstream-heartbeat", "2"),
        upstream=f"amqp://127.0.0.1:{relay.port}",
    )
    proxy.start()
    outcomes: list[Outcome] = []
    seeds = iter(range(first_seed, first_seed + 10**9))
    try:
        for kind in ("close_connection", "kill_worker", "stall"):
            faults = Faults(proxy, relay, kind, random.Random(first_seed))
            faults.thread.start()
            deadline = time.monotonic() + minutes * 60 / 3
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                running: set[concurrent.futures.Future[Outcome]] = set()
                while time.monotonic() < deadline or running:
                    while time.monotonic() < deadline and len(running) < threads:
                        running.add(
                            pool.submit(
                                run_fault_program, next(seeds), proxy.host, proxy.port,
                                kind == "close_connection",
                            )
                        )  # fmt: skip
                    done, running = concurrent.futures.wait(
                        running, timeout=1, return_when="FIRST_COMPLETED"
                    )
                    for future in done:
                        outcome = future.result()
                        outcomes.append(outcome)
                        for violation in outcome.violations:
                            print(violation, flush=True)
            faults.stop()
            print(
                f"{kind}: {faults.count} faults; so far {len(outcomes)} programs, "
                f"{sum(o.steps for o in outcomes)} steps, {sum(o.promised for o in outcomes)} "
                f"promised messages, {sum(len(o.violations) for o in outcomes)} violations",
                flush=True,
            )
    finally:
        proxy.stop()
        relay.stop()
    return outcomes


def main(args: argparse.Namespace) -> int:
    logdir = Path(tempfile.mkdtemp(prefix="differential-faults-"))
    minutes = args.minutes or 3.0
    first = int(args.seeds.partition("-")[0])
    outcomes = run_faults(minutes, args.threads, first, logdir)
    violations = sum(len(o.violations) for o in outcomes)
    print(
        f"fault mode: {len(outcomes)} programs, {sum(o.steps for o in outcomes)} steps, "
        f"{sum(o.promised for o in outcomes)} promised messages, {violations} violations, "
        f"{minutes:g} min (proxy log in {logdir})"
    )
    return 1 if violations else 0
