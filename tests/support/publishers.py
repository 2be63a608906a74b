"""Publishing clients for failure tests: php-amqp PHP-pattern processes and pika threads,
each recording what it was told is sent, so a test can check it against the queue."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pamqp import commands, header

from tests.support.broker import BROKER_HOST, BROKER_PORT, queue_counts
from tests.support.proxy_http import metric_sample
from tests.support.raw_client import RawClient, RawClosed

PHP = Path(__file__).resolve().parents[1] / "integration" / "php" / "cycles.php"


def php_cycles(host: str, port: int, queue: str, seconds: float) -> subprocess.Popen[str]:
    """A php-amqp client doing the PHP cycle (a persistent message each) for `seconds`; its
    lines go to a file (a pipe nobody reads until the end would fill up and stop it)."""
    out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed by cycles_of
    proc = subprocess.Popen(
        ["php", str(PHP), host, str(port), "guest", "guest", "/", queue, str(seconds)],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.output = out  # type: ignore[attr-defined]
    return proc


def cycles_of(
    processes: list[subprocess.Popen[str]], partial_ok: bool = False
) -> list[dict[str, Any]]:
    """Every cycle the clients made, by start time (see cycles.php). `partial_ok`: they were
    interrupted, and a last line may be cut short."""
    found = []
    for proc in processes:
        proc.wait(timeout=120)
        out = proc.output  # type: ignore[attr-defined]
        out.seek(0)
        lines = out.read().splitlines()
        out.close()
        assert lines, "php printed nothing"
        if partial_ok and lines and not lines[-1].endswith("}"):
            lines.pop()
        try:
            found.extend(json.loads(line) for line in lines)
        except json.JSONDecodeError:
            raise AssertionError("\n".join(lines[-20:])) from None
    return sorted(found, key=lambda c: c["t"])


class Publisher(threading.Thread):
    """Until stopped: a connection, `per_connection` persistent messages, Connection.Close.
    `told` holds what the client was told is sent: without `confirms`, the messages of each
    connection whose Connection.CloseOk came (a raw client, which sees the CloseOk itself:
    pika and php-amqp do not say whether theirs came); with `confirms` (pika), each message
    the broker acked. `failures` counts the connections that ended otherwise (each is
    followed by the next at once)."""

    def __init__(
        self, host: str, port: int, queue: str, name: str, confirms: bool, per_connection: int
    ) -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.queue, self.name, self.confirms = queue, name, confirms
        self.per_connection = per_connection
        self.told: list[str] = []
        self.failures = 0
        self.stopping = threading.Event()
        self._i = 0

    def _bodies(self) -> list[str]:
        first, self._i = self._i, self._i + self.per_connection
        return [f"{self.name}-{i:07d}" for i in range(first, self._i)]

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.confirms:
                    self._confirming()
                else:
                    self._closing()
            except (pika.exceptions.AMQPError, OSError, RawClosed, AssertionError):
                self.failures += 1
                time.sleep(0.05)

    def _confirming(self) -> None:
        conn = pika.BlockingConnection(pika.ConnectionParameters(self.host, self.port))
        ch = conn.channel()
        ch.confirm_delivery()
        persistent = pika.BasicProperties(delivery_mode=2)
        for body in self._bodies():
            ch.basic_publish("", self.queue, body.encode(), persistent)
            self.told.append(body)  # (basic_publish returns once the broker acked it)
        conn.close()

    def _closing(self) -> None:
        with RawClient(self.host, self.port) as c:
            assert "open_ok" in c.handshake()
            c.send(commands.Channel.Open(), 1)
            assert isinstance(c.read_method()[1], commands.Channel.OpenOk)
            bodies = self._bodies()
            persistent = header.ContentHeader(0, 0, commands.Basic.Properties(delivery_mode=2))
            for body in bodies:
                c.publish(1, "", self.queue, body.encode(), persistent)
            c.send(commands.Connection.Close(200, "", 0, 0))
            _, answer = c.read_method()
            assert isinstance(answer, commands.Connection.CloseOk), answer
            self.told += bodies


def stored(connection: pika.BlockingConnection, queue: str) -> Counter[str]:
    """Every message in the queue (consumed), in order, with how often it is there."""
    ch = connection.channel()
    count = ch.queue_declare(queue, passive=True).method.message_count
    ch.basic_qos(prefetch_count=2000)  # (a basic_get per message took a minute for 100 000)
    bodies: Counter[str] = Counter()
    if not count:
        return bodies
    for i, (_, _, body) in enumerate(ch.consume(queue, inactivity_timeout=10), 1):
        if body is None:
            raise AssertionError(f"{queue}: {count - i + 1} of {count} messages did not come")
        bodies[body.decode()] += 1
        if i % 2000 == 0 or i == count:
            ch.basic_ack(0, multiple=True)
        if i == count:
            break
    ch.cancel()
    return bodies


def load_with_failures(
    host: str,
    port: int,
    http_port: int,
    queue: str,
    fail: Callable[[], int],
    messages: int,
    failures: int,
    php_told: bool = True,
) -> dict[str, float]:
    """4 php-amqp clients, 2 raw closing publishers and 2 confirming pika publishers, and
    `fail()` every 2 s (it returns how many failures it caused), until `failures` failures
    and about `messages` messages in the queue, or 150 s. Then the queue (on the broker at
    127.0.0.1:5672) is drained and deleted, and the tally returned: what the clients were
    told is sent, what of it is lost, the duplicates, and what the proxy counted.
    `php_told`: a php-amqp cycle that went through counts as told (php-amqp's disconnect()
    returns the same whether its close was answered or its socket dropped: only when the
    proxy stays up does a cycle that went through prove a CloseOk)."""
    seconds = 150.0
    php = [php_cycles(host, port, queue, seconds) for _ in range(4)]
    pikas = [Publisher(host, port, queue, f"raw-{n}", False, 20) for n in range(2)]
    pikas += [Publisher(host, port, queue, f"confirming-{n}", True, 20) for n in range(2)]
    for publisher in pikas:
        publisher.start()
    started = time.monotonic()
    caused = 0
    try:
        while time.monotonic() - started < seconds - 10:
            time.sleep(2)
            caused += fail()
            if caused >= failures and queue_counts(queue)[0] >= messages * 1.1:
                break
    finally:
        for proc in php:
            if proc.poll() is None:  # (not SIGINT: a background job's children ignore it)
                proc.terminate()
        for publisher in pikas:
            publisher.stopping.set()
        for publisher in pikas:
            publisher.join(30)
    cycles = cycles_of(php, partial_ok=True)
    php_ok = [c["body"] for c in cycles if c["ok"]]
    told = (php_ok if php_told else []) + [b for x in pikas for b in x.told]
    time.sleep(1)  # (the last re-sends)
    conn = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    try:
        there = stored(conn, queue)
        conn.channel().queue_delete(queue)
    finally:
        conn.close()
    lost = [body for body in told if not there[body]]
    if lost:
        print(f"lost: {lost[:10]}")
    return {
        "told": len(told),
        "lost": len(lost),
        "duplicates": sum(count - 1 for count in there.values()),
        "failures": caused,
        "php_cycles": len(php_ok),
        "php_failed_cycles": sum(1 for c in cycles if not c["ok"]),
        "publisher_failed_connections": sum(x.failures for x in pikas),
        "resent": metric_sample(http_port, "amqproxy_messages_resent_total"),
        "moved": metric_sample(http_port, "amqproxy_clients_moved_total"),
    }
