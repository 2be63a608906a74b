"""A raw-socket AMQP 0-9-1 client built on pamqp, for tests that send what no client library
would, or must see exactly which frames come back; and a probe for "something answers AMQP
here"."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

from pamqp import commands, frame, header, heartbeat
from pamqp.common import FieldTable

from .broker import BROKER_HOST, BROKER_PORT

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


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
