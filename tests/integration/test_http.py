"""HTTP /healthz and /metrics on --http-port (as cloudamqp/amqproxy)."""

from __future__ import annotations

import urllib.request

import pytest

from tests.support.proxy import ProxyProcess
from tests.support.targets import ProxyFactory

pytestmark = pytest.mark.usefixtures("require_proxy")


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def test_healthz_and_metrics(proxy_factory: ProxyFactory) -> None:
    p = proxy_factory(direct_ok=False)
    assert isinstance(p, ProxyProcess)
    c = p.connect()
    c.channel()
    status, _, _ = get(f"http://127.0.0.1:{p.http_port}/healthz")
    assert status == 200
    status, ctype, body = get(f"http://127.0.0.1:{p.http_port}/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "# TYPE" in body
    c.close()
