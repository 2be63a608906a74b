"""deploy/systemd/amqproxy.service under a real systemd.

systemd is not PID 1 on this machine, so the test boots one: `systemd-nspawn --boot` on a
copy-on-write overlay of this machine's own root file system (nothing the container writes
reaches the host), with the host's network (the proxy reaches RabbitMQ on 127.0.0.1:5672 and
the test reaches the proxy). systemd starts only amqproxy.service and what it depends on
(`systemd.unit=amqproxy.service`). Inside, amqproxy is installed where the unit expects it:
a venv in /opt/amqproxy made from Debian's python3 with the project and its runtime
dependencies, and the example config in /etc/amqproxy/amqproxy.ini with test ports. The unit
file is the shipped one, unchanged; one drop-in shortens WatchdogSec so the watchdog is
exercised within the test.

Checked: Type=notify start (active only after READY=1), DynamicUser and the hardening let the
proxy run, messages flow, the watchdog keeps it alive, `systemctl reload` replaces the workers
and refuses a broken config file, `systemctl stop` drains gracefully (clients get 320 after
term_client_close_timeout, the unit ends inactive, not failed).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import psutil
import pytest
from packaging.requirements import Requirement

from tests.support.pika_client import close_reason
from tests.support.util import REPO_ROOT, wait_for

from .deploy_helpers import (
    DEPLOY,
    Daemon,
    drain_bodies,
    example_ini,
    free_ports,
    http_get,
    publish_through,
    require_tool,
    temp_queue,
)

UNIT = DEPLOY / "systemd" / "amqproxy.service"
TERM_CLIENT_CLOSE_TIMEOUT = 2
WATCHDOG_SEC = 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mounts and nspawn")


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc={result.returncode}\n{result.stderr}")
    return result


# --------------------------------------------------------------------------- the machine


@contextlib.contextmanager
def overlay_root(base: Path) -> Iterator[Path]:
    """This machine's / as a writable overlay whose changes live in a tmpfs."""
    scratch, root = base / "scratch", base / "root"
    scratch.mkdir()
    root.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(scratch))
    try:
        (scratch / "upper").mkdir()
        (scratch / "work").mkdir()
        run(
            "mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir=/,upperdir={scratch}/upper,workdir={scratch}/work", str(root),
        )  # fmt: skip
        try:
            yield root
        finally:
            run("umount", "-l", str(root), check=False)
    finally:
        run("umount", "-l", str(scratch), check=False)


def install_amqproxy(root: Path) -> None:
    """/opt/amqproxy as `python3 -m venv /opt/amqproxy && pip install .` would leave it,
    without the network: the runtime dependencies are copied from this test environment."""
    debian_python = Path("/usr/bin/python3")
    assert debian_python.exists(), "Debian's python3 is missing (apt-get install python3)"
    version = run(str(debian_python), "-c", "import sys; print(*sys.version_info[:2])").stdout
    assert tuple(map(int, version.split())) == sys.version_info[:2], (
        "the dependencies' compiled modules are copied from the test venv: it must use the "
        f"same Python minor version as /usr/bin/python3 ({version.strip()})"
    )
    venv = root / "opt/amqproxy"
    run(str(debian_python), "-m", "venv", "--without-pip", str(venv))
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = venv / "lib" / minor / "site-packages"
    for spec in importlib.metadata.requires("amqproxy-mp") or []:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        dist = importlib.metadata.distribution(requirement.name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if "__pycache__" in file.parts or not source.is_file() or ".." in file.parts:
                continue
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shutil.copytree(
        REPO_ROOT / "amqproxy_mp",
        site / "amqproxy_mp",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    script = venv / "bin/amqproxy"
    script.write_text(
        "#!/opt/amqproxy/bin/python3\nimport sys\nfrom amqproxy_mp.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    script.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(venv):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))


def install_unit(root: Path, port: int, http_port: int) -> None:
    system = root / "etc/systemd/system"
    shutil.copy(UNIT, system / "amqproxy.service")
    dropin = system / "amqproxy.service.d"
    dropin.mkdir()
    (dropin / "test.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n")
    ini = example_ini(
        port=port,
        http_port=http_port,
        workers=2,
        term_client_close_timeout=TERM_CLIENT_CLOSE_TIMEOUT,
        term_timeout=3,
    )
    (root / "etc/amqproxy").mkdir(exist_ok=True)
    (root / "etc/amqproxy/amqproxy.ini").write_text(ini)
    (root / "etc/amqproxy/amqproxy.ini").chmod(0o644)


class Machine:
    """The booted container: systemctl and journalctl run inside it through nsenter."""

    def __init__(self, nspawn: Daemon) -> None:
        self.nspawn = nspawn
        self.pid1 = 0

    def find_init(self) -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.nspawn.pid).children(recursive=True):
                if child.name() == "systemd":
                    self.pid1 = child.pid
                    return True
        return False

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("nsenter", "-t", str(self.pid1), "-a", *args, check=check, timeout=60)

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "amqproxy.service", *[f"-p{p}" for p in props])
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run("journalctl", "-u", "amqproxy.service", "--no-pager", check=False).stdout


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[tuple[Machine, int, int]]:
    nspawn = require_tool("systemd-nspawn", package="systemd-container")
    require_tool("nsenter", package="util-linux")
    port, http_port = free_ports(2)
    with overlay_root(tmp_path) as root:
        install_amqproxy(root)
        install_unit(root, port, http_port)
        daemon = Daemon(
            [
                nspawn,
                "--quiet",
                "--boot",
                f"--directory={root}",
                f"--machine=amqproxy-test-{uuid.uuid4().hex[:8]}",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--",
                "systemd.unit=amqproxy.service",
                "systemd.firstboot=off",
            ],
            tmp_path / "nspawn.log",
        )
        m = Machine(daemon)
        try:
            wait_for(
                lambda: daemon.proc.poll() is not None or m.find_init(),
                15,
                what="the container's systemd",
            )
            assert daemon.proc.poll() is None, f"systemd-nspawn exited:\n{daemon.log_text()}"
            yield m, port, http_port
        finally:
            # shown by pytest when the test failed
            if m.pid1:
                print("===== journalctl -u amqproxy =====\n" + m.journal()[-8000:])
            print("===== nspawn console =====\n" + daemon.log_text()[-3000:])
            # SIGTERM: nspawn asks the container's systemd to halt (stops the units)
            daemon.stop(signal.SIGTERM, timeout=20)


def test_unit_runs_under_real_systemd(machine: tuple[Machine, int, int]) -> None:
    m, port, http_port = machine

    def active() -> bool:
        state = m.show("ActiveState")["ActiveState"]
        assert state not in ("failed", "inactive"), f"amqproxy.service is {state}"
        return state == "active"

    # Type=notify: systemd calls it active only once the master sent READY=1
    wait_for(active, 20, interval=0.2, what="amqproxy.service active (READY=1 from the master)")
    props = m.show("MainPID", "Type", "NRestarts", "StatusText", "User", "DynamicUser")
    main_pid = props["MainPID"]
    assert props["Type"] == "notify" and props["DynamicUser"] == "yes", props
    assert props["StatusText"], "the master should set a STATUS= text"
    status = m.run("cat", f"/proc/{main_pid}/status").stdout
    uid = int(re.search(r"(?m)^Uid:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    assert uid != 0, "DynamicUser: the proxy must not run as root"
    cmdline = m.run("cat", f"/proc/{main_pid}/cmdline").stdout
    assert cmdline.startswith("amqproxy: master"), cmdline

    # the proxy works in its sandbox: health, metrics directory, messages through it
    assert http_get(f"http://127.0.0.1:{http_port}/healthz")[0] == 200
    with temp_queue("systemd") as queue:
        for i in range(20):
            publish_through(port, queue, f"systemd-{i}".encode())
        assert drain_bodies(queue) == [f"systemd-{i}".encode() for i in range(20)]
    metrics = m.run("ls", "/run/amqproxy/metrics").stdout
    assert ".db" in metrics, metrics

    # the watchdog (WatchdogSec=2s in the drop-in) does not fire: the master pings
    time.sleep(WATCHDOG_SEC * 2.5)
    props = m.show("MainPID", "NRestarts", "ActiveState", "WatchdogUSec")
    assert props["WatchdogUSec"] in ("2s", "2000000"), props
    assert (props["MainPID"], props["NRestarts"], props["ActiveState"]) == (
        main_pid,
        "0",
        "active",
    ), f"the watchdog restarted the service:\n{m.journal()[-3000:]}"

    # reload: a broken config file is refused and the running proxy is left alone
    ini = "/etc/amqproxy/amqproxy.ini"
    good = m.run("cat", ini).stdout
    m.run("sh", "-c", f"echo 'idle_connection_timeout = soon' >> {ini}")
    assert m.run("systemctl", "reload", "amqproxy.service", check=False).returncode != 0
    assert m.show("MainPID", "ActiveState") == {"MainPID": main_pid, "ActiveState": "active"}
    m.run("sh", "-c", f"cat > {ini} <<'EOF'\n{good}EOF")
    m.run("systemctl", "reload", "amqproxy.service")
    wait_for(lambda: "reload complete" in m.journal(), 20, what="'reload complete' in the journal")
    wait_for(active, 10, what="active again after the reload")
    assert m.show("MainPID")["MainPID"] == main_pid

    # stop: a connected client gets Connection.Close 320 after term_client_close_timeout
    client = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    client.channel()
    started = time.monotonic()
    m.run("systemctl", "stop", "--no-block", "amqproxy.service")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        while time.monotonic() - started < 15:
            client.process_data_events(time_limit=0.1)
    waited = time.monotonic() - started
    assert close_reason(closed.value)[0] == 320
    assert waited >= TERM_CLIENT_CLOSE_TIMEOUT - 0.5, f"closed after {waited:.1f} s"
    wait_for(
        lambda: m.show("ActiveState")["ActiveState"] == "inactive",
        10,
        what="amqproxy.service inactive",
    )
    props = m.show("Result", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainStatus": "0"}, props
