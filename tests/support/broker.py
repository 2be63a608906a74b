"""RabbitMQ itself, on 127.0.0.1:5672 (guest/guest, vhost /): rabbitmqctl, what the broker
reports about connections and queues, and the vhosts, users, queues and exchanges tests create
on it (removed again at cleanup)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions

from .util import unique

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    cmd = ["rabbitmqctl", *args]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", "-n", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res.stdout


def _table(triples: Any) -> dict[str, Any]:
    """Turn rabbitmqctl's JSON field-table encoding ([[key, type, value], ...]) into a dict."""
    out: dict[str, Any] = {}
    if not isinstance(triples, list):
        return out
    for item in triples:
        if isinstance(item, list) and len(item) == 3:
            key, typ, val = item
            out[key] = _table(val) if typ == "table" else val
    return out


def list_connections() -> list[dict[str, Any]]:
    """RabbitMQ's view of all client connections (name, peer_port, user, vhost, channels,
    client_properties as a dict)."""
    out = rabbitmqctl(
        "-q",
        "list_connections",
        "name",
        "peer_port",
        "user",
        "vhost",
        "channels",
        "client_properties",
        "--formatter",
        "json",
    )
    rows = json.loads(out) if out.strip() else []
    for row in rows:
        row["client_properties"] = _table(row.get("client_properties"))
    return rows


def close_broker_connection(peer_port: int, reason: str) -> None:
    """``rabbitmqctl close_connection`` on the connection from ``peer_port``.

    rabbitmqctl wants the connection's pid in its plain-text form (``<rabbit@host.N.M.0>``),
    which only the non-JSON listing prints."""
    out = rabbitmqctl("-q", "list_connections", "--no-table-headers", "peer_port", "pid")
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].strip() == str(peer_port):
            rabbitmqctl("close_connection", parts[1].strip(), reason)
            return
    raise AssertionError(f"no broker connection from peer port {peer_port}:\n{out}")


def close_broker_connections(peer_ports: Iterable[int], reason: str) -> int:
    """What `rabbitmqctl close_connection` does, on each connection from one of these ports
    still there, in one rabbitmqctl run (a run costs a second or more: a test that closes
    connections again and again spent most of its time starting rabbitmqctl); how many it
    closed."""
    ports = ",".join(str(int(port)) for port in peer_ports)
    if not ports:
        return 0
    text = reason.replace("\\", "\\\\").replace('"', '\\"')
    out = rabbitmqctl(
        "-q", "eval",
        f"length([rabbit_networking:close_connection(proplists:get_value(pid, I), \"{text}\") "
        f"|| I <- rabbit_networking:connection_info_all([pid, peer_port]), "
        f"lists:member(proplists:get_value(peer_port, I), [{ports}])]).",
    )  # fmt: skip
    return int(out.strip())


def memory_high_watermark() -> list[str]:
    """The broker's current vm_memory_high_watermark as ``set_vm_memory_high_watermark``
    arguments (a fraction, or ``absolute BYTES``)."""
    out = rabbitmqctl(
        "-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark().", check=False
    ).strip()
    if m := re.fullmatch(r"\{absolute,\s*(\d+)\}", out):
        return ["absolute", m.group(1)]
    if re.fullmatch(r"[0-9.]+", out) and float(out) > 0:
        return [out]
    return ["0.4"]  # unknown, or left at 0 by an interrupted run: the default


class RabbitAdmin:
    """Creates vhosts and users with unique names and removes them at cleanup()."""

    def __init__(self) -> None:
        self.vhosts: list[str] = []
        self.users: list[str] = []

    def add_vhost(self, prefix: str = "vh") -> str:
        name = unique(prefix)
        rabbitmqctl("add_vhost", name)
        self.vhosts.append(name)
        return name

    def add_user(self, password: str | None = None, prefix: str = "user") -> tuple[str, str]:
        name = unique(prefix)
        password = password or uuid.uuid4().hex
        rabbitmqctl("add_user", name, password)
        self.users.append(name)
        return name, password

    @staticmethod
    def grant(user: str, vhost: str) -> None:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def cleanup(self) -> None:
        for user in self.users:
            rabbitmqctl("delete_user", user, check=False)
        for vhost in self.vhosts:
            rabbitmqctl("delete_vhost", vhost, check=False)
        self.users.clear()
        self.vhosts.clear()


def queue_counts(queue: str, vhost: str = "/") -> tuple[int, int]:
    """(ready messages, consumers) of a queue, asked of RabbitMQ directly."""
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, virtual_host=vhost)
    )
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return ok.method.message_count, ok.method.consumer_count
    finally:
        conn.close()


class Names:
    """Unique queue/exchange names, deleted (straight on RabbitMQ) at teardown."""

    def __init__(self) -> None:
        self.queues: list[tuple[str, str]] = []
        self.exchanges: list[tuple[str, str]] = []

    def queue(self, prefix: str = "q", vhost: str = "/") -> str:
        name = unique(prefix)
        self.queues.append((vhost, name))
        return name

    def exchange(self, prefix: str = "x", vhost: str = "/") -> str:
        name = unique(prefix)
        self.exchanges.append((vhost, name))
        return name

    def cleanup(self) -> None:
        by_vhost: dict[str, list[tuple[str, str]]] = {}
        for vhost, name in self.queues:
            by_vhost.setdefault(vhost, []).append(("q", name))
        for vhost, name in self.exchanges:
            by_vhost.setdefault(vhost, []).append(("x", name))
        for vhost, items in by_vhost.items():
            try:
                conn = pika.BlockingConnection(
                    pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, virtual_host=vhost)
                )
            except pika.exceptions.AMQPError:
                continue  # vhost already deleted
            try:
                ch = conn.channel()
                for kind, name in items:
                    try:
                        if kind == "q":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                    except pika.exceptions.ChannelClosed:
                        ch = conn.channel()
            finally:
                with contextlib.suppress(Exception):
                    conn.close()


class Aux:
    """Session-wide users and vhost for tests about credentials and pools.

    - vhost: a vhost where guest and ``user`` have full permissions
    - user/password: has permissions on / and on vhost
    - noperm/noperm_password: has permissions on / only (none on vhost)
    """

    vhost: str
    user: str
    password: str
    noperm: str
    noperm_password: str
