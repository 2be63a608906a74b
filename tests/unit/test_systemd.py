"""The sd_notify client: path and abstract sockets, no-op without systemd, never raises."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqproxy_mp.systemd import SystemdNotifier, watchdog_interval


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def test_sends_states_as_one_datagram_to_a_path_socket(
    path_socket: tuple[str, socket.socket],
) -> None:
    path, sock = path_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.notify("READY=1", "STATUS=2 workers accepting on 127.0.0.1:5673")
    notifier.notify("WATCHDOG=1")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 workers accepting on 127.0.0.1:5673"
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.close()


def test_abstract_socket() -> None:
    name = f"amqproxy-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        notifier.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    notifier.notify("READY=1")  # nothing to send to, nothing raised
    notifier = SystemdNotifier({"NOTIFY_SOCKET": ""})
    assert not notifier.enabled
    notifier.notify("READY=1")


def test_errors_are_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="amqproxy_mp.systemd"):
        for _ in range(3):
            notifier.notify("WATCHDOG=1")
    warnings = [r for r in caplog.records if r.name == "amqproxy_mp.systemd"]
    assert len(warnings) == 1, caplog.text
    assert "cannot notify systemd" in warnings[0].getMessage()
    assert "nobody-listens" in warnings[0].getMessage()


def test_recovers_when_the_socket_appears_later(tmp_path: Path) -> None:
    path = str(tmp_path / "late")
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    notifier.notify("READY=1")  # nobody there yet: dropped
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        notifier.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_unsupported_address_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="amqproxy_mp.systemd"):
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
        notifier.notify("READY=1")
    assert not notifier.enabled
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_oversized_message_is_logged_not_raised(
    path_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    path, _sock = path_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.WARNING, logger="amqproxy_mp.systemd"):
        notifier.notify("STATUS=" + "x" * (8 * 1024 * 1024))  # EMSGSIZE
    assert "cannot notify systemd" in caplog.text


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected
