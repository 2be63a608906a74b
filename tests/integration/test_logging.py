"""What the proxy tells operators: client connected / disconnected (with a reason) and
upstream connection opened."""

from __future__ import annotations

import re

import pytest
from pamqp import commands

from tests.support.proxy import ProxyProcess
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
