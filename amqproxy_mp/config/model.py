"""What a load produces: plain frozen values, so the rest of the proxy never sees raw input."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


class ConfigError(Exception):
    """A configuration problem, reported to the operator as one line before anything binds."""


@dataclass(frozen=True)
class Upstream:
    """The broker, reduced to what the proxy uses (credentials and vhost come from each
    client): its first node, and the other nodes of its cluster, in the order given."""

    scheme: str
    host: str
    port: int
    others: tuple[Upstream, ...] = ()

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    @property
    def nodes(self) -> tuple[Upstream, ...]:
        """Every node, each on its own."""
        return (replace(self, others=()), *self.others)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return ",".join(node.url for node in self.nodes)


@dataclass(frozen=True)
class Config:
    """The field defaults are the only defaults: the option table reads them from here."""

    upstream: Upstream
    listen_address: str = "localhost"
    listen_port: int = 5673
    tls_port: int = 0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    http_port: int = 15673
    http_address: str = "127.0.0.1"
    log_level: str = "info"
    idle_connection_timeout: float = 5.0
    max_upstream_channels: int = 0
    max_upstream_connections: int = 100
    upstream_max_lifetime: float = 3600.0
    max_client_connections: int = 10000
    term_client_close_timeout: float = 0.0
    term_timeout: float = -1.0
    retire_client_close_timeout: float = 5.0
    close_policy: str = "processed"
    unconfirmed_buffer: int = 64 * 1024 * 1024
    client_heartbeat: int = 60
    upstream_heartbeat: int = 60
    client_handshake_timeout: float = 10.0
    client_max_buffer: int = 32 * 1024 * 1024
    consumer_window: int = 1000
    max_message_size: int = 128 * 1024 * 1024
    upstream_connect_timeout: float = 10.0
    upstream_tls_ca_file: str | None = None
    upstream_tls_cert_file: str | None = None
    upstream_tls_key_file: str | None = None
    upstream_tls_insecure_skip_verify: bool = False
    log_file: str | None = None
    workers: int = 0
    worker_timeout: float = 30.0
    config_file: str | None = None
    upstream_policy: str = "spread"
    upstream_node_connect_timeout: float = 2.0
    upstream_rebalance: bool = True

    @property
    def worker_count(self) -> int:
        """`workers`, with 0 meaning one per two CPUs (see default_workers)."""
        return self.workers or default_workers()


def default_workers(cpus: int | None = None) -> int:
    """One worker per two CPUs this process may use, at least one. The proxy shares its host
    with its clients (PHP-FPM beside it), and a worker more than the cores left over costs
    more than it brings: on 2 cores, 2 workers spent about 1.5 x the CPU per connection cycle
    of 1 worker and served a third fewer cycles (docs/performance.md)."""
    return max(1, (available_cpus() if cpus is None else cpus) // 2)


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may run on (its affinity, e.g. a cpuset or taskset), capped by a
    cgroup v2 CPU quota (docker --cpus, a Kubernetes limit), which os.cpu_count() ignores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cpus


@dataclass(frozen=True)
class LoadedConfig:
    """The config plus, per option, where its value came from, for --print-config and errors."""

    config: Config
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)
