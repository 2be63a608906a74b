"""The docs agree with the code: docs/configuration.md is generated from the option table,
docs/operations.md names every signal, metric, label value and health state the code has,
docs/migrating.md's "identical" claims hold, and file paths the docs mention exist."""

from __future__ import annotations

import importlib.util
import re
import signal
from pathlib import Path
from types import ModuleType

import pytest

from amqproxy_mp import metrics
from amqproxy_mp.config import OPTIONS, Option, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def config_doc_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_doc", ROOT / "scripts" / "config_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_option_table() -> None:
    expected = config_doc_script().render()
    actual = (DOCS / "configuration.md").read_text()
    assert actual == expected, (
        "docs/configuration.md is out of date with amqproxy_mp/config/options.py OPTIONS: "
        "run `python scripts/config_doc.py`"
    )


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_configuration_reference_names_every_option(option: Option) -> None:
    text = (DOCS / "configuration.md").read_text()
    assert f"### {option.name}\n" in text
    for name in [*option.flags, *option.switch, option.env]:
        if name:
            assert f"`{name}" in text, name
    for section, key in option.file_keys:
        assert f"`[{section}] {key}`" in text


# --------------------------------------------------------------------------- operations


OPERATIONS = (DOCS / "operations.md").read_text()


def master_signals() -> list[str]:
    from amqproxy_mp import master

    return [signal.Signals(s).name.removeprefix("SIG") for s in master.SIGNALS]


@pytest.mark.parametrize("name", [s for s in master_signals() if s != "CHLD"])
def test_operations_documents_every_signal(name: str) -> None:
    table = OPERATIONS.split("## Signals", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"^\| [^|]*\b{name}\b", table, re.M), f"SIG{name} missing"


def exported_metric_names() -> set[str]:
    source = "\n".join(
        (ROOT / "amqproxy_mp" / name).read_text()
        for name in ("metrics.py", "metrics_master.py", "master.py")
    )
    return set(re.findall(r'"(amqproxy_[a-z_]+)"', source))


@pytest.mark.parametrize("name", sorted(exported_metric_names()))
def test_operations_documents_every_metric(name: str) -> None:
    assert re.search(rf"`{name}(_total)?`", OPERATIONS), name


@pytest.mark.parametrize(
    "value",
    [
        *metrics.UPSTREAM_ERROR_REASONS,
        *metrics.CLIENT_DISCONNECT_REASONS,
        *metrics.AUTH_FAILURE_CODES,
        "exit",
        "signal",
        "clean_exit",
        "timeout",
    ],
)
def test_operations_documents_every_label_value(value: str) -> None:
    assert f"`{value}`" in OPERATIONS, value


def test_operations_documents_every_health_state() -> None:
    source = (ROOT / "amqproxy_mp" / "health.py").read_text()
    # the verdict functions of amqproxy_mp/health.py (verdict, workers_verdict)
    health = "\n".join(source.split("\ndef ")[1:])
    health = re.sub(r'"""[\s\S]*?"""', "", health)  # docstrings are not states
    pieces = set()
    for literal in re.findall(r'"([^"]*)"', health):
        for piece in re.split(r"\{[^}]*\}", literal):
            piece = piece.strip(" :()")
            if len(piece) >= 2 and piece != "of":
                pieces.add(piece)
    assert {"shutting down", "no worker alive", "OK"} <= pieces, pieces
    missing = [piece for piece in pieces if piece not in OPERATIONS]
    assert not missing, f"/healthz states not in docs/operations.md: {missing}"


@pytest.mark.parametrize(
    "topic",
    ["net.ipv4.tcp_migrate_req", "net.core.somaxconn", "ulimit -n", "LimitNOFILE", "Workers",
     "TimeoutStopSec", "stopwaitsecs", "stop_grace_period", "READY=1", "STOPPING=1",
     "WATCHDOG=1", "RELOADING=1", "/healthz", "/metrics", "/pools", "--check-config"],
)  # fmt: skip
def test_operations_covers(topic: str) -> None:
    assert topic in OPERATIONS


# --------------------------------------------------------------------------- migrating


MIGRATING = (DOCS / "migrating.md").read_text()

#: cloudamqp/amqproxy's documented names (its README and CLI).
AMQPROXY_FLAGS = [
    "-l", "--listen", "-p", "--port", "-t", "--idle-connection-timeout", "--term-timeout",
    "--term-client-close-timeout", "-d", "--debug", "-c", "--config", "-h", "--help",
    "-v", "--version",
]  # fmt: skip
AMQPROXY_ENV = ["AMQP_URL", "LISTEN_ADDRESS", "LISTEN_PORT", "IDLE_CONNECTION_TIMEOUT"]


@pytest.mark.parametrize("name", AMQPROXY_FLAGS + AMQPROXY_ENV)
def test_migrating_names_amqproxy_settings(name: str) -> None:
    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", MIGRATING), name


def test_amqproxy_command_line_is_accepted_as_is() -> None:
    config = load_config(
        ["-l", "0.0.0.0", "-p", "5999", "-t", "7", "--term-timeout", "3",
         "--term-client-close-timeout", "2", "-d", "amqps://broker.example.com"],
        {},
    ).config  # fmt: skip
    assert (config.listen_address, config.listen_port) == ("0.0.0.0", 5999)
    assert (config.idle_connection_timeout, config.term_timeout) == (7, 3)
    assert config.term_client_close_timeout == 2 and config.log_level == "debug"
    assert (config.upstream.host, config.upstream.port, config.upstream.tls) == (
        "broker.example.com",
        5671,
        True,
    )


def test_amqproxy_environment_is_accepted_as_is() -> None:
    config = load_config(
        [],
        {
            "AMQP_URL": "amqp://user:pass@broker/vhost",
            "LISTEN_ADDRESS": "127.0.0.2",
            "LISTEN_PORT": "5998",
            "IDLE_CONNECTION_TIMEOUT": "9",
        },
    )
    c = config.config
    assert (c.upstream.host, c.upstream.port, c.listen_address, c.listen_port) == (
        "broker",
        5672,
        "127.0.0.2",
        5998,
    )
    assert c.idle_connection_timeout == 9
    assert config.warnings, "credentials and vhost in the URL are ignored with a warning"


def test_amqproxy_config_file_is_accepted_as_is(tmp_path: Path) -> None:
    path = tmp_path / "amqproxy.ini"
    path.write_text(
        "upstream = amqp://broker:5700\nlog_level = WARN\nidle_connection_timeout = 11\n"
        "term_timeout = 4\nterm_client_close_timeout = 1\n\n[listen]\nbind = 0.0.0.0\n"
        "port = 5997\n"
    )
    c = load_config(["-c", str(path)], {}).config
    assert (c.upstream.port, c.log_level, c.idle_connection_timeout) == (5700, "warning", 11)
    assert (c.term_timeout, c.term_client_close_timeout) == (4, 1)
    assert (c.listen_address, c.listen_port) == ("0.0.0.0", 5997)


def test_amqproxy_defaults() -> None:
    c = load_config(["amqp://broker"], {}).config
    assert (c.listen_address, c.listen_port, c.http_port) == ("localhost", 5673, 15673)
    assert (c.idle_connection_timeout, c.term_timeout, c.term_client_close_timeout) == (5, -1, 0)


# --------------------------------------------------------------------------- paths


DOC_FILES = [
    DOCS / "operations.md",
    DOCS / "migrating.md",
    DOCS / "configuration.md",
    ROOT / "deploy" / "README.md",
    ROOT / "supervisor" / "README.md",
]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_in_docs_exist(doc: Path) -> None:
    text = doc.read_text()
    candidates = set(re.findall(r"`((?:\.\./)?[\w.-]+(?:/[\w.-]+)+/?)`", text))
    candidates |= set(
        re.findall(r"(?<![/\w])((?:\.\./)?(?:deploy|docs|supervisor|scripts|tests)/[\w./-]+)", text)
    )
    missing = []
    for path in (c.rstrip(".") for c in candidates):
        looks_like_a_file = "." in Path(path).name or path.endswith("/")
        if looks_like_a_file and not ((ROOT / path).exists() or (doc.parent / path).exists()):
            missing.append(path)
    assert not missing, f"{doc.name} mentions missing files: {missing}"
