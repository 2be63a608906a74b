"""Shared helpers for the integration suite: the proxy process, RabbitMQ administration,
a raw-socket AMQP client built on pamqp, and small polling utilities.

Everything here talks to a real RabbitMQ on 127.0.0.1:5672 (guest/guest, vhost /).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psutil
from pamqp import commands, frame, header, heartbeat
from pamqp.common import FieldTable

from amqproxy_mp.config import OPTIONS

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROXY_CONNECTION_NAME = "amqproxy-mp"


# --------------------------------------------------------------------------- small utilities


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"itest-{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``what`` and the last value (or exception) on timeout.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except AssertionError as exc:  # a predicate may assert; keep polling
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def amqp_answers(host: str = BROKER_HOST, port: int = BROKER_PORT, timeout: float = 3.0) -> bool:
    """True if something on host:port answers an AMQP 0-9-1 header with Connection.Start."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(AMQP_HEADER)
            data = s.recv(7)
            # frame type 1 (method) on channel 0
            return len(data) >= 3 and data[0] == 1 and data[1:3] == b"\x00\x00"
    except OSError:
        return False


CLOSE_RE = re.compile(r"\((\d{3})\) ['\"](.*)['\"]\s*$", re.S)


def close_reason(exc: BaseException) -> tuple[int, str]:
    """(reply_code, reply_text) of a pika close exception.

    pika raises ConnectionClosedByBroker / ChannelClosedByBroker with (code, text) once the
    connection is open, but wraps a close during connection set-up into
    ProbableAuthenticationError / ProbableAccessDeniedError / AMQPConnectionError whose only
    argument is the repr of the original ConnectionClosedByBroker. Both are handled.
    """
    if isinstance(
        exc, pika.exceptions.ConnectionClosedByBroker | pika.exceptions.ChannelClosedByBroker
    ):
        return int(exc.reply_code), str(exc.reply_text)
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, BaseException):
            with contextlib.suppress(ValueError):
                return close_reason(arg)
        m = CLOSE_RE.search(str(arg))
        if m and "ClosedByBroker" in str(arg):
            return int(m.group(1)), m.group(2)
    raise ValueError(f"no broker close reason in {exc!r}")


# --------------------------------------------------------------------------- rabbitmqctl


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    cmd = ["rabbitmqctl", *args]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", "-n", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res.stdout


def _table(triples: Any) -> dict[str, Any]:
    """Turn rabbitmqctl's JSON field-table encoding ([[key, type, value], ...]) into a dict."""
    out: dict[str, Any] = {}
    if not isinstance(triples, list):
        return out
    for item in triples:
        if isinstance(item, list) and len(item) == 3:
            key, typ, val = item
            out[key] = _table(val) if typ == "table" else val
    return out


def list_connections() -> list[dict[str, Any]]:
    """RabbitMQ's view of all client connections (name, peer_port, user, vhost, channels,
    client_properties as a dict)."""
    out = rabbitmqctl(
        "-q",
        "list_connections",
        "name",
        "peer_port",
        "user",
        "vhost",
        "channels",
        "client_properties",
        "--formatter",
        "json",
    )
    rows = json.loads(out) if out.strip() else []
    for row in rows:
        row["client_properties"] = _table(row.get("client_properties"))
    return rows


def close_broker_connection(peer_port: int, reason: str) -> None:
    """``rabbitmqctl close_connection`` on the connection from ``peer_port``.

    rabbitmqctl wants the connection's pid in its plain-text form (``<rabbit@host.N.M.0>``),
    which only the non-JSON listing prints."""
    out = rabbitmqctl("-q", "list_connections", "--no-table-headers", "peer_port", "pid")
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].strip() == str(peer_port):
            rabbitmqctl("close_connection", parts[1].strip(), reason)
            return
    raise AssertionError(f"no broker connection from peer port {peer_port}:\n{out}")


def memory_high_watermark() -> list[str]:
    """The broker's current vm_memory_high_watermark as ``set_vm_memory_high_watermark``
    arguments (a fraction, or ``absolute BYTES``)."""
    out = rabbitmqctl(
        "-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark().", check=False
    ).strip()
    if m := re.fullmatch(r"\{absolute,\s*(\d+)\}", out):
        return ["absolute", m.group(1)]
    if re.fullmatch(r"[0-9.]+", out) and float(out) > 0:
        return [out]
    return ["0.4"]  # unknown, or left at 0 by an interrupted run: the default


class RabbitAdmin:
    """Creates vhosts and users with unique names and removes them at cleanup()."""

    def __init__(self) -> None:
        self.vhosts: list[str] = []
        self.users: list[str] = []

    def add_vhost(self, prefix: str = "vh") -> str:
        name = unique(prefix)
        rabbitmqctl("add_vhost", name)
        self.vhosts.append(name)
        return name

    def add_user(self, password: str | None = None, prefix: str = "user") -> tuple[str, str]:
        name = unique(prefix)
        password = password or uuid.uuid4().hex
        rabbitmqctl("add_user", name, password)
        self.users.append(name)
        return name, password

    @staticmethod
    def grant(user: str, vhost: str) -> None:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def cleanup(self) -> None:
        for user in self.users:
            rabbitmqctl("delete_user", user, check=False)
        for vhost in self.vhosts:
            rabbitmqctl("delete_vhost", vhost, check=False)
        self.users.clear()
        self.vhosts.clear()


# --------------------------------------------------------------------------- targets


class Target:
    """Where the clients under test connect: a proxy process or (direct mode) RabbitMQ."""

    host = "127.0.0.1"
    port: int
    direct: bool

    def params(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        **kw: Any,
    ) -> pika.ConnectionParameters:
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("blocked_connection_timeout", None)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            **kw,
        )

    def connect(
        self, user: str = "guest", password: str = "guest", vhost: str = "/", **kw: Any
    ) -> pika.BlockingConnection:
        conn = pika.BlockingConnection(self.params(user, password, vhost, **kw))
        self.__dict__.setdefault("_clients", []).append(conn)
        return conn

    def close_clients(self) -> None:
        """Close the pika connections connect() made that a (failed) test left open."""
        for conn in self.__dict__.pop("_clients", []):
            with contextlib.suppress(Exception):
                if conn.is_open:
                    conn.close()

    def log_text(self) -> str:
        return ""

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        from urllib.parse import quote

        return (
            f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/"
            f"{quote(vhost, safe='')}"
        )


class DirectTarget(Target):
    """Direct mode: the "proxy" is RabbitMQ itself (used to prove the tests' assertions)."""

    direct = True

    def __init__(self) -> None:
        self.port = BROKER_PORT


#: Variables that would configure the proxy or talk to a service manager: never inherited.
_CONTROL_ENV = {
    "JOURNAL_STREAM",
    "PROMETHEUS_MULTIPROC_DIR",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
}


def proxy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test runner's environment without anything the proxy reads as configuration."""
    drop = {o.env for o in OPTIONS if o.env} | _CONTROL_ENV
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ProxyProcess(Target):
    """One ``python -m amqproxy_mp`` process in the foreground, stderr captured to a file."""

    direct = False

    def __init__(
        self,
        log_path: Path,
        options: Sequence[str] = (),
        upstream: str | None = None,
        upstream_port: int = BROKER_PORT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.http_port = free_port()
        if "--listen" in options:  # a test that moves the listener connects there
            self.host = options[list(options).index("--listen") + 1]
        self.log_path = log_path
        self.upstream_port = upstream_port
        self.upstream = upstream or f"amqp://{BROKER_HOST}:{BROKER_PORT}"
        self.args = [
            sys.executable,
            "-m",
            "amqproxy_mp",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            # one worker unless a test asks for more: pooling assertions count upstream
            # connections, and each worker has its own pools
            *(() if {"-w", "--workers"} & set(options) else ("--workers", "1")),
            *options,
            self.upstream,
        ]
        # the proxy reads its configuration from the environment too: never inherit any
        self.env = proxy_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- lifecycle

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"# {' '.join(self.args)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=str(REPO_ROOT),
            env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"proxy exited with code {rc} before accepting on port {self.port}:\n"
                    f"{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"proxy did not accept on port {self.port} within {timeout}s:\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # kill the whole session (a master may have forked workers)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return rc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 5.0, flags: int = re.I) -> re.Match[str]:
        rx = re.compile(pattern, flags)
        return wait_for(
            lambda: rx.search(self.log_text()),
            timeout,
            what=f"log line matching {pattern!r} in {self.log_path}",
        )

    # -- upstream connections

    def pids(self) -> list[int]:
        assert self.proc is not None
        try:
            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def upstream_local_ports(self) -> set[int]:
        """Local ports of the proxy's (and its children's) established TCP connections to the
        upstream port, as the kernel sees them."""
        ports: set[int] = set()
        for pid in self.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if (
                    c.status == psutil.CONN_ESTABLISHED
                    and c.raddr
                    and c.raddr.port == self.upstream_port
                ):
                    ports.add(c.laddr.port)
        return ports

    def upstream_connections(self) -> list[dict[str, Any]]:
        """RabbitMQ's connections that come from this proxy's sockets."""
        ports = self.upstream_local_ports()
        return [c for c in list_connections() if c["peer_port"] in ports]

    def wait_upstream_count(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until both the proxy's sockets and RabbitMQ agree on exactly n upstream
        connections; return RabbitMQ's rows."""

        def check() -> list[dict[str, Any]] | None:
            ports = self.upstream_local_ports()
            rows = [c for c in list_connections() if c["peer_port"] in ports]
            assert len(ports) == n and len(rows) == n, (
                f"proxy sockets to upstream: {len(ports)}, RabbitMQ connections from them: "
                f"{len(rows)}, want {n}: {rows}"
            )
            return rows or [{}]

        rows = wait_for(check, timeout, interval=0.2, what=f"{n} upstream connection(s)")
        return [r for r in rows if r]


# --------------------------------------------------------------------------- raw AMQP client


class RawClosed(Exception):
    """The peer closed the socket (EOF or reset)."""


class RawClient:
    """A minimal blocking AMQP 0-9-1 client over a plain socket, frames via pamqp."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, value: Any, channel: int = 0) -> None:
        self.sock.sendall(frame.marshal(value, channel))

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError as exc:
                raise RawClosed("connection reset") from exc
            if not data:
                raise RawClosed("EOF")
            self.buf += data

    def read_exact(self, n: int) -> bytes:
        self._fill(n)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_frame(self) -> tuple[int, Any]:
        """Next frame as (channel, pamqp object); heartbeats are returned too."""
        self._fill(7)
        ftype, channel, size = struct.unpack_from(">BHI", self.buf)
        raw = self.read_exact(7 + size + 1)
        assert raw[-1] == 0xCE, f"bad frame end {raw[-1]:#x} in {raw[:32]!r}"
        _consumed, ch, value = frame.unmarshal(raw)
        assert ch == channel
        del ftype
        return channel, value

    def read_method(self, skip_heartbeats: bool = True) -> tuple[int, Any]:
        while True:
            ch, value = self.read_frame()
            if skip_heartbeats and isinstance(value, heartbeat.Heartbeat):
                continue
            return ch, value

    def read_until_closed(self, limit: int = 1 << 20) -> bytes:
        """Everything until EOF/reset (at most ``limit`` bytes)."""
        data = self.buf
        self.buf = b""
        while len(data) < limit:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data

    # -- handshake

    @staticmethod
    def amqplain_response(user: str, password: str) -> str:
        """AMQPLAIN's response: a field table without its length prefix."""

        def longstr(key: str, val: str) -> bytes:
            k, v = key.encode(), val.encode()
            return bytes([len(k)]) + k + b"S" + struct.pack(">I", len(v)) + v

        raw = longstr("LOGIN", user) + longstr("PASSWORD", password)
        return raw.decode("latin-1")

    def handshake(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        mechanism: str = "PLAIN",
        heartbeat_s: int = 0,
        frame_max: int = 131072,
        client_properties: FieldTable | None = None,
    ) -> dict[str, Any]:
        """Run the client side of the handshake. Returns a dict with the frames received:
        start, tune, and either open_ok or close (a Connection.Close from the server)."""
        out: dict[str, Any] = {}
        self.send_raw(AMQP_HEADER)
        _, start = self.read_method()
        assert isinstance(start, commands.Connection.Start), start
        out["start"] = start
        if mechanism == "PLAIN":
            response = f"\0{user}\0{password}"
        elif mechanism == "AMQPLAIN":
            response = self.amqplain_response(user, password)
        else:
            raise ValueError(mechanism)
        props: FieldTable = client_properties or {
            "product": "itest-raw",
            "capabilities": {
                "authentication_failure_close": True,
                "connection.blocked": True,
                "consumer_cancel_notify": True,
                "basic.nack": True,
                "publisher_confirms": True,
            },
        }
        self.send(commands.Connection.StartOk(props, mechanism, response, "en_US"))
        _, m = self.read_method()
        if isinstance(m, commands.Connection.Close):
            out["close"] = m
            return out
        assert isinstance(m, commands.Connection.Tune), m
        out["tune"] = m
        fm = min(frame_max, m.frame_max) if m.frame_max else frame_max
        self.send(commands.Connection.TuneOk(m.channel_max, fm, heartbeat_s))
        self.send(commands.Connection.Open(vhost))
        _, m = self.read_method()
        if isinstance(m, commands.Connection.Close):
            out["close"] = m
            return out
        assert isinstance(m, commands.Connection.OpenOk), m
        out["open_ok"] = m
        return out

    def publish(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: header.ContentHeader | None = None,
        frame_max: int = 131072,
    ) -> None:
        from pamqp import body as pbody

        data = frame.marshal(
            commands.Basic.Publish(exchange=exchange, routing_key=routing_key), channel
        )
        hdr = props or header.ContentHeader(0, len(body), commands.Basic.Properties())
        hdr.body_size = len(body)
        data += frame.marshal(hdr, channel)
        step = frame_max - 8
        for i in range(0, len(body), step):
            data += frame.marshal(pbody.ContentBody(body[i : i + step]), channel)
        self.send_raw(data)


# --------------------------------------------------------------------------- pika helpers


def drain(
    conn: pika.BlockingConnection,
    until: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> None:
    """Run pika's I/O loop until ``until()`` holds (or fail after timeout)."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        conn.process_data_events(time_limit=0.05)


def queue_counts(queue: str, vhost: str = "/") -> tuple[int, int]:
    """(ready messages, consumers) of a queue, asked of RabbitMQ directly."""
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, virtual_host=vhost)
    )
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    finally:
        conn.close()


def get_all(ch: Any, queue: str, limit: int = 100000) -> list[tuple[Any, Any, bytes]]:
    """basic.get (auto-ack) until the queue is empty."""
    out = []
    while len(out) < limit:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((method, props, body))
    return out


# --------------------------------------------------------------------------- fixture types


class Names:
    """Unique queue/exchange names, deleted (straight on RabbitMQ) at teardown."""

    def __init__(self) -> None:
        self.queues: list[tuple[str, str]] = []
        self.exchanges: list[tuple[str, str]] = []

    def queue(self, prefix: str = "q", vhost: str = "/") -> str:
        name = unique(prefix)
        self.queues.append((vhost, name))
        return name

    def exchange(self, prefix: str = "x", vhost: str = "/") -> str:
        name = unique(prefix)
        self.exchanges.append((vhost, name))
        return name

    def cleanup(self) -> None:
        by_vhost: dict[str, list[tuple[str, str]]] = {}
        for vhost, name in self.queues:
            by_vhost.setdefault(vhost, []).append(("q", name))
        for vhost, name in self.exchanges:
            by_vhost.setdefault(vhost, []).append(("x", name))
        for vhost, items in by_vhost.items():
            try:
                conn = pika.BlockingConnection(
                    pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, virtual_host=vhost)
                )
            except pika.exceptions.AMQPError:
                continue  # vhost already deleted
            try:
                ch = conn.channel()
                for kind, name in items:
                    try:
                        if kind == "q":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                    except pika.exceptions.ChannelClosed:
                        ch = conn.channel()
            finally:
                with contextlib.suppress(Exception):
                    conn.close()


class Aux:
    """Session-wide users and vhost for tests about credentials and pools.

    - vhost: a vhost where guest and ``user`` have full permissions
    - user/password: has permissions on / and on vhost
    - noperm/noperm_password: has permissions on / only (none on vhost)
    """

    vhost: str
    user: str
    password: str
    noperm: str
    noperm_password: str


ProxyFactory = Callable[..., Target]


# --------------------------------------------------------------------------- hardening tests

#: The name each AMQP reply code's text starts with (AMQP 0-9-1, 1.9: "constants").
REPLY_NAMES: dict[int, str] = {
    311: "CONTENT_TOO_LARGE",
    312: "NO_ROUTE",
    313: "NO_CONSUMERS",
    320: "CONNECTION_FORCED",
    402: "INVALID_PATH",
    403: "ACCESS_REFUSED",
    404: "NOT_FOUND",
    405: "RESOURCE_LOCKED",
    406: "PRECONDITION_FAILED",
    501: "FRAME_ERROR",
    502: "SYNTAX_ERROR",
    503: "COMMAND_INVALID",
    504: "CHANNEL_ERROR",
    505: "UNEXPECTED_FRAME",
    506: "RESOURCE_ERROR",
    530: "NOT_ALLOWED",
    540: "NOT_IMPLEMENTED",
    541: "INTERNAL_ERROR",
}
#: Codes that close a whole connection ("hard errors"), and those that close a channel.
HARD_ERRORS = frozenset((320, 402, 501, 502, 503, 504, 505, 506, 530, 540, 541))
SOFT_ERRORS = frozenset((311, 312, 313, 403, 404, 405, 406))


def http_request(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path; (status, body), for error statuses too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def metric_sample(http_port: int, name: str, **labels: str) -> float:
    """One sample of the proxy's /metrics (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_request(http_port, "/metrics")
    assert status == 200, (status, text)
    wanted = tuple(sorted(labels.items()))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and tuple(sorted(sample.labels.items())) == wanted:
                return float(sample.value)
    return 0.0


def worker_processes(p: ProxyProcess) -> list[psutil.Process]:
    """The master's live worker processes (title ``amqproxy: worker N``)."""
    assert p.proc is not None
    found = []
    try:
        children = psutil.Process(p.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if " ".join(child.cmdline()).startswith("amqproxy: worker"):
                found.append(child)
    return found


def worker_rss(p: ProxyProcess) -> int:
    """Resident memory of the proxy's workers, in bytes."""
    total = 0
    for proc in worker_processes(p):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


class RssSampler:
    """Samples the workers' RSS every ``interval`` s in a thread; ``peak`` is the largest."""

    def __init__(self, p: ProxyProcess, interval: float = 0.1) -> None:
        import threading

        self.p = p
        self.interval = interval
        self.baseline = worker_rss(p)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, worker_rss(self.p))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, worker_rss(self.p))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


class Bystander:
    """A pika client with its own queue that it publishes to and consumes from: proof that
    what another client did on the same upstream connection cost it nothing."""

    def __init__(
        self, target: Target, names: Names, user: str = "guest", password: str = "guest",
        vhost: str = "/",
    ) -> None:  # fmt: skip
        self.conn = target.connect(user, password, vhost)
        self.ch = self.conn.channel()
        self.queue = names.queue("bystander", vhost)
        self.ch.queue_declare(self.queue)
        self.got: list[bytes] = []
        self.sent: list[bytes] = []
        self.ch.basic_consume(
            self.queue, lambda _c, _m, _p, body: self.got.append(body), auto_ack=True
        )

    def roundtrip(self, n: int = 3, timeout: float = 10.0) -> None:
        """Publish n messages and wait until exactly everything sent so far came back."""
        for _ in range(n):
            body = f"bystander-{len(self.sent)}".encode()
            self.ch.basic_publish("", self.queue, body)
            self.sent.append(body)
        drain(self.conn, lambda: len(self.got) >= len(self.sent), timeout, "bystander messages")
        assert self.got == self.sent

    def close(self) -> None:
        self.conn.close()


def read_until_connection_close(
    c: RawClient, timeout: float = 10.0
) -> tuple[Any, list[tuple[int, Any]]]:
    """Read frames until the server's Connection.Close (answered with CloseOk); returns it
    (None when the socket closed first) and the (channel, method) of every other method
    frame of the connection and channel classes on the way. Other frames are skipped
    undecoded (their content may be anything a hostile client published)."""
    c.sock.settimeout(timeout)
    others: list[tuple[int, Any]] = []
    try:
        while True:
            c._fill(7)
            ftype, channel, size = struct.unpack_from(">BHI", c.buf)
            raw = c.read_exact(7 + size + 1)
            if ftype != 1 or size < 4 or raw[7:9] not in (b"\x00\x0a", b"\x00\x14"):
                continue
            _, _, method = frame.unmarshal(raw)
            if isinstance(method, commands.Connection.Close):
                with contextlib.suppress(OSError):
                    c.send(commands.Connection.CloseOk())
                return method, others
            others.append((channel, method))
    except (RawClosed, ConnectionError):
        return None, others


# --------------------------------------------------------------------------- a pausable relay


class Relay:
    """A TCP relay in front of the broker whose broker-to-client direction can be held, so a
    test can tell what waits for the broker's answer and what does not."""

    def __init__(self, target_port: int = BROKER_PORT) -> None:
        import threading

        self.target_port = target_port
        self._held = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        """Stop passing on what the broker sends (it queues up in the relay)."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((BROKER_HOST, self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        pending = b""
        source.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
                if not data:
                    break
                pending += data
            except TimeoutError:
                pass
            except OSError:
                break
            if pending and not (from_broker and self._held.is_set()):
                try:
                    sink.sendall(pending)
                except OSError:
                    break
                pending = b""
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
