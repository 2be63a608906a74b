"""What the proxy tells operators: client connected / disconnected (with a reason) and
upstream connection opened."""

from __future__ import annotations

import re

import pytest
from pamqp import commands

from tests.support.proxy import ProxyProcess, worker_processes
from tests.support.raw_client import RawClient
from tests.support.targets import ProxyFactory

pytestmark = pytest.mark.usefixtures("require_proxy")


def about_port(port: int, words: str) -> str:
    """A log line that mentions the client's port and one of ``words``."""
    p = rf"(?<!\d){port}(?!\d)"
    return rf"^(?=.*{p})(?=.*(?:{words})).*$"


def test_logs_client_connect_disconnect_and_upstream_open(proxy_factory: ProxyFactory) -> None:
    p: ProxyProcess = proxy_factory(direct_ok=False)
    # a client that closes cleanly with a reason
    with RawClient(p.host, p.port) as c:
        port = c.sock.getsockname()[1]
        assert "open_ok" in c.handshake()
        c.send(commands.Connection.Close(200, "itest-goodbye", 0, 0))
        assert isinstance(c.read_method()[1], commands.Connection.CloseOk)
    flags = re.I | re.M
    p.wait_log(r"^(?=.*upstream)(?=.*(?:open|connect|establish)).*$", flags=flags)
    p.wait_log(about_port(port, r"(?<!dis)connect|accept"), flags=flags)
    clean = p.wait_log(about_port(port, "disconnect|closed"), flags=flags).group(0)

    # a client that just drops the TCP connection after the handshake
    c2 = RawClient(p.host, p.port)
    port2 = c2.sock.getsockname()[1]
    assert "open_ok" in c2.handshake()
    c2.close()
    dropped = p.wait_log(about_port(port2, "disconnect|closed|lost|reset|eof"), flags=flags).group(
        0
    )
    # "with a reason": the two kinds of disconnect are told apart in the log
    # (digits masked: timestamps, pids, ports and durations differ anyway)
    assert re.sub(r"\d", "#", clean) != re.sub(r"\d", "#", dropped), (
        f"the same disconnect line for a clean close and a dropped socket: {clean!r}"
    )


def test_each_line_carries_the_pid_of_the_process_that_wrote_it(
    proxy_factory: ProxyFactory,
) -> None:
    """The pid is read once per process (not per line): a worker's lines must still carry
    its own pid, not the master's it was forked from."""
    p = proxy_factory("--workers", "2", direct_ok=False)
    assert isinstance(p, ProxyProcess)
    assert p.proc is not None
    master = p.proc.pid
    workers = {w.pid for w in worker_processes(p)}
    assert len(workers) == 2
    with RawClient(p.host, p.port) as c:
        port = c.sock.getsockname()[1]
        assert "open_ok" in c.handshake()
    line = p.wait_log(about_port(port, "disconnect"), flags=re.I | re.M).group(0)
    assert int(re.search(r"\[(\d+)\]", line).group(1)) in workers  # type: ignore[union-attr]
    started = p.wait_log(r"^.*worker \d+ started \(pid \d+\).*$", flags=re.M).group(0)
    assert int(re.search(r"\[(\d+)\]", started).group(1)) == master  # type: ignore[union-attr]
