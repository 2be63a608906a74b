"""A real 3-node RabbitMQ cluster on this machine, beside the default node.

Each node has its own name (amqproxy-test-N@localhost), AMQP port, Erlang distribution port,
config file, mnesia and log directories (owned by the rabbitmq user, whose Erlang cookie they
share with the default node), and no plugins. Node 1 starts first; 2 and 3 join it. Started
once per test session (tests/integration/conftest.py), stopped at its end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pika

from tests.support.hosts import name_in_hosts
from tests.support.util import wait_for

BASE = Path("/tmp/amqproxy-test-cluster")
FIRST_PORT = 5691
#: Each node also listens on this port on an address of its own (127.0.0.11, .12, .13), so
#: that one host name with those three addresses names the whole cluster (see SHARED_NAME).
SHARED_PORT = 5690
#: The host name the tests map to those addresses in /etc/hosts (`shared_name_in_hosts`).
SHARED_NAME = "amqproxy-test-cluster.internal"


@dataclass
class ClusterNode:
    index: int

    @property
    def name(self) -> str:
        return f"amqproxy-test-{self.index}@localhost"

    @property
    def port(self) -> int:
        return FIRST_PORT + self.index - 1

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}"

    @property
    def shared_address(self) -> str:
        return f"127.0.0.{10 + self.index}"

    @property
    def directory(self) -> Path:
        return BASE / f"node-{self.index}"

    def env(self) -> dict[str, str]:
        d = self.directory
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(25690 + self.index),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "pid"),
        )
        return env

    def ctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),  # (force_boot finds the node's data directory by it)
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {result.stderr}")
        return result.stdout

    def prepare(self) -> None:
        d = self.directory
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"listeners.tcp.shared = {self.shared_address}:{SHARED_PORT}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "vm_memory_high_watermark.absolute = 1GB\n"
            "disk_free_limit.absolute = 1MB\n"
        )
        (d / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        (d / "enabled_plugins").write_text("[].\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(BASE)], check=True)

    def start(self) -> None:
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.env(),
            check=True,
            timeout=60,
            capture_output=True,
        )

    def await_startup(self, timeout: float = 90.0) -> None:
        """Until the node runs RabbitMQ (it must have registered with epmd first)."""
        wait_for(
            lambda: self.ctl("ping", check=False, timeout=30).strip().endswith("succeeded"),
            timeout=timeout,
            interval=0.5,
            what=f"{self.name} registered",
        )
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    def os_pid(self) -> int | None:
        try:
            return int((self.directory / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a node failure, not a shutdown."""
        pid = self.os_pid()
        assert pid is not None, f"no pid file for {self.name}"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), what=f"{self.name} gone")

    def restart(self) -> None:
        """Start the node again (after kill or stop) and wait until it serves AMQP."""
        self.start()
        self.await_startup()
        wait_for(lambda: _amqp_answers(self.port), timeout=30, what=f"{self.name} serving")

    def stop(self) -> None:
        """A graceful stop (what it does not finish in 20 s, Cluster.stop kills)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", check=False, timeout=20)


def shared_name_in_hosts(nodes: list[ClusterNode]) -> contextlib.AbstractContextManager[str]:
    """SHARED_NAME resolves to each node's own address while this lasts."""
    return name_in_hosts(SHARED_NAME, [node.shared_address for node in nodes])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _amqp_answers(port: int) -> bool:
    try:
        pika.BlockingConnection(
            pika.ConnectionParameters("127.0.0.1", port, connection_attempts=1, socket_timeout=2)
        ).close()
    except Exception:
        return False
    return True


class Cluster:
    def __init__(self, size: int = 3) -> None:
        self.nodes = [ClusterNode(i) for i in range(1, size + 1)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        self.stop()  # what an interrupted earlier run left
        for node in self.nodes:
            node.prepare()
            node.start()
        for node in self.nodes:
            node.await_startup()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        for node in self.nodes:
            wait_for(lambda n=node: _amqp_answers(n.port), timeout=60, what=f"{node.name} serving")

    def stop(self) -> None:
        """Stop every node (what an interrupted earlier run left too): gracefully, then by
        force whatever is still there."""
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if node.ctl("ping", check=False, timeout=10).strip().endswith("succeeded"):
                    node.stop()
        names = {f"RABBITMQ_NODENAME={node.name}".encode() for node in self.nodes}
        for proc in Path("/proc").iterdir():
            try:
                environ = set((proc / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if environ & names:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(proc.name), signal.SIGKILL)

    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if _amqp_answers(node.port)]
