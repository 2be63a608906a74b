"""Issue 4, limits and timeouts: each one configured small, hit by a real client, and answered
with a clear AMQP close (never a hang), counted where the README says so."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from pamqp import commands, frame

from tests.support.broker import Names
from tests.support.pika_client import close_reason, get_all
from tests.support.proxy import ProxyProcess
from tests.support.proxy_http import metric_sample
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory
from tests.support.util import wait_for

pytestmark = pytest.mark.usefixtures("require_proxy")


def wait_metric(p: ProxyProcess, value: float, name: str, **labels: str) -> None:
    wait_for(
        lambda: metric_sample(p.http_port, name, **labels) == value,
        5,
        what=f"{name}{labels} == {value}",
    )


# --------------------------------------------------------------------------- handshake timeout


def drop_times(clients: dict[str, RawClient], timeout: float = 10.0) -> dict[str, float]:
    """When (time.monotonic()) the proxy closed each client's socket; nothing but what
    its handshake so far asked for may arrive before."""
    dropped: dict[str, float] = {}

    def watch(name: str, c: RawClient) -> None:
        c.sock.settimeout(timeout)
        with contextlib.suppress(ConnectionResetError):
            while c.sock.recv(65536):
                pass
        dropped[name] = time.monotonic()

    threads = [threading.Thread(target=watch, args=item) for item in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1)
    return dropped


def test_client_handshake_timeout_drops_silent_and_stalled_clients(
    proxy_factory: ProxyFactory,
) -> None:
    p = proxy_factory("--client-handshake-timeout", "1")
    assert isinstance(p, ProxyProcess)
    started: dict[str, float] = {}
    clients: dict[str, RawClient] = {}

    def connect(name: str) -> RawClient:
        started[name] = time.monotonic()
        clients[name] = RawClient(p.host, p.port)
        return clients[name]

    connect("silent")  # connects, says nothing
    c = connect("after the protocol header")
    c.send_raw(b"AMQP\x00\x00\x09\x01")
    assert isinstance(c.read_method()[1], commands.Connection.Start)
    c = connect("after StartOk")  # then no TuneOk
    c.send_raw(b"AMQP\x00\x00\x09\x01")
    c.read_method()
    c.send(commands.Connection.StartOk({}, "PLAIN", "\0guest\0guest"))
    assert isinstance(c.read_method()[1], commands.Connection.Tune)
    in_time = RawClient(p.host, p.port)  # completes the handshake: stays, however idle
    assert "open_ok" in in_time.handshake()
    dropped = drop_times(clients)
    for name, c in clients.items():
        # 1 s after its connect, checked twice a second
        assert 1.0 <= dropped[name] - started[name] < 2.0, (name, dropped[name] - started[name])
        c.close()
    time.sleep(0.5)
    in_time.send(commands.Channel.Open(), 1)
    assert isinstance(in_time.read_method()[1], commands.Channel.OpenOk)
    in_time.close()
    p.wait_log(r"disconnected during handshake: handshake not completed within 1 s")
    wait_metric(p, 3, "amqproxy_client_disconnects_total", reason="handshake_timeout")


# --------------------------------------------------------------------------- upstream timeouts


class SilentBroker:
    """A TCP listener on loopback that accepts connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class FullBacklog:
    """A loopback listener that never accepts and whose accept queue is full, so that new
    SYNs are dropped and a connect hangs (as towards a blackholed broker)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(8):
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect(("127.0.0.1", self.port))
            except TimeoutError:
                s.close()
                return  # the queue is full: this connect hung
            self.fillers.append(s)
        raise AssertionError("could not fill the accept queue of a listen(0) socket")

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


@contextlib.contextmanager
def blackhole(kind: str) -> Iterator[int]:
    target = SilentBroker() if kind == "accepts, never answers" else FullBacklog()
    try:
        yield target.port
    finally:
        target.close()


@pytest.mark.parametrize("kind", ["accepts, never answers", "never accepts"])
def test_upstream_connect_timeout_gives_clients_320_in_time(
    proxy_factory: ProxyFactory, kind: str
) -> None:
    with blackhole(kind) as port:
        upstream = f"amqp://127.0.0.1:{port}"
        p = proxy_factory("--upstream-connect-timeout", "1", upstream=upstream, upstream_port=port)
        assert isinstance(p, ProxyProcess)
        text = f"CONNECTION_FORCED - upstream {upstream} did not answer within 1 s"
        clients = [RawClient(p.host, p.port, timeout=10) for _ in range(3)]
        for c in clients:
            c.send_raw(b"AMQP\x00\x00\x09\x01")
            c.read_method()
        # the login is put to the broker at StartOk: all three wait for the same attempt
        started = time.monotonic()
        for c in clients:
            c.send(commands.Connection.StartOk({}, "PLAIN", "\0guest\0guest"))
        for c in clients:
            tune = c.read_method()[1]
            assert 0.8 <= time.monotonic() - started < 2.0
            c.send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        # ... and since it was no refusal of the login, they learn why at Connection.Open
        for c in clients:
            c.send(commands.Connection.Open("/"))
        for c in clients:
            ch, close = c.read_method()
            elapsed = time.monotonic() - started
            assert (ch, type(close)) == (0, commands.Connection.Close), close
            assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
                320,
                text,
                10,
                40,
            )
            assert 0.8 <= elapsed < 2.0, elapsed
            c.send(commands.Connection.CloseOk())
            c.close()
        # pika fails at connect time too, with the same reason, within the timeout
        started = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
            p.connect().close()
        assert time.monotonic() - started < 2.5
        assert close_reason(info.value) == (320, text)
        p.wait_log(rf"upstream {upstream} for user='guest': did not answer within 1 s")
        wait_metric(p, 2, "amqproxy_upstream_errors_total", reason="timeout")


# --------------------------------------------------------------------------- limits


def test_max_client_connections_refuses_the_third_with_530(proxy_factory: ProxyFactory) -> None:
    p = proxy_factory("--max-client-connections", "2")
    assert isinstance(p, ProxyProcess)
    text = "NOT_ALLOWED - connection limit (2 per worker) of amqproxy-mp is reached"
    first, second = p.connect(), p.connect()
    with RawClient(p.host, p.port) as third:
        res = third.handshake()  # Start and Tune come, then Open is refused
        assert "open_ok" not in res
        close = res["close"]
        assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
            530,
            text,
            10,
            40,
        )
        third.send(commands.Connection.CloseOk())
        assert third.read_until_closed() == b""
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        p.connect().close()
    assert close_reason(info.value) == (530, text)
    # the two connected clients did not notice
    for conn in (first, second):
        ch = conn.channel()
        ch.queue_declare("", exclusive=True)
    p.wait_log(r"refused: max_client_connections \(2\) reached")
    wait_metric(p, 2, "amqproxy_client_disconnects_total", reason="connection_limit")
    # once one leaves, a new client is served
    first.close()
    wait_for(
        lambda: metric_sample(p.http_port, "amqproxy_client_connections") == 1,
        5,
        what="one client left",
    )
    third = p.connect()
    third.channel().queue_declare("", exclusive=True)
    third.close()
    second.close()


def test_max_upstream_connections_and_channels_506(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("--max-upstream-connections", "1", "--max-upstream-channels", "2", "-t", "60")
    assert isinstance(p, ProxyProcess)
    text = (
        "RESOURCE_ERROR - all 1 upstream connections of this pool are full "
        "(max_upstream_connections)"
    )
    q = names.queue("limits")
    a = p.connect()
    a1, a2 = a.channel(), a.channel()
    a1.queue_declare(q)
    ports = p.upstream_local_ports()
    assert len(ports) == 1
    # another client's channel finds no room: its connection is closed with 506
    with RawClient(p.host, p.port) as b:
        assert "open_ok" in b.handshake()
        b.send(commands.Channel.Open(), 1)
        ch, close = b.read_method()
        assert (ch, type(close)) == (0, commands.Connection.Close), close
        assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
            506,
            text,
            20,
            10,
        )
        b.send(commands.Connection.CloseOk())
    b2 = p.connect()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        b2.channel()
    assert (info.value.reply_code, info.value.reply_text) == (506, text)
    # ... and the client holding the channels goes on
    a2.basic_publish("", q, b"still served")
    wait_for(lambda: [m for _, _, m in get_all(a1, q)] == [b"still served"], 5, what="a works")
    assert p.upstream_local_ports() == ports
    # a channel given back makes room for the next client
    a2.close()
    c = p.connect()
    c.channel().basic_publish("", q, b"from c")
    wait_for(lambda: [m for _, _, m in get_all(a1, q)] == [b"from c"], 5, what="c works")
    assert p.upstream_local_ports() == ports
    c.close()
    a.close()


def test_max_message_size_406_on_the_channel_connection_stays(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("--max-message-size", "1000")
    text = "PRECONDITION_FAILED - message size 1001 is larger than configured max size 1000"
    q = names.queue("maxsize")
    conn = p.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"x" * 1000)  # exactly the limit: confirmed
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.basic_publish("", q, b"y" * 1001)
    assert (info.value.reply_code, info.value.reply_text) == (406, text)
    # the connection stays usable: another channel publishes and gets
    ch2 = conn.channel()
    ch2.basic_publish("", q, b"z" * 10)
    got: list[bytes] = []
    wait_for(
        lambda: got.extend(m for _, _, m in get_all(ch2, q)) or len(got) == 2,
        5,
        what="two messages",
    )
    assert got == [b"x" * 1000, b"z" * 10]
    # raw: the Channel.Close names Basic.Publish, and frames of a larger body split
    # over several body frames are refused as soon as the header announces the size
    with RawClient(p.host, p.port) as c:
        assert "open_ok" in c.handshake(frame_max=4096)
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        c.publish(1, "", q, b"w" * 20000, frame_max=4096)
        ch_number, close = c.read_method()
        assert ch_number == 1 and isinstance(close, commands.Channel.Close), close
        assert (close.reply_code, close.class_id, close.method_id) == (406, 60, 40)
        assert close.reply_text == (
            "PRECONDITION_FAILED - message size 20000 is larger than configured max size 1000"
        )
        c.send(commands.Channel.CloseOk(), 1)
        c.send(commands.Channel.Open(), 1)
        assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
        c.publish(1, "", q, b"v" * 1000, frame_max=4096)
        got.clear()
        wait_for(
            lambda: got.extend(m for _, _, m in get_all(ch2, q)) or got == [b"v" * 1000],
            5,
            what="the message of the raw client's new channel",
        )
    conn.close()


def test_upstream_max_lifetime_retires_the_connection(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p = proxy_factory("--upstream-max-lifetime", "2", "-t", "60")
    assert isinstance(p, ProxyProcess)
    q = names.queue("lifetime")
    a = p.connect()
    a_old = a.channel()
    a_old.queue_declare(q)
    (old,) = p.upstream_local_ports()
    p.wait_log(r"reached its max lifetime \(2 s\): retiring it", timeout=5)
    # the old connection keeps its clients, but takes no new ones
    a_old.basic_publish("", q, b"on the old connection")
    b = p.connect()  # its login is checked on a new connection too
    b.channel().basic_publish("", q, b"from b")
    ports = p.upstream_local_ports()
    assert len(ports) == 2 and old in ports, ports
    (new,) = ports - {old}
    # a's further channels stay with its first one, where its exclusive queues would be
    a_new = a.channel()
    a_new.basic_publish("", q, b"on a's new channel")
    assert p.upstream_local_ports() == {old, new}
    a_old.close()
    got: list[bytes] = []
    wait_for(
        lambda: (
            got.extend(m for _, _, m in get_all(a_new, q))
            or sorted(got) == [b"from b", b"on a's new channel", b"on the old connection"]
        ),
        5,
        what="all three messages",
    )
    # when its last client leaves, the old connection goes
    a.close()
    wait_for(lambda: p.upstream_local_ports() == {new}, 5, what="the old connection closed")
    p.wait_log(r"closed: max lifetime of 2 s reached")
    b.close()


def test_a_flood_of_pipelined_qos_costs_its_sender_linear_work(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    """100 000 Basic.Qos in one write, each changing the prefetch: every one is answered and
    the worker stays up (a scan of the requests under way per Qos made this quadratic: the
    worker stopped beating and was killed, with every client on it)."""
    p = proxy_factory("-t", "60", "--worker-timeout", "10", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    pids = p.pids()
    count = 100_000
    flood = b"".join(
        frame.marshal(commands.Basic.Qos(prefetch_count=1 + (i & 1)), 1) for i in range(count)
    )
    with RawClient(p.host, p.port, timeout=60) as c:
        assert "open_ok" in c.handshake()
        c.send(commands.Channel.Open(), 1)
        c.read_method()
        sender = threading.Thread(target=c.send_raw, args=(flood,), daemon=True)
        sender.start()
        answered = sum(isinstance(c.read_method()[1], commands.Basic.QosOk) for _ in range(count))
        sender.join(60)
    assert answered == count
    assert p.pids() == pids
