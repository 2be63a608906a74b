"""`amqproxy --check-config FILE` for deploy pipelines: exit 0 and "FILE: OK" when the proxy would
start with `-c FILE`, else exit 2 and exactly the one-line error that start would print.
Every config file shipped in deploy/ passes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import proxy_env
from tests.support.util import REPO_ROOT

from .deploy_helpers import DEPLOY


def amqproxy(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amqproxy_mp", *args],
        capture_output=True,
        text=True,
        env=proxy_env(env),
        cwd=REPO_ROOT,
        timeout=30,
    )


@pytest.mark.parametrize(
    "path", [DEPLOY / "systemd" / "amqproxy.ini", DEPLOY / "amqproxy.yaml"], ids=lambda p: p.name
)
def test_shipped_config_files_pass(path: Path) -> None:
    result = amqproxy("--check-config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: OK\n", "")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bad-value.ini", "[main]\nupstream = amqp://127.0.0.1\nidle_connection_timeout = soon\n"),
        ("unknown-key.ini", "[main]\nupstream = amqp://127.0.0.1\nidle_timeout = 5\n"),
        ("syntax.ini", "[main\nupstream = amqp://127.0.0.1\n"),
        ("no-upstream.ini", "[main]\nlog_level = info\n"),
        ("bad.yaml", "main:\n  upstream: amqp://127.0.0.1\n  workers: many\n"),
        ("tls-half.ini", "[main]\nupstream = amqps://h\nupstream_tls_cert_file = /etc/hostname\n"),
    ],
)
def test_errors_are_what_start_would_report(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    checked = amqproxy("--check-config", str(path))
    started = amqproxy("-c", str(path))  # fails before binding anything
    assert checked.returncode == started.returncode == 2
    assert checked.stdout == ""
    assert checked.stderr == started.stderr
    assert checked.stderr.startswith("amqproxy: error: ") and checked.stderr.count("\n") == 1


def test_missing_file(tmp_path: Path) -> None:
    result = amqproxy("--check-config", str(tmp_path / "nope.ini"))
    assert result.returncode == 2
    assert "nope.ini" in result.stderr and "No such file" in result.stderr


def test_environment_and_other_arguments_count_as_at_start(tmp_path: Path) -> None:
    """A file without upstream is fine when the environment or the command line has one,
    exactly as for `amqproxy -c FILE`."""
    path = tmp_path / "partial.ini"
    path.write_text("[listen]\nport = 5999\n")
    assert amqproxy("--check-config", str(path)).returncode == 2
    assert amqproxy("--check-config", str(path), AMQP_URL="amqp://broker").returncode == 0
    assert amqproxy("--check-config", str(path), "amqp://broker").returncode == 0
    bad_env = amqproxy("--check-config", str(path), "amqp://b", LOG_LEVEL="loud")
    assert bad_env.returncode == 2 and "LOG_LEVEL" in bad_env.stderr


def test_warnings_go_to_stderr_and_still_pass(tmp_path: Path) -> None:
    path = tmp_path / "warn.ini"
    path.write_text("[main]\nupstream = amqp://user:secret@broker/vhost\n")
    result = amqproxy(f"--check-config={path}")
    assert result.returncode == 0 and result.stdout == f"{path}: OK\n"
    assert "warning" in result.stderr and "secret" not in result.stderr


def test_cannot_be_combined_with_config(tmp_path: Path) -> None:
    path = tmp_path / "ok.ini"
    path.write_text("[main]\nupstream = amqp://broker\n")
    result = amqproxy("--check-config", str(path), "-c", str(path))
    assert result.returncode == 2 and "cannot be combined" in result.stderr


def test_listed_in_help() -> None:
    assert "--check-config FILE" in amqproxy("--help").stdout
