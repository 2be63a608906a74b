"""Where the clients under test connect: a proxy process (tests.support.proxy) or, in direct
mode, RabbitMQ itself; and ``ProxyFactory``, the type of the ``proxy_factory`` fixture."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pika

from .broker import BROKER_PORT


class Target:
    """Where the clients under test connect: a proxy process or (direct mode) RabbitMQ."""

    host = "127.0.0.1"
    port: int
    direct: bool

    def params(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        **kw: Any,
    ) -> pika.ConnectionParameters:
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("blocked_connection_timeout", None)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            **kw,
        )

    def connect(
        self, user: str = "guest", password: str = "guest", vhost: str = "/", **kw: Any
    ) -> pika.BlockingConnection:
        conn = pika.BlockingConnection(self.params(user, password, vhost, **kw))
        self.__dict__.setdefault("_clients", []).append(conn)
        return conn

    def close_clients(self) -> None:
        """Close the pika connections connect() made that a (failed) test left open."""
        for conn in self.__dict__.pop("_clients", []):
            with contextlib.suppress(Exception):
                if conn.is_open:
                    conn.close()

    def log_text(self) -> str:
        return ""

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        from urllib.parse import quote

        return (
            f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/"
            f"{quote(vhost, safe='')}"
        )


class DirectTarget(Target):
    """Direct mode: the "proxy" is RabbitMQ itself (used to prove the tests' assertions)."""

    direct = True

    def __init__(self) -> None:
        self.port = BROKER_PORT


ProxyFactory = Callable[..., Target]
