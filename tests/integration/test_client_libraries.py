"""Real client libraries report through the proxy exactly what they report directly.

Each scenario runs once against RabbitMQ and once through the proxy; the library's own
outcome (exception class, reply code, message) must be the same. The broker refuses a wrong
password in answer to Connection.StartOk, before Tune, and a vhost in answer to
Connection.Open: libraries tell the two apart by where the refusal comes.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import kombu
import pika
import pika.exceptions
import pytest

from tests.support.broker import Aux, Names, queue_counts
from tests.support.pika_client import get_all
from tests.support.targets import DirectTarget, Target
from tests.support.util import wait_for

from .test_php import php

NODE_DIR = Path(__file__).parent / "node"

Outcome = tuple[str, Any, str]  # exception class ("" when none), reply code, message


def pika_connect(t: Target, user: str, password: str, vhost: str) -> Outcome:
    try:
        pika.BlockingConnection(t.params(user, password, vhost)).close()
    except pika.exceptions.AMQPError as exc:
        return type(exc).__name__, None, str(exc)
    return "", None, ""


def aio_pika_connect(t: Target, user: str, password: str, vhost: str) -> Outcome:
    async def main() -> Outcome:
        try:
            conn = await aio_pika.connect(t.url(user, password, vhost), timeout=10)
        except Exception as exc:
            return type(exc).__name__, getattr(exc, "reply_code", None), str(exc)
        await conn.close()
        return "", None, ""

    return asyncio.run(main())


def kombu_connect(t: Target, user: str, password: str, vhost: str) -> Outcome:
    conn = kombu.Connection(t.url(user, password, vhost), connect_timeout=10)
    try:
        conn.connect()
    except Exception as exc:
        return type(exc).__name__, getattr(exc, "code", None), str(exc)
    finally:
        conn.release()
    return "", None, ""


def php_amqp_connect(t: Target, user: str, password: str, vhost: str) -> Outcome:
    out = php("connect_error.php", t.host, str(t.port), user, password, vhost)
    return ("", None, "") if out["connected"] else (out["class"], out["code"], out["message"])


def php_amqplib_connect(mechanism: str) -> Callable[[Target, str, str, str], Outcome]:
    def connect(t: Target, user: str, password: str, vhost: str) -> Outcome:
        out = php(
            "amqplib_connect_error.php", t.host, str(t.port), user, password, vhost, mechanism
        )
        return (out["class"], out["code"], out["message"]) if out["raised"] else ("", None, "")

    return connect


def node(scenario: str, url: str, *args: str) -> dict[str, Any]:
    res = subprocess.run(
        ["node", str(NODE_DIR / "client.js"), scenario, url, *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = res.stdout.strip().splitlines()
    assert lines, f"node client.js printed nothing (rc={res.returncode}): {res.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def node_amqplib_connect(t: Target, user: str, password: str, vhost: str) -> Outcome:
    out = node("connect", t.url(user, password, vhost))
    return (out["class"], out["code"], out["message"]) if out["raised"] else ("", None, "")


LIBRARIES: dict[str, Callable[[Target, str, str, str], Outcome]] = {
    "pika": pika_connect,
    "aio-pika": aio_pika_connect,
    "kombu": kombu_connect,
    "php-amqp": php_amqp_connect,
    "php-amqplib PLAIN": php_amqplib_connect("PLAIN"),
    "php-amqplib AMQPLAIN": php_amqplib_connect("AMQPLAIN"),
    "node amqplib": node_amqplib_connect,
}

SCENARIOS = ["ok", "wrong password", "unknown user", "unknown vhost", "vhost not permitted"]


def credentials(scenario: str, aux: Aux) -> tuple[str, str, str]:
    return {
        "ok": ("guest", "guest", "/"),
        "wrong password": ("guest", "wrong-" + uuid.uuid4().hex[:6], "/"),
        "unknown user": ("itest-nobody-" + uuid.uuid4().hex[:6], "x", "/"),
        "unknown vhost": ("guest", "guest", "itest-nowhere-" + uuid.uuid4().hex[:6]),
        "vhost not permitted": (aux.noperm, aux.noperm_password, aux.vhost),
    }[scenario]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("library", list(LIBRARIES))
def test_login_outcome_is_the_same_as_directly(
    proxy: Target, aux: Aux, library: str, scenario: str
) -> None:
    def connect(t: Target) -> Outcome:
        kind, code, message = LIBRARIES[library](t, user, password, vhost)
        return kind, code, re.sub(r" at 0x[0-9a-f]+", "", message)  # (object addresses)

    user, password, vhost = credentials(scenario, aux)
    direct = connect(DirectTarget())
    assert connect(proxy) == direct
    assert bool(direct[0]) == (scenario != "ok"), direct
    # and again, now that the proxy may know these credentials from a pooled connection
    assert connect(proxy) == direct


def test_node_amqplib_php_pattern_through_the_proxy(proxy: Target, names: Names) -> None:
    q = names.queue("node")
    b = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    b.channel().queue_declare(q)
    out = node("php_pattern", proxy.url(), q, "50")
    assert out == {"raised": False, "published": 50}, out
    wait_for(lambda: queue_counts(q)[0] == 50, what="50 messages")
    assert [body for _, _, body in get_all(b.channel(), q)] == [
        f"msg-{i:04d}".encode() for i in range(50)
    ]
    b.close()


def test_kombu_publishes_64_bit_header_values(proxy: Target, names: Names) -> None:
    """py-amqp encodes large integers with type 'L', which RabbitMQ reads (also in a headers
    exchange's routing); the proxy refused them with 502 before."""
    x, q = names.exchange("kombu"), names.queue("kombu")
    b = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    bch = b.channel()
    bch.exchange_declare(x, "headers")
    bch.queue_declare(q)
    bch.queue_bind(q, x, arguments={"x-match": "all", "big": 2**40})
    with kombu.Connection(proxy.url()) as conn:
        producer = conn.Producer()
        producer.publish(b"big", exchange=x, headers={"big": 2**40, "small": -(2**62)})
        producer.publish(b"other", exchange=x, headers={"big": 2**40 + 1})
    wait_for(lambda: queue_counts(q)[0] == 1, what="the routed message")
    ((_, props, body),) = get_all(bch, q)
    assert body == b"big" and props.headers == {"big": 2**40, "small": -(2**62)}
    b.close()
