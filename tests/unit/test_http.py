"""The master's HTTP server: routes, methods, errors, and clients that are slow or send too much."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping

import pytest
import uvloop

from amqproxy_mp import http
from amqproxy_mp.http import Response, start_http_server

ParsedResponse = tuple[int, dict[str, str], bytes]
Run = Callable[[Awaitable[None]], None]
WithServer = Callable[[Callable[[int], Awaitable[None]]], None]


def boom() -> Response:
    raise RuntimeError("the route broke")


ROUTES: Mapping[str, Callable[[], Response]] = {
    "/healthz": lambda: (200, "text/plain; charset=utf-8", b"OK\n"),
    "/down": lambda: (503, "text/plain; charset=utf-8", b"no worker alive\n"),
    "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", b"x 1\n" * 1000),
    "/boom": boom,
}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine on a new loop of either kind: the master may use uvloop or not."""

    def runner(coro: Awaitable[None]) -> None:
        factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as r:
            r.run(asyncio.wait_for(coro, 30))

    return runner


@pytest.fixture
def with_server(run: Run) -> WithServer:
    """Run `test(port)` against a fresh server on an ephemeral loopback port."""

    def with_server(test: Callable[[int], Awaitable[None]]) -> None:
        async def main() -> None:
            server = await start_http_server("127.0.0.1", 0, ROUTES)
            try:
                port = server.sockets[0].getsockname()[1]
                await test(port)
            finally:
                server.close()
                await server.wait_closed()

        run(main())

    return with_server


def parse(raw: bytes) -> ParsedResponse:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(status), headers, body


async def exchange(port: int, request: bytes, eof: bool = False) -> bytes:
    """Send raw bytes (then half-close if `eof`), return all the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if eof:
            writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


async def get(port: int, target: str, method: str = "GET") -> ParsedResponse:
    request = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\n\r\n"
    return parse(await exchange(port, request.encode()))


def test_get_routes(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        status, headers, body = await get(port, "/healthz")
        assert (status, body) == (200, b"OK\n")
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["content-length"] == "3"
        assert headers["connection"] == "close"
        assert "date" in headers

        status, headers, body = await get(port, "/down")
        assert (status, body) == (503, b"no worker alive\n")

        status, headers, body = await get(port, "/metrics?name[]=x&y=1")  # query ignored
        assert status == 200
        assert body == b"x 1\n" * 1000
        assert headers["content-length"] == str(len(body))

        status, _, _ = await get(port, "http://localhost:15673/healthz")  # absolute form
        assert status == 200

    with_server(test)


def test_head_sends_headers_only(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        status, headers, body = await get(port, "/metrics", "HEAD")
        assert status == 200
        assert headers["content-length"] == str(len(b"x 1\n" * 1000))
        assert body == b""

    with_server(test)


def test_unknown_path_is_404(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        for target in ("/", "/nope", "/healthz/", "/HEALTHZ"):
            status, headers, body = await get(port, target)
            assert status == 404, target
            assert headers["content-length"] == str(len(body))

    with_server(test)


def test_other_methods_are_405_with_allow(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "get"):
            status, headers, _ = await get(port, "/healthz", method)
            assert status == 405, method
            assert headers["allow"] == "GET, HEAD"
        # A body the server never reads must not turn the answer into a connection reset.
        body = b"a" * 100_000
        request = b"POST /healthz HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        status, _, _ = parse(await exchange(port, request))
        assert status == 405

    with_server(test)


def test_route_exception_is_500_and_one_log_line(
    caplog: pytest.LogCaptureFixture, with_server: WithServer
) -> None:
    async def test(port: int) -> None:
        with caplog.at_level(logging.INFO, logger="amqproxy_mp.http"):
            status, _, body = await get(port, "/boom")
        assert status == 500
        assert b"Internal Server Error" in body
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1
        assert "the route broke" in errors[0].getMessage()
        assert "\n" not in errors[0].getMessage()
        assert errors[0].exc_info is None
        # The server goes on serving.
        assert (await get(port, "/healthz"))[0] == 200

    with_server(test)


def test_bad_route_result_is_500(run: Run) -> None:
    async def main() -> None:
        routes = {"/bad": lambda: (200, "text/plain", "not bytes")}
        server = await start_http_server("127.0.0.1", 0, routes)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        try:
            assert (await get(port, "/bad"))[0] == 500
        finally:
            server.close()

    run(main())


def test_malformed_requests_are_400(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        for request in (
            b"GARBAGE\r\n\r\n",
            b"GET /healthz\r\n\r\n",
            b"GET /healthz HTTP/1.1 extra\r\n\r\n",
            b"GET /healthz FTP/1.0\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
        ):
            status, _, _ = parse(await exchange(port, request))
            assert status == 400, request
        status, _, _ = parse(await exchange(port, b"GET /healthz HTTP/2.0\r\n\r\n"))
        assert status == 505

    with_server(test)


def test_lenient_about_line_endings_and_http_1_0(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        status, _, body = parse(await exchange(port, b"\r\nGET /healthz HTTP/1.0\n\n"))
        assert (status, body) == (200, b"OK\n")

    with_server(test)


def test_client_that_closes_early_does_not_disturb_the_server(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        assert await exchange(port, b"", eof=True) == b""  # port check: connect, close
        half_a_request_line = b"GET /healthz HT"
        assert parse(await exchange(port, half_a_request_line, eof=True))[0] == 400
        assert (await get(port, "/healthz"))[0] == 200

    with_server(test)


def test_oversized_head_is_431(with_server: WithServer) -> None:
    async def test(port: int) -> None:
        long_line = b"GET /healthz?" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n"
        status, _, _ = parse(await exchange(port, long_line))
        assert status == 431
        many_headers = b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: x\r\n" * 1000 + b"\r\n"
        status, _, _ = parse(await exchange(port, many_headers))
        assert status == 431
        # An endless header stream is cut off too, not buffered.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        try:
            for _ in range(200):
                writer.write(b"X-Filler: " + b"c" * 1000 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        raw = await reader.read()
        writer.close()
        if raw:  # the 431 may be lost to a reset while the client is still sending
            assert parse(raw)[0] == 431
        assert (await get(port, "/healthz"))[0] == 200

    with_server(test)


def test_slow_client_is_cut_off(monkeypatch: pytest.MonkeyPatch, with_server: WithServer) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.3)

    async def test(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        started = time.monotonic()
        raw = await reader.read()
        elapsed = time.monotonic() - started
        writer.close()
        assert 0.2 < elapsed < 3
        assert parse(raw)[0] == 408
        # Meanwhile and afterwards others are served.
        assert (await get(port, "/healthz"))[0] == 200

    with_server(test)


def test_silent_client_does_not_block_others(
    monkeypatch: pytest.MonkeyPatch, with_server: WithServer
) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 2.0)

    async def test(port: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        started = time.monotonic()
        assert (await get(port, "/healthz"))[0] == 200
        assert time.monotonic() - started < 1
        for _, writer in idle:
            writer.close()

    with_server(test)


def test_too_many_connections_are_refused(
    monkeypatch: pytest.MonkeyPatch, with_server: WithServer
) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 3)

    async def test(port: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionError):
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            await writer.drain()
            assert await reader.read() == b""
            raise ConnectionResetError  # closed without an answer counts too
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        assert (await get(port, "/healthz"))[0] == 200

    with_server(test)


def test_real_client(with_server: WithServer) -> None:
    """urllib, as a monitoring script would use it."""

    async def test(port: int) -> None:
        def fetch(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return int(r.status), bytes(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert await asyncio.to_thread(fetch, "/healthz") == (200, b"OK\n")
        assert (await asyncio.to_thread(fetch, "/down"))[0] == 503
        assert (await asyncio.to_thread(fetch, "/missing"))[0] == 404

    with_server(test)


def test_port_in_use_raises(run: Run) -> None:
    async def main() -> None:
        server = await start_http_server("127.0.0.1", 0, ROUTES)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(OSError):
                await start_http_server("127.0.0.1", port, ROUTES)
        finally:
            server.close()

    run(main())
