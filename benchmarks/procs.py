"""Processes the benchmark starts and watches: proxies, the latency relay, py-spy; and the broker
through rabbitmqctl."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

_children: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


#: Set in the proxies' environment only (run.py --proxy-env), e.g. PYTHONMALLOC=malloc.
PROXY_ENV: dict[str, str] = {}


def _spawn(args: list[str], log: Path | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    _children.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
    """Stop a process we started, and whatever children it left, by pid."""
    if proc.poll() is None:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.kill()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(_children):
        _stop(proc, timeout=5.0)


class Proxy:
    """One amqproxy-mp master with its workers on free loopback ports."""

    def __init__(
        self,
        workers: int,
        upstream_port: int,
        logdir: Path,
        options: tuple[str, ...] = (),
        upstream: str = "",
        repo: Path = REPO,
    ) -> None:
        """`upstream`: the URL(s), when not the broker at 127.0.0.1:`upstream_port`; `repo`:
        the checkout whose amqproxy_mp runs (another release's, side by side)."""
        direct = f"amqp://127.0.0.1:{upstream_port}"
        self.workers = workers
        self.upstream_port = upstream_port
        self.port = free_port()
        self.http_port = free_port()
        self.log = logdir / f"proxy-w{workers}-{self.port}.log"
        args = ["--listen", "127.0.0.1", "--port", str(self.port)]
        args += ["--http-port", str(self.http_port), "--workers", str(workers), *options]
        self.proc = _spawn(
            [sys.executable, "-m", "amqproxy_mp", *args, upstream or direct],
            self.log,
            cwd=repo,
            # Its own metrics directory (a temporary one it removes), never a shared one.
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            | PROXY_ENV,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}: {self.tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/healthz", timeout=1
                ) as resp,
            ):
                if resp.status == 200 and len(self.worker_pids()) == self.workers:
                    wait_port(self.port)
                    return
            time.sleep(0.1)
        raise RuntimeError(f"proxy not healthy after {timeout:g} s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.proc.pid)
        return [master, *master.children()]

    def worker_pids(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []

    def cpu_seconds(self) -> tuple[float, frozenset[int]]:
        """User + system CPU of the master and its workers, and the pids counted."""
        total = 0.0
        pids = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
                pids.append(proc.pid)
        return total, frozenset(pids)

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def pss(self) -> int:
        """Proportional set size of the master and workers (/proc/PID/smaps_rollup): shared
        pages count once over all of them, unlike in the sum of their RSS."""
        total = 0
        for proc in self.processes():
            with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        return total

    def upstream_ports(self) -> set[int]:
        """Local ports of the workers' connections to the upstream (as the OS sees them)."""
        ports = set()
        for proc in self.processes()[1:]:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections("tcp"):
                    if conn.raddr and conn.raddr.port == self.upstream_port:
                        ports.add(conn.laddr.port)
        return ports

    def metrics(self) -> dict[str, float]:
        """/metrics, summed by metric name (labels dropped)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if match:
                with contextlib.suppress(ValueError):
                    out[match[1]] = out.get(match[1], 0.0) + float(match[3])
        return out

    def stop(self) -> None:
        _stop(self.proc)


class Relay:
    """The latency relay in its own process (so its timers are not delayed by the generator)."""

    def __init__(
        self, target_port: int, delay_ms: float, logdir: Path, count: bool = False
    ) -> None:
        self.port = free_port()
        self.stats = logdir / f"relay-{self.port}.count" if count else None
        args = [
            sys.executable,
            str(BENCH / "relay.py"),
            "--listen-port",
            str(self.port),
            "--target",
            f"127.0.0.1:{target_port}",
            "--delay-ms",
            str(delay_ms),
        ]
        if self.stats:
            args += ["--stats", str(self.stats)]
        self.proc = _spawn(args, logdir / f"relay-{self.port}.log")
        wait_port(self.port)

    def channel_opens(self) -> int:
        """Channel.Open frames the relay passed towards the broker so far."""
        time.sleep(0.3)  # the relay writes its count every 0.1 s
        assert self.stats is not None
        try:
            return int(self.stats.read_text())
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)


class Profiler:
    """py-spy recording one process (collapsed stacks: speedscope and flamegraph tools read
    them), stopped with SIGINT."""

    def __init__(self, pid: int, output: Path, rate: int = 250, native: bool = False) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        args = [
            str(exe) if exe.exists() else "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(output),
        ]
        # --native unwinds C frames (uvloop, the interpreter) but must pause the process for it.
        args.append("--native" if native else "--nonblocking")
        self.output = output
        self.proc = _spawn(args, output.with_suffix(".log"))
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT, timeout=30)


class Perf:
    """`perf record` (cpu-clock) of one process, for the split of its CPU time between the
    Python interpreter, the kernel, uvloop and libc, which py-spy cannot see (it samples
    Python stacks, and counts a process that is runnable but waiting for a CPU as busy)."""

    def __init__(self, pid: int, output: Path) -> None:
        self.data = output.with_suffix(".perf.data")
        self.summary = output.with_suffix(".perf.json")
        self.proc = _spawn(
            [
                "perf",
                "record",
                "-F",
                "999",
                "-e",
                "cpu-clock",
                "-p",
                str(pid),
                "-o",
                str(self.data),
            ],
            output.with_suffix(".perf.log"),
        )

    @staticmethod
    def available() -> bool:
        return shutil.which("perf") is not None

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT, timeout=30)
        result = subprocess.run(
            ["perf", "report", "-i", str(self.data), "--sort", "dso", "--stdio", "-g", "none"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        shares = {}
        for line in result.stdout.splitlines():
            match = re.match(r"\s*([\d.]+)%\s+(\S.*?)\s*$", line)
            if match and not line.lstrip().startswith("#"):
                shares[match[2]] = float(match[1])
        self.summary.write_text(json.dumps(shares, indent=1) + "\n")
        with contextlib.suppress(OSError):
            self.data.unlink()


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def broker_channels_created() -> int:
    """The broker's node-wide count of channels ever created (what rabbitmq_prometheus exports
    as rabbitmq_channels_opened_total): {Node, ConnCreated, ConnClosed, ChCreated, ...}."""
    out = rabbitmqctl(
        "eval", "[{_, _, _, C, _, _, _, _}] = ets:lookup(connection_churn_metrics, node()), C."
    )
    return int(out.strip())


def broker_connections_from(ports: set[int]) -> int:
    """How many of the broker's connections come from these local ports."""
    out = rabbitmqctl("list_connections", "peer_port", "--no-table-headers")
    return sum(1 for line in out.split() if line.isdigit() and int(line) in ports)


def ensure_vhost(vhost: str, user: str) -> None:
    with contextlib.suppress(RuntimeError):
        rabbitmqctl("delete_vhost", vhost)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


def delete_vhost(vhost: str) -> None:
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        rabbitmqctl("delete_vhost", vhost)


def listen_drops() -> int:
    """The kernel's TcpExt ListenDrops (SYNs or handshakes dropped by full listen queues;
    includes ListenOverflows)."""
    with open("/proc/net/netstat") as file:
        lines = file.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
            return table.get("ListenDrops", 0)
    return 0
