"""The AMQP listening sockets: one SO_REUSEPORT socket per address and worker slot.

The master opens a slot's sockets before it forks the slot's worker (as nginx does), so they,
and the connections queued on them, outlive the worker that accepts from them: a crashed
worker's replacement inherits them. Before the first one, a bind without SO_REUSEPORT checks
that no other process (a second amqproxy) listens there, which SO_REUSEPORT would let it share.
A forked worker keeps its slot's sockets and points every other socket it inherited at
/dev/null.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from amqproxy_mp.config import Config
from amqproxy_mp.worker import LISTEN_BACKLOG

log = logging.getLogger(__name__)

#: (address family, socket address) of one listening socket.
Address = tuple[int, tuple[str, int] | tuple[str, int, int, int]]


class ListenerError(OSError):
    """The listen address cannot be resolved, or another process listens there already
    (an OSError, as a failed bind is: callers handle both alike)."""


def ports(config: Config) -> list[tuple[int, bool]]:
    """(port, is TLS) of each configured AMQP listener."""
    configured = [(config.listen_port, False), (config.tls_port, True)]
    return [(port, tls) for port, tls in configured if port]


def listen_text(config: Config) -> str:
    """The listeners for logs and the process title: ``127.0.0.1:5673,tls:127.0.0.1:5671``."""
    host = config.listen_address
    host = f"[{host}]" if ":" in host else host
    return ",".join(f"{'tls:' if tls else ''}{host}:{port}" for port, tls in ports(config))


def addresses(host: str, port: int) -> list[Address]:
    """The distinct addresses `host` resolves to for a passive TCP socket on `port`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    seen: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.append((family, sockaddr))  # type: ignore[arg-type]
    return seen


def check_ports_free(config: Config) -> None:
    """Bind without SO_REUSEPORT first, so a second instance fails instead of sharing."""
    host = config.listen_address
    for family, sockaddr in [a for port, _ in ports(config) for a in addresses(host, port)]:
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(sockaddr)
        except OSError as exc:
            raise ListenerError(
                f"cannot listen on {sockaddr[0]} port {sockaddr[1]}: {exc.strerror} "
                f"(is another amqproxy running?)"
            ) from None
        finally:
            probe.close()


def open_listeners(host: str, port: int) -> list[socket.socket]:
    """One SO_REUSEPORT socket per address for one worker slot; none if one fails (OSError)."""
    sockets: list[socket.socket] = []
    for family, sockaddr in addresses(host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)  # (the worker's create_server repeats it)
        except OSError:
            sock.close()
            for other in sockets:
                other.close()
            raise
        sockets.append(sock)
    return sockets


def check_tcp_migrate_req() -> None:
    """Log a hint when the kernel resets, instead of moving, a closed socket's queue."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            enabled = f.read().strip() != "0"
    except OSError:
        return
    if not enabled:
        log.info(
            "net.ipv4.tcp_migrate_req is 0: connections queued on a retiring worker's socket "
            "(TTOU, stop) are reset instead of moved to another worker; enable it with "
            "'sysctl -w net.ipv4.tcp_migrate_req=1'"
        )


def drop_inherited_sockets(keep: set[int]) -> None:
    """In a new worker: every socket of the master's (the HTTP listener and its clients,
    other slots' listeners, an upstream probe under way) is pointed at /dev/null, so the
    worker holds none of them open. Not closed: objects of the master that the fork copied
    would close those numbers again later, when they may belong to the worker's own sockets.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for name in names:
            fd = int(name)
            if fd in keep or fd <= 2 or fd == devnull:
                continue
            try:
                is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
            except OSError:
                continue  # (the directory listing's own descriptor, gone already)
            if is_socket:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
