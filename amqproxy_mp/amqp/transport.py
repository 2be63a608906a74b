"""A frame-oriented asyncio Protocol shared by both hops (client side and upstream side).

It splits the byte stream into frames in place, batches what is sent to the peer
into one write per event-loop iteration, and records the read/write times that
heartbeats are based on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from amqproxy_mp.amqp.frames import (
    FRAME_END,
    FRAME_HEADER,
    HEADER_SIZE,
    HEARTBEAT_FRAME,
    MIN_FRAME_MAX,
    OVERHEAD,
    FrameError,
    amqp_error_text,
    frame_snippet,
)
from amqproxy_mp.amqp.spec import FRAME_ERROR, INTERNAL_ERROR

log = logging.getLogger(__name__)

DEFAULT_FRAME_MAX: Final = 131072


class FramedProtocol(asyncio.Protocol):
    """Base for ClientSession and UpstreamConnection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        #: The largest frame this side accepts from its peer (negotiated in Tune).
        self.frame_max = MIN_FRAME_MAX
        #: Heartbeat interval agreed with the peer, 0 = none.
        self.heartbeat = 0
        self.last_read = self.last_write = time.monotonic()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        #: While True, received bytes are kept but not parsed (an async step is under way).
        self._parsing_paused = False
        #: Upstream connections whose broker is not reading: this peer is not read either.
        self._read_holds: set[Any] = set()
        self.closed = False

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self.count_received(len(data))
        self._buf += data
        if not self._parsing_paused:
            self._parse()

    # --- receiving ----------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        view = memoryview(buf)
        try:
            end_of_data = len(buf)
            while end_of_data - pos >= HEADER_SIZE and not self.closed:
                frame_type, channel, size = FRAME_HEADER.unpack_from(buf, pos)
                # RabbitMQ lets a payload reach frame_max itself (not frame_max - 8): "quite a
                # few clients get it wrong". (Read per frame: a TuneOk in this read raises it.)
                if size > self.frame_max:
                    raise FrameError(
                        FRAME_ERROR,
                        f"FRAME_ERROR - {frame_snippet(frame_type, b'')}: "
                        f"{{frame_too_large,{size},{self.frame_max - OVERHEAD}}}",
                    )
                end = pos + HEADER_SIZE + size
                if end >= end_of_data:
                    break
                if buf[end] != FRAME_END:
                    snippet = frame_snippet(frame_type, view[pos + HEADER_SIZE : end])
                    raise FrameError(
                        FRAME_ERROR,
                        amqp_error_text(
                            f"FRAME_ERROR - {snippet}: {{invalid_frame_end_marker,{buf[end]}}}"
                        ),
                    )
                self.frame_received(frame_type, channel, view[pos + HEADER_SIZE : end])
                pos = end + 1
                if self._parsing_paused:
                    break
        except FrameError as exc:
            pos = len(buf)
            self.protocol_error(exc)
        except Exception:
            # A bug must cost this one connection, never the worker.
            log.exception("internal error while handling a frame; closing the connection")
            pos = len(buf)
            self.protocol_error(FrameError(INTERNAL_ERROR, "INTERNAL_ERROR - proxy error"))
        finally:
            view.release()
        if pos:
            try:
                del buf[:pos]
            except BufferError:
                # a view of a frame outlived its handling (an exception's traceback can keep
                # one): the buffer cannot shrink in place, so the rest moves to a new one
                self._buf = buf[pos:]

    def count_received(self, size: int) -> None:
        """Add to this hop's byte counter (plain ints; exported to metrics in batches)."""

    def count_sent(self, size: int) -> None:
        """Add to this hop's byte counter."""

    def frame_received(self, frame_type: int, channel: int, payload: memoryview) -> None:
        raise NotImplementedError

    def protocol_error(self, exc: FrameError) -> None:
        raise NotImplementedError

    def pause_parsing(self) -> None:
        """Stop parsing (and reading) until `resume_parsing`, for a step that awaits."""
        self._parsing_paused = True
        self._update_reading()

    def resume_parsing(self) -> None:
        self._parsing_paused = False
        if self.closed:
            return
        self._update_reading()
        if self._buf:
            self._parse()

    def hold_reading(self, holder: object) -> None:
        """Stop reading from this peer while `holder` (a blocked upstream) says so."""
        self._read_holds.add(holder)
        self._update_reading()

    def release_reading(self, holder: object) -> None:
        if holder in self._read_holds:
            self._read_holds.discard(holder)
            self.last_read = time.monotonic()  # silence while held is not a dead peer
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._parsing_paused or self._read_holds:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # --- sending ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes for the peer; everything queued in one loop iteration is one write."""
        if self.closed:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        out = self._out
        self._out = []
        if self.transport is not None and not self.transport.is_closing():
            if len(out) == 1:
                self.transport.write(out[0])
                self.count_sent(len(out[0]))
            else:
                self.transport.writelines(out)  # one writev, no join
                self.count_sent(sum(map(len, out)))
            self.last_write = time.monotonic()

    def send_heartbeat_if_due(self, now: float) -> bool:
        """Originate a heartbeat on this hop; returns False when the peer has gone silent."""
        if not self.heartbeat or self.closed:
            return True
        if self._read_holds:
            self.last_read = now  # not reading it on purpose
        elif now - self.last_read > 2 * self.heartbeat:
            return False
        if now - self.last_write >= self.heartbeat / 2:
            self.send(HEARTBEAT_FRAME)
            self.last_write = now
        return True

    def close_transport(self) -> None:
        """Send what is queued, then close the socket."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the socket now, discarding what is queued for the peer."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
