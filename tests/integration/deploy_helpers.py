"""Helpers for the deployment tests (systemd, supervisord, php-fpm + nginx, docker-compose):
processes started from the deploy/ files, the proxy's environment, HTTP, queues."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pika

from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.util import REPO_ROOT, wait_for

DEPLOY = REPO_ROOT / "deploy"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1, below the ephemeral range: a port the kernel
    hands out as a client's local port (thousands of them in the other tests) could be taken
    again in the seconds between this choice and the daemon's bind."""
    low, _high = _ephemeral_range()
    start = 10000 if low > 12000 else 1024
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randrange(start, low)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 20.0, what: str = "") -> None:
    wait_for(lambda: port_open(port), timeout, interval=0.05, what=what or f"port {port}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def broker() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))


@contextlib.contextmanager
def temp_queue(prefix: str) -> Iterator[str]:
    """A durable queue declared straight on RabbitMQ, deleted afterwards."""
    name = f"itest-deploy-{prefix}-{os.getpid()}-{time.monotonic_ns()}"
    conn = broker()
    conn.channel().queue_declare(name, durable=True)
    conn.close()
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            conn = broker()
            conn.channel().queue_delete(name)
            conn.close()


def drain_bodies(queue: str, limit: int = 100_000) -> list[bytes]:
    """Every message in the queue (acked), read straight from RabbitMQ."""
    conn = broker()
    ch = conn.channel()
    bodies = []
    while len(bodies) < limit:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        bodies.append(body)
    conn.close()
    return bodies


def message_count(queue: str) -> int:
    conn = broker()
    n = int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    conn.close()
    return n


def publish_through(port: int, queue: str, body: bytes) -> None:
    """One short-lived client through the proxy: connect, publish, close."""
    conn = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1, socket_timeout=10)
    )
    conn.channel().basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    conn.close()


def require_tool(*names: str, package: str) -> str:
    """The first of the commands found on PATH (or in /usr/sbin); fail naming the package."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if found:
            return found
    raise AssertionError(
        f"{' / '.join(names)} not found: install the Debian package {package} "
        "(scripts/test does it)"
    )


class Daemon:
    """A foreground process started by a test; its output goes to a file; stop() kills its
    whole session if it does not exit on its own."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_port(self, port: int, timeout: float = 20.0, what: str = "") -> None:
        """Wait until the port accepts; fail at once (with the output) if the process exits."""

        def ready() -> bool:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"{what or self.args[0]} exited with code {rc}:\n{self.log_text()[-3000:]}"
                )
            return port_open(port)

        wait_for(ready, timeout, interval=0.05, what=what or f"port {port}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # whatever the process left in its session (forked workers) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return int(self.proc.returncode)


EXAMPLE_INI = DEPLOY / "systemd" / "amqproxy.ini"


def example_ini(**values: object) -> str:
    """deploy/systemd/amqproxy.ini with some `key = value` lines changed (each must exist
    exactly once, so a renamed key in the example fails the tests instead of being ignored)."""
    import re

    text = EXAMPLE_INI.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, f"{EXAMPLE_INI.name} has no single '{key} = ' line"
    return text


def substitute(text: str, replacements: Mapping[str, str], where: str) -> str:
    """Replace each string exactly once: a deploy file that drifted fails loudly."""
    for old, new in replacements.items():
        count = text.count(old)
        assert count == 1, f"{where}: expected {old!r} once, found it {count} times"
        text = text.replace(old, new)
    return text
