"""One client of a differential program: a socket, frames in and out, and everything it
observed, recorded per channel in the order it arrived.

What is recorded is what a client library could report: each method (name and arguments),
each message (method, the content header's raw properties, the body), each close, and how
the connection ended. Frames are decoded with pamqp: the harness trusts neither side.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands, frame

HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_HEADER = struct.Struct(">BHI")

#: Methods that carry content: the event is complete with its header and body.
CONTENT_METHODS = ("Basic.Deliver", "Basic.Return", "Basic.GetOk")


@dataclass
class Event:
    """One thing a client saw on one channel."""

    name: str  # "Basic.Deliver", "Channel.Close", "dropped", "timeout", ...
    fields: dict[str, Any] = field(default_factory=dict)
    properties: bytes = b""  # the content header's properties, raw
    body: bytes = b""
    step: int = -1  # the program step during which it arrived

    def __repr__(self) -> str:
        parts = [self.name]
        if self.fields:
            parts.append(" ".join(f"{k}={v!r}" for k, v in self.fields.items()))
        if self.name in CONTENT_METHODS:
            parts.append(f"props={self.properties.hex()} body={self.body[:40]!r}")
            if len(self.body) > 40:
                parts[-1] += f"..({len(self.body)} bytes)"
        return " ".join(parts)


def method_fields(method: Any) -> dict[str, Any]:
    return {name: getattr(method, name) for name in method.__slots__}


class Wire:
    """A blocking socket read without blocking: `pump` parses whatever has arrived."""

    def __init__(self, host: str, port: int) -> None:
        self.buf = bytearray()
        self.eof = False
        #: channel -> what arrived on it; channel 0: the connection
        self.events: dict[int, list[Event]] = {}
        self._content: dict[int, tuple[Event, int]] = {}  # channel -> (event, body left)
        #: everything that arrived, in order, with its channel (for waits)
        self.log: list[tuple[int, Event]] = []
        #: the program step under way (set by the run)
        self.step = -1
        try:
            self.sock = socket.create_connection((host, port), timeout=10)
        except OSError as exc:  # (no listener: a library reports it at once)
            self.sock = socket.socket()
            self.sock.close()
            self.eof = True
            self.record(0, Event("connect failed", {"error": exc.strerror}))
            return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        if self.eof:
            return
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError:
            self._ended()
        finally:
            with contextlib.suppress(OSError):
                self.sock.setblocking(False)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.eof = True

    def record(self, channel: int, event: Event) -> None:
        if event.step < 0:
            event.step = self.step
        self.events.setdefault(channel, []).append(event)
        self.log.append((channel, event))

    def pump(self) -> bool:
        """Read and record what has arrived; True when something did."""
        if self.eof:
            return False
        got = False
        while True:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._parse()  # what came before the end
                self._ended()
                return True
            self.buf += data
            got = True
        if got:
            self._parse()
        return got

    def _ended(self) -> None:
        if not self.eof:
            self.eof = True
            self.record(0, Event("socket closed"))
            with contextlib.suppress(OSError):
                self.sock.close()

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 7:
            frame_type, channel, size = FRAME_HEADER.unpack_from(buf, pos)
            end = pos + 7 + size
            if len(buf) < end + 1:
                break
            payload = bytes(buf[pos + 7 : end])
            pos = end + 1
            self._frame(frame_type, channel, payload)
        del buf[:pos]

    def _frame(self, frame_type: int, channel: int, payload: bytes) -> None:
        if frame_type == 8:
            return  # heartbeats are per hop: not the client's business
        if frame_type == 1:
            raw = FRAME_HEADER.pack(1, channel, len(payload)) + payload + b"\xce"
            _, _, method = frame.unmarshal(raw)
            event = Event(method.name, method_fields(method))
            if method.name in CONTENT_METHODS:
                self._content[channel] = (event, -1)
                return
            self.record(channel, event)
            return
        pending = self._content.get(channel)
        if pending is None:
            self.record(channel, Event(f"unexpected frame type {frame_type}"))
            return
        event, left = pending
        if frame_type == 2:
            event.properties = payload[12:]  # flags and properties (after class, weight, size)
            left = struct.unpack_from(">Q", payload, 4)[0]
        else:
            event.body += payload
            left -= len(payload)
        if left == 0:
            del self._content[channel]
            self.record(channel, event)
        else:
            self._content[channel] = (event, left)


def method_frame(channel: int, method: Any) -> bytes:
    return bytes(frame.marshal(method, channel))


def connection_close_frame() -> bytes:
    return method_frame(0, commands.Connection.Close(200, "bye", 0, 0))
