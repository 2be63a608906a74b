"""The PHP-FPM pattern through the proxy with php-amqp (Debian php-amqp extension)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.support.broker import BROKER_HOST, BROKER_PORT, Aux, Names, queue_counts
from tests.support.pika_client import get_all
from tests.support.proxy import PROXY_CONNECTION_NAME, ProxyProcess
from tests.support.targets import ProxyFactory, Target
from tests.support.util import wait_for

PHP_DIR = Path(__file__).parent / "php"


def php(script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    res = subprocess.run(
        ["php", str(PHP_DIR / script), *args], capture_output=True, text=True, timeout=timeout
    )
    lines = res.stdout.strip().splitlines()
    assert lines, f"php {script} printed nothing (rc={res.returncode}): {res.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    out["_rc"] = res.returncode
    out["_stderr"] = res.stderr
    return out


@pytest.fixture(scope="module", autouse=True)
def php_amqp() -> None:
    res = subprocess.run(["php", "-m"], capture_output=True, text=True)
    if "amqp" not in res.stdout.split():
        pytest.fail("the PHP amqp extension is missing (apt-get install php-cli php-amqp)")


def test_php_fpm_pattern_500_connections_one_upstream(
    proxy_factory: ProxyFactory, names: Names
) -> None:
    p: Target = proxy_factory("-t", "30")
    q = names.queue("php")
    b = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    b.channel().queue_declare(q)
    out = php("publish_loop.php", p.host, str(p.port), "guest", "guest", "/", q, "500")
    assert out["_rc"] == 0 and out["published"] == 500, out
    # the proxy may acknowledge a client's close before the broker has enqueued its publish
    wait_for(lambda: queue_counts(q)[0] == 500, timeout=10, what="500 messages in the queue")
    got = get_all(b.channel(), q)
    b.close()
    assert [body for _, _, body in got] == [f"msg-{i:04d}".encode() for i in range(500)]
    assert all(
        props.content_type == "text/plain" and props.delivery_mode == 2 for _, props, _ in got
    )
    if isinstance(p, ProxyProcess):
        rows = p.wait_upstream_count(1)
        assert rows[0]["client_properties"].get("connection_name") == PROXY_CONNECTION_NAME
        # ... and it is the only connection RabbitMQ has from this proxy's process
        assert len(p.upstream_local_ports()) == 1


def test_php_amqp_wrong_password_403(proxy: Target) -> None:
    out = php(
        "connect_error.php",
        proxy.host,
        str(proxy.port),
        "guest",
        "wrong-" + uuid.uuid4().hex[:6],
        "/",
    )
    assert out["connected"] is False, out
    assert out["class"] == "AMQPConnectionException"
    assert out["code"] == 403, out
    assert (
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN" in out["message"]
    ), out


def test_php_amqp_unknown_vhost_530(proxy: Target) -> None:
    vhost = "itest-php-nope-" + uuid.uuid4().hex[:6]
    out = php("connect_error.php", proxy.host, str(proxy.port), "guest", "guest", vhost)
    assert out["connected"] is False, out
    assert out["class"] == "AMQPConnectionException"
    assert out["code"] == 530, out
    assert f"NOT_ALLOWED - vhost {vhost} not found" in out["message"], out


def test_php_amqp_no_permission_530(proxy: Target, aux: Aux) -> None:
    out = php(
        "connect_error.php", proxy.host, str(proxy.port), aux.noperm, aux.noperm_password, aux.vhost
    )
    assert out["connected"] is False, out
    assert out["code"] == 530, out
    assert (
        f"NOT_ALLOWED - access to vhost '{aux.vhost}' refused for user '{aux.noperm}'"
        in out["message"]
    ), out


def test_php_amqp_connects(proxy: Target) -> None:
    out = php("connect_error.php", proxy.host, str(proxy.port), "guest", "guest", "/")
    assert out["connected"] is True, out
