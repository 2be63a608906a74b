"""The `amqproxy` command as an operator sees it: exit codes, one-line errors, help, logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amqproxy_mp import __version__
from amqproxy_mp.cli import main
from amqproxy_mp.config import OPTIONS
from amqproxy_mp.logs import _stderr_is_journal, setup_logging

REPO_ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's own environment must not leak settings into the proxy."""
    env = {k: v for k, v in os.environ.items() if k not in {o.env for o in OPTIONS}}
    env.pop("JOURNAL_STREAM", None)
    env.update(extra)
    return env


def amqproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amqproxy_mp", *args],
        cwd=REPO_ROOT,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version() -> None:
    for flag in ("-v", "--version"):
        result = amqproxy(flag)
        assert result.returncode == 0
        assert result.stdout == f"amqproxy-mp {__version__}\n"
        assert result.stderr == ""


def test_help_lists_every_option_with_its_env_var_and_default() -> None:
    result = amqproxy("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: amqproxy [options] [amqp upstream url ...]")
    text = " ".join(result.stdout.split())  # undo line wrapping
    for option in OPTIONS:
        if option.env:
            assert f"env {option.env}" in text
    for flag in ("-l", "--listen", "-p", "--port", "-b", "--http-port", "-d", "--debug", "-t"):
        assert flag in text
    assert "--idle-connection-timeout" in text
    assert "--upstream-tls-insecure-skip-verify" in text
    assert "-c FILE, --config FILE" in text
    assert "--print-config" in text
    assert "default: 5673" in text
    assert "default: localhost" in text
    assert "default: -1 (wait forever)" in text
    assert amqproxy("-h").stdout == result.stdout


def test_help_and_version_work_without_an_upstream_even_with_a_bad_environment() -> None:
    assert amqproxy("-h", env=clean_env(LISTEN_PORT="nope")).returncode == 0
    assert amqproxy("-v", env=clean_env(LISTEN_PORT="nope")).returncode == 0


def test_print_config_with_file_cli_and_env(tmp_path: Path) -> None:
    ini = tmp_path / "amqproxy.ini"
    ini.write_text("[main]\nidle_connection_timeout = 9\n[listen]\nbind = 127.0.0.1\n")
    env = clean_env(
        AMQP_URL="amqp://env-host",
        IDLE_CONNECTION_TIMEOUT="1",
        LISTEN_PORT="7000",
        HTTP_PORT="8000",
    )
    result = amqproxy(
        "--print-config", "-c", str(ini), "-t", "2", "-b", "9000", "amqps://user:pw@cli-host",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(rows) == {option.name for option in OPTIONS}
    assert rows["upstream"].split()[1] == "amqps://cli-host:5671"
    assert rows["upstream"].endswith("command line (argument)")
    assert rows["idle_connection_timeout"].split()[1] == "9"
    assert rows["idle_connection_timeout"].endswith(
        f"config file {ini} [main] idle_connection_timeout"
    )
    assert rows["listen_address"].split()[1] == "127.0.0.1"
    assert rows["listen_address"].endswith(f"config file {ini} [listen] bind")
    assert rows["listen_port"].split()[1] == "7000"
    assert rows["listen_port"].endswith("environment (LISTEN_PORT)")
    assert rows["http_port"].split()[1] == "9000"
    assert rows["http_port"].endswith("command line (-b)")
    assert rows["log_level"].split()[1:] == ["info", "default"]
    assert rows["config_file"].split()[1] == str(ini)
    # the credentials warning goes to stderr, without the password
    assert result.stderr.startswith("amqproxy: warning: the upstream URL contains a user name")
    assert "pw" not in result.stderr.replace("password", "")
    assert "pw" not in result.stdout.replace("password", "")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--no-such-option", "amqp://h"], {}, "unrecognized arguments: --no-such-option"),
        (["amqp://h", "--port"], {}, "argument -p/--port/--listen-port: expected one argument"),
        (["-t", "abc", "amqp://h"], {}, "idle_connection_timeout = 'abc' from command line (-t)"),
        (
            ["amqp://h"],
            {"LISTEN_PORT": "0"},
            "listen_port is 0 (from environment (LISTEN_PORT)) and no tls_port is set",
        ),
        (["ftp://h"], {}, "upstream = 'ftp://h' from command line (argument)"),
        ([], {}, "no upstream broker configured"),
        (["-c", "/nonexistent/amqproxy.ini", "amqp://h"], {}, "cannot read config file"),
    ],
)
def test_errors_are_one_line_and_exit_code_2(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    result = amqproxy(*args, env=clean_env(**env))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("amqproxy: error: ")
    assert expected in lines[0]


def test_bad_config_file_value_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "amqproxy.yaml"
    path.write_text("main:\n  upstream: amqp://h\n  client_heartbeat: often\n")
    result = amqproxy("-c", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        f"amqproxy: error: client_heartbeat = 'often' from config file {path} [main]: "
        "expected an integer 0..65535 (0: no heartbeats), not a string\n"
    )


def test_main_in_process_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"amqproxy-mp {__version__}\n"
    assert main(["--bogus"]) == 2
    assert capsys.readouterr().err.startswith("amqproxy: error: unrecognized arguments")


# --- logging ----------------------------------------------------------------------------------


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What the root logger wrote; pytest swaps sys.stderr per phase, so capsys holds it."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield lambda: capsys.readouterr().err
    root.handlers[:], root.level = saved[0], saved[1]


def test_plain_log_format(stderr: Callable[[], str]) -> None:
    setup_logging("info", {})
    logging.getLogger("amqproxy_mp.proxy.client").info("hello %s", "world")
    logging.getLogger("x").debug("hidden")
    line = stderr()
    date, time, level, pid, rest = line.split(" ", 4)
    assert len(date) == 10 and date[4] == "-"
    assert "," in time
    assert level == "INFO"
    assert pid == f"[{os.getpid()}]"
    assert rest == "amqproxy_mp.proxy.client: hello world\n"


def test_journal_log_format_and_idempotence(stderr: Callable[[], str]) -> None:
    setup_logging("debug", {"JOURNAL_STREAM": "8:12345"})
    setup_logging("debug", {"JOURNAL_STREAM": "8:12345"})  # no second handler
    log = logging.getLogger("amqproxy_mp.worker")
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        log.log(level, "m")
    prefix = f"[{os.getpid()}] amqproxy_mp.worker: m"
    assert stderr().splitlines() == [f"<{p}>{prefix}" for p in (7, 6, 4, 3, 2)]


def test_journal_traceback_lines_keep_the_priority(stderr: Callable[[], str]) -> None:
    setup_logging("info", {"JOURNAL_STREAM": "8:1"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("t").exception("failed")
    lines = stderr().splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


def test_journal_stream_must_match_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd's advice: a child whose stderr was redirected still inherits JOURNAL_STREAM.
    with open(tmp_path / "stderr.log", "w") as file:
        monkeypatch.setattr(sys, "stderr", file)
        stat = os.fstat(file.fileno())
        assert _stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
        assert not _stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
        assert not _stderr_is_journal({})


def test_unknown_log_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud", {})
