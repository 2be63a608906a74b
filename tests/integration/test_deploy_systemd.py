"""deploy/systemd: the unit passes `systemd-analyze verify` and `security`, its settings agree
with the example config, and the real master speaks the sd_notify protocol.

`systemd-analyze verify deploy/systemd/amqproxy.service` on its own fails on any machine where
amqproxy is not installed where the unit says (/opt/amqproxy/bin/amqproxy): verify checks that
every Exec*= binary exists. So the tests lay out the installed system in a throw-away root
directory (the unit in /etc/systemd/system, stand-ins for its executables, the distribution's
own units in /usr/lib/systemd/system for the targets it refers to) and run
`systemd-analyze verify --root=DIR`, which works without systemd running as PID 1 (it does not
here). The unit itself is booted under a real systemd by test_deploy_systemd_boot.py.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqproxy_mp.config import load_config
from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.proxy import proxy_env
from tests.support.util import REPO_ROOT

from .deploy_helpers import (
    DEPLOY,
    Daemon,
    free_ports,
    http_get,
    port_open,
    require_tool,
)

UNIT = DEPLOY / "systemd" / "amqproxy.service"
EXAMPLE_INI = DEPLOY / "systemd" / "amqproxy.ini"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def unit_entries(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file in order; keys may repeat (ExecReload=, ...)."""
    entries = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(key: str, section: str = "Service") -> str:
    values = [v for s, k, v in unit_entries() if s == section and k == key]
    assert values, f"{UNIT.name} has no {key}= in [{section}]"
    return values[-1]


def seconds(value: str) -> float:
    """systemd time spans as used in the unit: 30s, 1min, 90, 1min 30s."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "ms": 0.001, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def exec_paths() -> list[str]:
    """The absolute executables the unit's Exec*= lines run (prefixes like - and @ removed)."""
    paths = []
    for _, key, value in unit_entries():
        if key.startswith("Exec"):
            paths.append(value.lstrip("-@:+!").split()[0])
    return paths


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return require_tool("systemd-analyze", package="systemd")


def make_root(root: Path, unit_text: str) -> Path:
    """A root directory in which the unit is installed as the docs say."""
    units = root / "usr/lib/systemd/system"
    units.parent.mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, units, symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/amqproxy.service").write_text(unit_text)
    for path in exec_paths():
        stand_in = root / path.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    (root / "etc/amqproxy").mkdir(parents=True)
    shutil.copy(EXAMPLE_INI, root / "etc/amqproxy/amqproxy.ini")
    return root


def verify(systemd_analyze: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, "verify", f"--root={root}", "amqproxy.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_systemd_analyze_verify_is_clean(systemd_analyze: str, tmp_path: Path) -> None:
    result = verify(systemd_analyze, make_root(tmp_path / "root", UNIT.read_text()))
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        f"systemd-analyze verify (rc={result.returncode}):\n{result.stdout}\n{result.stderr}"
    )


def test_verify_would_catch_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    """The clean result above means something: verify does complain in this setup."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KilMode=mixed")
    result = verify(systemd_analyze, make_root(tmp_path / "root", broken))
    assert "Unknown key 'KilMode'" in result.stderr, result.stderr


def test_hardening_exposure_is_low(systemd_analyze: str, tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", UNIT.read_text())
    result = subprocess.run(
        [
            systemd_analyze,
            "security",
            "--offline=yes",
            f"--root={root}",
            "--no-pager",
            "amqproxy.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for amqproxy\.service: ([0-9.]+)", result.stdout)
    assert m, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert float(m.group(1)) <= 2.0, result.stdout


def test_unit_settings_fit_the_proxy_and_the_example_config() -> None:
    assert unit_value("Type") == "notify"
    assert unit_value("NotifyAccess") == "main"  # only the master notifies
    # graceful stop: TERM to the master alone; it drains the workers itself
    assert unit_value("KillMode") == "mixed"
    assert unit_value("KillSignal") == "SIGTERM"
    reload_lines = [v for s, k, v in unit_entries() if k == "ExecReload"]
    assert reload_lines[-1] == "/bin/kill -HUP $MAINPID"
    assert any("--check-config /etc/amqproxy/amqproxy.ini" in v for v in reload_lines[:-1])
    assert (
        unit_value("ExecStart") == "/opt/amqproxy/bin/amqproxy --config /etc/amqproxy/amqproxy.ini"
    )
    assert int(unit_value("LimitNOFILE")) >= 65536
    assert unit_value("DynamicUser") == "yes"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert unit_value(key) == value, key
    assert unit_value("Restart") == "on-failure"
    assert seconds(unit_value("WatchdogSec")) >= 10  # the master pings every WatchdogSec / 2

    # the shipped example is what ExecStart loads: it must be valid, and the stop timeout must
    # leave the workers time to drain before systemd kills them
    config = load_config(["--config", str(EXAMPLE_INI)], {}).config
    assert config.term_timeout >= 0, "an endless term_timeout would always end in SIGKILL"
    drain = config.term_client_close_timeout + config.term_timeout
    assert seconds(unit_value("TimeoutStopSec")) >= drain + 5, (
        f"TimeoutStopSec={unit_value('TimeoutStopSec')} leaves no margin over "
        f"term_client_close_timeout + term_timeout = {drain:g} s"
    )
    environment = dict(
        v.partition("=")[::2] for s, k, v in unit_entries() if s == "Service" and k == "Environment"
    )
    assert environment["PROMETHEUS_MULTIPROC_DIR"].startswith(
        f"/run/{unit_value('RuntimeDirectory')}/"
    )
    assert environment["PYTHONMALLOC"] == "malloc"  # memory given back after storms


def test_example_config_passes_check_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy_mp", "--check-config", str(EXAMPLE_INI)],
        capture_output=True,
        text=True,
        env=proxy_env(),
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{EXAMPLE_INI}: OK\n"


# --------------------------------------------------------------------------- sd_notify


class NotifySocket:
    """A test-owned NOTIFY_SOCKET: collects the datagrams the master sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, list[str]]] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, seconds: float, until: str | None = None) -> tuple[list[list[str]], bool]:
        """Datagrams arriving within `seconds`, stopping after one that holds `until`."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            states = data.decode().split("\n")
            self.received.append((time.monotonic(), states))
            got.append(states)
            if until is not None and until in states:
                return got, True
        return got, False

    def collect(self, seconds: float) -> list[list[str]]:
        """All datagrams arriving within `seconds`."""
        return self._receive(seconds)[0]

    def wait_for(self, state: str, timeout: float, hint: str = "") -> list[list[str]]:
        """Datagrams up to and including the first one holding `state`."""
        got, found = self._receive(timeout, until=state)
        if found:
            return got
        everything = [s for _, s in self.received]
        raise AssertionError(
            f"no {state} on NOTIFY_SOCKET within {timeout} s{hint}; received so far: {everything}"
        )


NOT_WIRED = (
    " (amqproxy_mp/master.py must send it through amqproxy_mp.systemd.SystemdNotifier; "
    "see `grep -n systemd amqproxy_mp/master.py`)"
)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def start_master(
    tmp_path: Path, notify: NotifySocket, workers: int, **env: str
) -> tuple[Daemon, int, int]:
    port, http_port = free_ports(2)
    args = [
        sys.executable, "-m", "amqproxy_mp",
        "--listen", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
        "--workers", str(workers), "--term-timeout", "5",
        f"amqp://{BROKER_HOST}:{BROKER_PORT}",
    ]  # fmt: skip
    master = Daemon(
        args,
        tmp_path / "master.log",
        env=proxy_env({"NOTIFY_SOCKET": str(notify.path), **env}),
        cwd=REPO_ROOT,
    )
    return master, port, http_port


def test_master_notifies_ready_watchdog_reloading_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    master, port, http_port = start_master(tmp_path, notify, 2, WATCHDOG_USEC="1000000")
    try:
        got = notify.wait_for("READY=1", 12, NOT_WIRED)
        # READY means every worker accepts: nothing may be refused from then on
        assert port_open(port), "READY=1 sent before the workers accept"
        status, body = http_get(f"http://127.0.0.1:{http_port}/healthz")
        assert (status, body.strip()) == (200, "OK"), "READY=1 sent before all workers are up"
        assert any(s.startswith("STATUS=") for states in got for s in states), got

        # WatchdogSec=1s: a ping every 0.5 s
        pings = [s for s in notify.collect(2.6) if "WATCHDOG=1" in s]
        assert len(pings) >= 3, f"{len(pings)} WATCHDOG=1 in 2.6 s: {notify.received}"

        # HUP: RELOADING=1, then READY=1 once the new workers accept
        master.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", 10, NOT_WIRED)
        notify.wait_for("READY=1", 20, " after RELOADING=1")
        assert port_open(port)

        master.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 10, NOT_WIRED)
        assert master.proc.wait(20) == 0
    finally:
        rc = master.stop()
        if rc != 0:
            print(master.log_text())


def test_master_leaves_the_watchdog_to_the_pid_systemd_named(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """WATCHDOG_PID names another process: the master must not ping (sd_watchdog_enabled)."""
    master, _port, _http_port = start_master(
        tmp_path, notify, 1, WATCHDOG_USEC="500000", WATCHDOG_PID="1"
    )
    try:
        notify.wait_for("READY=1", 12, NOT_WIRED)
        assert not [s for s in notify.collect(1.5) if "WATCHDOG=1" in s]
        master.proc.send_signal(signal.SIGINT)  # quick stop: STOPPING=1 too
        notify.wait_for("STOPPING=1", 10, NOT_WIRED)
        assert master.proc.wait(20) == 0
    finally:
        master.stop()
