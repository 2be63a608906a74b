"""A tiny sd_notify(3) client: tell systemd (Type=notify) when the proxy is ready, stopping,
reloading, and alive (watchdog). Standard library only.

systemd passes the address of its notification socket in NOTIFY_SOCKET: a path, or an abstract
socket name written with a leading ``@``. Each notification is one datagram of newline-separated
``KEY=VALUE`` lines. Outside systemd (no NOTIFY_SOCKET) every call is a no-op, and nothing here
ever raises: a broken notification socket is logged once and otherwise ignored, because it must
not take the proxy down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an AF_UNIX address: ``@name`` is the abstract socket ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:... (systemd >= 253 in VMs): not for a host daemon


class SystemdNotifier:
    """Sends sd_notify states to the socket named by NOTIFY_SOCKET in `environ`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _address(self._raw) if self._raw else None
        self._socket: socket.socket | None = None
        self._failed = False
        if self._raw and self._address is None:
            self._log_once("unsupported NOTIFY_SOCKET address %r: not notifying systemd", self._raw)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._address is not None

    def notify(self, *states: str) -> None:
        """Send the states (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ...) in one datagram."""
        if self._address is None or not states:
            return
        message = "\n".join(states).encode()
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(message, self._address)
        except OSError as exc:
            self._log_once(
                "cannot notify systemd on NOTIFY_SOCKET %r: %s", self._raw, exc.strerror or exc
            )

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _log_once(self, message: str, *args: object) -> None:
        if not self._failed:
            self._failed = True
            log.warning(message, *args)


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings, half of systemd's WatchdogSec; None when not asked.

    systemd sets WATCHDOG_USEC, and WATCHDOG_PID when the variables could be inherited by a
    process they are not meant for: then only that pid pings (sd_watchdog_enabled(3)).
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 1_000_000 / 2
