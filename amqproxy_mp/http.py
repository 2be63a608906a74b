"""A minimal HTTP/1.1 server for the master's /healthz, /metrics and /pools.

No framework: three GET routes do not justify a dependency in the process that supervises
everything. It reads one request per connection and closes it (`Connection: close`), with a
deadline and a size limit on the request head, and a route that raises costs one 500 and one log
line. So a slow, broken or hostile client can neither hang the master nor make it grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: (status, content type, body)
Response = tuple[int, str, bytes]
Route = Callable[[], Response]

#: Seconds a client has to send its request line and headers.
REQUEST_TIMEOUT = 5.0
#: Seconds a client has to take the response.
WRITE_TIMEOUT = 10.0
#: Largest request head (request line and headers) accepted.
MAX_HEADER_BYTES = 8192
#: Connections served at once; more are closed at once (health checks and scrapes need few).
MAX_CONNECTIONS = 64
#: Before closing a connection whose input was not all read, read and drop up to this much for
#: up to LINGER_TIMEOUT, so that the kernel does not answer the unread bytes with a reset that
#: would destroy the response before the client read it.
LINGER_BYTES = 65536
LINGER_TIMEOUT = 1.0

ALLOWED_METHODS = ("GET", "HEAD")
TEXT = "text/plain; charset=utf-8"


class _BadRequest(Exception):
    """The request cannot be served; carries the status to answer with."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _head(status: int, content_type: str, length: int, extra: Mapping[str, str]) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_phrase(status)}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _error(status: int) -> Response:
    return status, TEXT, f"{status} {_phrase(status)}\n".encode()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Method, path (query dropped) and lower-cased headers of one request."""
    size = 0
    lines: list[str] = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line longer than the stream limit (MAX_HEADER_BYTES)
            raise _BadRequest(431) from None
        if not line and not lines and size == 0:
            raise EOFError  # connected and closed without a word (a port check)
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise _BadRequest(431)
        if not line.endswith(b"\n"):  # the client closed mid-head
            raise _BadRequest(400)
        text = line.rstrip(b"\r\n").decode("latin-1")
        if not text:
            if lines:
                break
            continue  # RFC 9112 2.2: ignore empty lines before the request line
        lines.append(text)

    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _BadRequest(400)
    method, target, version = parts
    if not version.startswith("HTTP/"):
        raise _BadRequest(400)
    if not version.startswith("HTTP/1."):
        raise _BadRequest(505)
    headers: dict[str, str] = {}
    for text in lines[1:]:
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400)
        headers[name.lower()] = value.strip()
    if target.startswith(("http://", "https://")):  # absolute form, as sent to proxies
        try:
            path = urlsplit(target).path or "/"
        except ValueError:
            raise _BadRequest(400) from None
    else:
        path = target.split("?", 1)[0].split("#", 1)[0]
    return method, path, headers


def _has_body(headers: Mapping[str, str]) -> bool:
    """Whether the client announced a body this server is not going to read."""
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "0")
    return not (length.isdigit() and int(length) == 0)


def _call(route: Route, method: str, path: str) -> Response:
    try:
        status, content_type, body = route()
        if not isinstance(status, int) or not isinstance(body, bytes):
            raise TypeError(f"route returned {type(status).__name__}, {type(body).__name__}")
    except Exception as exc:
        text = " ".join(str(exc).split())  # one line, whatever the exception says
        log.error("HTTP %s %s failed: %s: %s", method, path, type(exc).__name__, text)
        log.debug("HTTP %s %s traceback", method, path, exc_info=True)
        return _error(500)
    return status, content_type, body


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then drop what the client still sends, for a bounded time and amount."""
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    dropped = 0
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(LINGER_TIMEOUT):
            while dropped < LINGER_BYTES:
                chunk = await reader.read(LINGER_BYTES - dropped)
                if not chunk:
                    break
                dropped += len(chunk)


def _handler(
    routes: Mapping[str, Route],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        active += 1
        try:
            await _serve(routes, reader, writer)
        except Exception as exc:  # a bug here must cost one connection, never the master
            log.error("HTTP connection failed: %s: %s", type(exc).__name__, exc)
            writer.transport.abort()
        finally:
            active -= 1

    return handle


async def _serve(
    routes: Mapping[str, Route], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    extra: dict[str, str] = {}
    method = ""
    unread_input = False
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            method, path, headers = await _read_head(reader)
    except TimeoutError:
        status, content_type, body = _error(408)
        unread_input = True
    except _BadRequest as exc:
        status, content_type, body = _error(exc.status)
        unread_input = True
    except (ConnectionError, EOFError):
        writer.transport.abort()
        return
    else:
        unread_input = _has_body(headers)
        route = routes.get(path)
        if method not in ALLOWED_METHODS:
            status, content_type, body = _error(405)
            extra["Allow"] = ", ".join(ALLOWED_METHODS)
        elif route is None:
            status, content_type, body = _error(404)
        else:
            status, content_type, body = _call(route, method, path)
    head = _head(status, content_type, len(body), extra)
    writer.write(head if method == "HEAD" else head + body)
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
            if unread_input:
                await _linger(reader, writer)
    except (TimeoutError, ConnectionError):
        writer.transport.abort()
        return
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def start_http_server(host: str, port: int, routes: Mapping[str, Route]) -> asyncio.Server:
    """Listen on host:port (as asyncio.start_server) and answer GET/HEAD for `routes`.

    `routes` maps a path ("/metrics") to a function returning (status, content type, body);
    it is called on the event loop, so it must be quick and must not block.
    """
    return await asyncio.start_server(
        _handler(routes), host, port, limit=MAX_HEADER_BYTES, reuse_address=True
    )
