"""supervisor/amqproxy.conf under the real supervisord (the `supervisor` package from PyPI).

supervisord runs in the foreground with an HTTP control port on 127.0.0.1 and everything in a
test-owned directory. The program section is the shipped one with only these changes: the
amqproxy binary and config file paths, the log file path, and no `user=` (the test runs the
proxy as its own user). The config file is deploy/systemd/amqproxy.ini with test ports and
short drain timeouts.
"""

from __future__ import annotations

import configparser
import contextlib
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psutil
import pytest

from amqproxy_mp.config import load_config
from tests.support.pika_client import close_reason
from tests.support.proxy import proxy_env
from tests.support.util import REPO_ROOT, wait_for

from .deploy_helpers import (
    EXAMPLE_INI,
    Daemon,
    drain_bodies,
    example_ini,
    free_ports,
    http_get,
    port_open,
    publish_through,
    substitute,
    temp_queue,
)

PROGRAM_CONF = REPO_ROOT / "supervisor" / "amqproxy.conf"
TERM_CLIENT_CLOSE_TIMEOUT = 2


def program_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read(PROGRAM_CONF)
    return parser["program:amqproxy"]


def test_program_section_fits_the_graceful_shutdown() -> None:
    program = program_section()
    assert program["stopsignal"] == "TERM"
    assert program.getboolean("stopasgroup") is False, "TERM must reach the master only"
    assert program.getboolean("killasgroup") is True, "a final SIGKILL must reach the workers"
    assert program.getboolean("autorestart") is True
    assert program["command"] == "/opt/amqproxy/bin/amqproxy --config /etc/amqproxy/amqproxy.ini"
    assert program["stdout_logfile"] and program.getboolean("redirect_stderr")
    assert program["environment"] == 'PYTHONMALLOC="malloc"'  # memory given back after storms
    config = load_config(["--config", str(EXAMPLE_INI)], {}).config
    drain = config.term_client_close_timeout + config.term_timeout
    assert config.term_timeout >= 0 and int(program["stopwaitsecs"]) >= drain + 5, (
        f"stopwaitsecs={program['stopwaitsecs']} leaves no margin over "
        f"term_client_close_timeout + term_timeout = {drain:g} s in {EXAMPLE_INI.name}"
    )


def supervisord_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: install supervisor from PyPI into the test venv "
            "(scripts/test does it: pip install supervisor)",
            pytrace=False,
        )
    return str(path)


@dataclass
class Supervised:
    daemon: Daemon
    ctl_url: str
    port: int
    http_port: int
    workdir: Path

    @property
    def rpc(self) -> Any:
        return xmlrpc.client.ServerProxy(f"{self.ctl_url}/RPC2").supervisor

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.rpc.getProcessInfo("amqproxy")
        return info

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [supervisord_bin("supervisorctl"), "-s", self.ctl_url, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_running(self, not_pid: int = 0, timeout: float = 20) -> int:
        def running() -> int:
            info = self.info()
            assert info["statename"] in ("STARTING", "RUNNING", "BACKOFF"), info
            return int(info["pid"]) if info["statename"] == "RUNNING" else 0

        try:
            pid: int = wait_for(
                lambda: (p := running()) and p != not_pid and p,
                timeout,
                interval=0.2,
                what="amqproxy RUNNING under supervisord",
            )
        except AssertionError as exc:
            tail = "\n".join(self.proxy_log().splitlines()[-8:])
            raise AssertionError(f"{exc}\nlast lines of the proxy's log:\n{tail}") from None
        wait_for(lambda: port_open(self.port), 10, what="the proxy port")
        return pid

    def proxy_log(self) -> str:
        path = self.workdir / "amqproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    port, http_port, ctl_port = free_ports(3)
    ini = tmp_path / "amqproxy.ini"
    ini.write_text(
        example_ini(
            port=port,
            http_port=http_port,
            workers=2,
            term_client_close_timeout=TERM_CLIENT_CLOSE_TIMEOUT,
            term_timeout=3,
        )
    )
    program = substitute(
        PROGRAM_CONF.read_text(),
        {
            "/opt/amqproxy/bin/amqproxy": str(Path(sys.executable).parent / "amqproxy"),
            "/etc/amqproxy/amqproxy.ini": str(ini),
            "\nuser=amqproxy\n": "\n",
            "/var/log/amqproxy/amqproxy.log": str(tmp_path / "amqproxy.log"),
        },
        PROGRAM_CONF.name,
    )
    (tmp_path / "amqproxy.conf").write_text(program)
    (tmp_path / "supervisord.conf").write_text(
        f"""\
[inet_http_server]
port = 127.0.0.1:{ctl_port}

[supervisord]
nodaemon = true
logfile = {tmp_path}/supervisord.log
pidfile = {tmp_path}/supervisord.pid
childlogdir = {tmp_path}
directory = {tmp_path}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = http://127.0.0.1:{ctl_port}

[include]
files = {tmp_path}/amqproxy.conf
"""
    )
    daemon = Daemon(
        [supervisord_bin("supervisord"), "-c", str(tmp_path / "supervisord.conf")],
        tmp_path / "supervisord.out",
        env=proxy_env(),
        cwd=tmp_path,
    )
    s = Supervised(daemon, f"http://127.0.0.1:{ctl_port}", port, http_port, tmp_path)
    try:
        wait_for(lambda: port_open(ctl_port), 15, what="supervisord's control port")
        yield s
    finally:
        daemon.stop(signal.SIGTERM, timeout=20)
        print("===== supervisord.log =====")
        print((tmp_path / "supervisord.log").read_text(errors="replace")[-4000:])
        print("===== amqproxy.log =====")
        print(s.proxy_log()[-6000:])


def children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def test_messages_flow_through_the_supervised_proxy(supervised: Supervised) -> None:
    s = supervised
    master = s.wait_running()
    assert len(children(master)) == 2
    wait_for(lambda: http_get(f"http://127.0.0.1:{s.http_port}/healthz")[0] == 200, 10)
    with temp_queue("supervisor") as queue:
        for i in range(50):
            publish_through(s.port, queue, f"m-{i}".encode())
        assert drain_bodies(queue) == [f"m-{i}".encode() for i in range(50)]


def test_a_killed_master_is_restarted(supervised: Supervised) -> None:
    s = supervised
    master = s.wait_running()
    workers = children(master)
    assert len(workers) == 2, workers
    try:
        psutil.Process(master).kill()  # kill -9: no chance to clean up
        # the old master's workers must not linger, holding the port for nobody
        wait_for(
            lambda: not [p for p in workers if psutil.pid_exists(p)],
            10,
            what=f"the killed master's orphaned workers {workers} to exit",
        )
    finally:
        for pid in workers:  # whatever the outcome, this test's processes go
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    new_master = s.wait_running(not_pid=master, timeout=20)
    assert new_master != master
    wait_for(
        lambda: http_get(f"http://127.0.0.1:{s.http_port}/healthz")[0] == 200,
        15,
        what="/healthz 200 from the new master",
    )
    assert len(children(new_master)) == 2
    with temp_queue("supervisor") as queue:
        for i in range(20):
            publish_through(s.port, queue, f"after-{i}".encode())
        assert drain_bodies(queue) == [f"after-{i}".encode() for i in range(20)]


def test_supervisorctl_stop_drains_gracefully(supervised: Supervised) -> None:
    s = supervised
    master = s.wait_running()
    workers = children(master)
    client = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.port))
    client.channel()
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    started = time.monotonic()
    stopper = threading.Thread(target=lambda: result.update(stop=s.ctl("stop", "amqproxy")))
    stopper.start()
    try:
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            while time.monotonic() - started < 20:
                client.process_data_events(time_limit=0.1)
        closed_after = time.monotonic() - started
    finally:
        stopper.join(60)
    assert close_reason(closed.value)[0] == 320
    assert closed_after >= TERM_CLIENT_CLOSE_TIMEOUT - 0.5, f"320 after {closed_after:.1f} s"
    stop = result["stop"]
    assert stop.returncode == 0 and "amqproxy: stopped" in stop.stdout, stop
    info = s.info()
    assert (info["statename"], info["exitstatus"]) == ("STOPPED", 0), info
    log = (s.workdir / "supervisord.log").read_text()
    assert "stopped: amqproxy (exit status 0)" in log, log
    assert "SIGKILL" not in log
    assert not [p for p in [master, *workers] if psutil.pid_exists(p)]
    assert "graceful stop" in s.proxy_log()
