"""The proxy under test as a process: ``python -m amqproxy_mp`` in the foreground with its output
captured to a log file, the environment it runs in, and what the kernel and RabbitMQ see of
its upstream connections and worker processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from amqproxy_mp.config import OPTIONS

from .broker import BROKER_HOST, BROKER_PORT, list_connections
from .targets import Target
from .util import REPO_ROOT, free_port, wait_for

#: The connection name the proxy gives its upstream connections.
PROXY_CONNECTION_NAME = "amqproxy-mp"


#: Variables that would configure the proxy or talk to a service manager: never inherited.
_CONTROL_ENV = {
    "JOURNAL_STREAM",
    "PROMETHEUS_MULTIPROC_DIR",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
}


def proxy_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test runner's environment without anything the proxy reads as configuration."""
    drop = {o.env for o in OPTIONS if o.env} | _CONTROL_ENV
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ProxyProcess(Target):
    """One ``python -m amqproxy_mp`` process in the foreground, stderr captured to a file."""

    direct = False

    def __init__(
        self,
        log_path: Path,
        options: Sequence[str] = (),
        upstream: str | None = None,
        upstream_port: int = BROKER_PORT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.http_port = free_port()
        if "--listen" in options:  # a test that moves the listener connects there
            self.host = options[list(options).index("--listen") + 1]
        self.log_path = log_path
        self.upstream_port = upstream_port
        self.upstream = upstream or f"amqp://{BROKER_HOST}:{BROKER_PORT}"
        self.args = [
            sys.executable,
            "-m",
            "amqproxy_mp",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            # one worker unless a test asks for more: pooling assertions count upstream
            # connections, and each worker has its own pools
            *(() if {"-w", "--workers"} & set(options) else ("--workers", "1")),
            *options,
            self.upstream,
        ]
        # the proxy reads its configuration from the environment too: never inherit any
        self.env = proxy_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- lifecycle

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"# {' '.join(self.args)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=str(REPO_ROOT),
            env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"proxy exited with code {rc} before accepting on port {self.port}:\n"
                    f"{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as probe:
                    self._wait_for_a_worker(probe)
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"proxy did not accept on port {self.port} within {timeout}s:\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.05)

    @staticmethod
    def _wait_for_a_worker(probe: socket.socket, timeout: float = 5.0) -> None:
        """The master binds the port before it forks its workers: a TCP connect succeeds while
        no worker exists yet (a test that took the pids then missed the worker). Wait until a
        worker answers the protocol header, but no longer than `timeout`: a test may start a
        proxy whose workers cannot answer."""
        probe.settimeout(timeout)
        with contextlib.suppress(OSError):
            probe.sendall(b"AMQP\x00\x00\x09\x01")
            # the whole Connection.Start, or closing would reset the connection (and the
            # proxy would log a client's "connection lost")
            data = b""
            while chunk := probe.recv(4096):
                data += chunk
                if len(data) >= 7 and len(data) >= 8 + int.from_bytes(data[3:7], "big"):
                    break

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # kill the whole session (a master may have forked workers)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return rc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 5.0, flags: int = re.I) -> re.Match[str]:
        rx = re.compile(pattern, flags)
        return wait_for(
            lambda: rx.search(self.log_text()),
            timeout,
            what=f"log line matching {pattern!r} in {self.log_path}",
        )

    # -- upstream connections

    def pids(self) -> list[int]:
        assert self.proc is not None
        try:
            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def upstream_local_ports(self) -> set[int]:
        """Local ports of the proxy's (and its children's) established TCP connections to the
        upstream port, as the kernel sees them."""
        ports: set[int] = set()
        for pid in self.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if (
                    c.status == psutil.CONN_ESTABLISHED
                    and c.raddr
                    and c.raddr.port == self.upstream_port
                ):
                    ports.add(c.laddr.port)
        return ports

    def upstream_connections(self) -> list[dict[str, Any]]:
        """RabbitMQ's connections that come from this proxy's sockets."""
        ports = self.upstream_local_ports()
        return [c for c in list_connections() if c["peer_port"] in ports]

    def wait_upstream_count(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until both the proxy's sockets and RabbitMQ agree on exactly n upstream
        connections; return RabbitMQ's rows."""

        def check() -> list[dict[str, Any]] | None:
            ports = self.upstream_local_ports()
            rows = [c for c in list_connections() if c["peer_port"] in ports]
            assert len(ports) == n and len(rows) == n, (
                f"proxy sockets to upstream: {len(ports)}, RabbitMQ connections from them: "
                f"{len(rows)}, want {n}: {rows}"
            )
            return rows or [{}]

        rows = wait_for(check, timeout, interval=0.2, what=f"{n} upstream connection(s)")
        return [r for r in rows if r]


def worker_processes(p: ProxyProcess) -> list[psutil.Process]:
    """The master's live worker processes (title ``amqproxy: worker N``)."""
    assert p.proc is not None
    found = []
    try:
        children = psutil.Process(p.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if " ".join(child.cmdline()).startswith("amqproxy: worker"):
                found.append(child)
    return found
