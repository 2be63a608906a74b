"""Validation of the hardening options (limits, timeouts, the AMQPS listener) through
amqproxy_mp.config.load_config: every source, exact one-line messages, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from amqproxy_mp.config import Config, LoadedConfig
from tests.unit import config_support
from tests.unit.config_support import URL


def load(argv: list[str], env: dict[str, str] | None = None) -> LoadedConfig:
    """With the upstream URL added (these tests are about the other options)."""
    return config_support.load([*argv, URL], env)


def error_of(argv: list[str], env: dict[str, str] | None = None) -> str:
    return config_support.error_of([*argv, URL], env)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    """Files that exist (the config checks existence; the master loads them later)."""
    files = {}
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("-----BEGIN SOMETHING-----\n")
        files[name] = str(tmp_path / name)
    return files


# --------------------------------------------------------------------------- defaults


def test_defaults_of_the_limits_and_the_tls_listener() -> None:
    config = load([]).config
    assert (config.tls_port, config.tls_cert_file, config.tls_key_file) == (0, None, None)
    assert config.tls_client_ca_file is None
    assert config.max_client_connections == 10000
    assert config.max_upstream_connections == 100
    assert config.max_upstream_channels == 0
    assert config.max_message_size == 128 * 1024 * 1024
    assert config.upstream_max_lifetime == 3600.0
    assert config.client_max_buffer == 32 * 1024 * 1024
    assert config.client_handshake_timeout == 10.0
    assert config.upstream_connect_timeout == 10.0


# --------------------------------------------------------------------------- the TLS listener


def test_tls_listener_beside_the_plain_one(pem: dict[str, str]) -> None:
    loaded = load(
        ["--tls-port", "5671", "--tls-cert-file", pem["cert.pem"], "--tls-key-file",
         pem["key.pem"], "--tls-client-ca-file", pem["ca.pem"]]
    )  # fmt: skip
    config = loaded.config
    assert (config.listen_port, config.tls_port) == (5673, 5671)
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
        pem["cert.pem"],
        pem["key.pem"],
        pem["ca.pem"],
    )
    assert loaded.sources["tls_port"] == "command line (--tls-port)"


def test_tls_only_listener_from_the_environment(pem: dict[str, str]) -> None:
    env = {
        "LISTEN_PORT": "0",
        "TLS_PORT": "5671",
        "TLS_CERT_FILE": pem["cert.pem"],
        "TLS_KEY_FILE": pem["key.pem"],
    }
    loaded = load([], env)
    assert (loaded.config.listen_port, loaded.config.tls_port) == (0, 5671)
    assert loaded.sources["tls_cert_file"] == "environment (TLS_CERT_FILE)"


def test_tls_listener_from_ini_and_yaml(tmp_path: Path, pem: dict[str, str]) -> None:
    ini = tmp_path / "amqproxy.ini"
    ini.write_text(
        f"[listen]\nport = 0\ntls_port = 5671\ntls_cert_file = {pem['cert.pem']}\n"
        f"tls_key_file = {pem['key.pem']}\ntls_client_ca_file = {pem['ca.pem']}\n"
    )
    yml = tmp_path / "amqproxy.yaml"
    yml.write_text(
        f"listen:\n  port: 0\n  tls_port: 5671\n  tls_cert_file: {pem['cert.pem']}\n"
        f"  tls_key_file: {pem['key.pem']}\n"
    )
    for path in (ini, yml):
        config = load(["-c", str(path)]).config
        assert (config.listen_port, config.tls_port, config.tls_key_file) == (
            0,
            5671,
            pem["key.pem"],
        ), path
    assert load(["-c", str(ini)]).sources["tls_port"] == f"config file {ini} [listen] tls_port"


@pytest.mark.parametrize("missing", ["--tls-cert-file", "--tls-key-file"])
def test_tls_port_needs_certificate_and_key(pem: dict[str, str], missing: str) -> None:
    given = {"--tls-cert-file": pem["cert.pem"], "--tls-key-file": pem["key.pem"]}
    del given[missing]
    argv = ["--tls-port", "5671"] + [x for item in given.items() for x in item]
    needed = missing.removeprefix("--").replace("-", "_")
    assert error_of(argv) == (
        f"tls_port is set (from command line (--tls-port)) but {needed} is not: "
        "the AMQPS listener needs a certificate and its key"
    )


def test_tls_port_from_env_without_files_names_the_environment() -> None:
    assert error_of([], {"TLS_PORT": "5671"}) == (
        "tls_port is set (from environment (TLS_PORT)) but tls_cert_file is not: "
        "the AMQPS listener needs a certificate and its key"
    )


def test_certificate_files_without_tls_port_are_harmless(pem: dict[str, str]) -> None:
    config = load(["--tls-cert-file", pem["cert.pem"], "--tls-key-file", pem["key.pem"]]).config
    assert config.tls_port == 0  # no listener; the files are not even needed then


@pytest.mark.parametrize(
    ("argv", "env", "source"),
    [
        (["--port", "0"], {}, "command line (--port)"),
        ([], {"LISTEN_PORT": "0"}, "environment (LISTEN_PORT)"),
        (["-p", "0", "--tls-port", "0"], {}, "command line (-p)"),
    ],
)
def test_listen_port_0_without_tls_port_listens_nowhere(
    argv: list[str], env: dict[str, str], source: str
) -> None:
    assert error_of(argv, env) == (
        f"listen_port is 0 (from {source}) and no tls_port is set: "
        "the proxy would not listen at all"
    )


def test_tls_port_equal_to_listen_port(pem: dict[str, str]) -> None:
    files = ["--tls-cert-file", pem["cert.pem"], "--tls-key-file", pem["key.pem"]]
    assert error_of(["--tls-port", "5673", *files]) == "tls_port and listen_port must differ"
    assert error_of(["-p", "6000", "--tls-port", "6000", *files]) == (
        "tls_port and listen_port must differ"
    )


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("--tls-cert-file", "tls_cert_file"),
        ("--tls-key-file", "tls_key_file"),
        ("--tls-client-ca-file", "tls_client_ca_file"),
    ],
)
def test_tls_files_must_exist(tmp_path: Path, flag: str, key: str) -> None:
    missing = str(tmp_path / "nope.pem")
    assert error_of([flag, missing]) == (
        f"{key} = {missing!r} from command line ({flag}): no such file"
    )


@pytest.mark.parametrize("value", ["-1", "65536", "x", "5671.5"])
def test_tls_port_range(value: str) -> None:
    assert error_of(["--tls-port", value]) == (
        f"tls_port = {value!r} from command line (--tls-port): "
        "expected a port number 0..65535 (0: none)"
    )


# --------------------------------------------------------------------------- limits' ranges


LIMITS = [
    # (flag, env, config key, accepted values -> parsed, refused values, allowed text)
    ("--max-client-connections", "MAX_CLIENT_CONNECTIONS", "max_client_connections",
     {"0": 0, "1": 1, "10000000": 10**7}, ["-1", "10000001", "1.5", "many"],
     "an integer >= 0 (0: no limit)"),
    ("--max-upstream-connections", "MAX_UPSTREAM_CONNECTIONS", "max_upstream_connections",
     {"0": 0, "1": 1, "65535": 65535}, ["-1", "65536", "x"],
     "an integer 0..65535 (0: no limit)"),
    ("--max-upstream-channels", "MAX_UPSTREAM_CHANNELS", "max_upstream_channels",
     {"0": 0, "2": 2, "65535": 65535}, ["-1", "65536"],
     "an integer 0..65535 (0: the broker's limit)"),
    ("--max-message-size", "MAX_MESSAGE_SIZE", "max_message_size",
     {"0": 0, "1000": 1000, str(2**63 - 1): 2**63 - 1}, ["-1", str(2**63), "1e3", "1k"],
     "a number of bytes"),
    ("--upstream-max-lifetime", "UPSTREAM_MAX_LIFETIME", "upstream_max_lifetime",
     {"0": 0.0, "2": 2.0, "0.5": 0.5}, ["-1", "inf", "nan", "soon"],
     "a number of seconds >= 0 (0: no limit)"),
    ("--client-max-buffer", "CLIENT_MAX_BUFFER", "client_max_buffer",
     {"65536": 65536, "1048576": 1048576}, ["65535", "0", "-1", "1MB"],
     "a number of bytes >= 65536"),
    ("--client-handshake-timeout", "CLIENT_HANDSHAKE_TIMEOUT", "client_handshake_timeout",
     {"1": 1.0, "0.25": 0.25}, ["0", "-1", "inf", "x"], "a number of seconds > 0"),
    ("--upstream-connect-timeout", "UPSTREAM_CONNECT_TIMEOUT", "upstream_connect_timeout",
     {"1": 1.0, "0.1": 0.1}, ["0", "-0.5", "nan"], "a number of seconds > 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "env", "key", "accepted", "refused", "allowed"), LIMITS, ids=[x[2] for x in LIMITS]
)
def test_limit_ranges_on_the_command_line(
    flag: str, env: str, key: str, accepted: dict[str, object], refused: list[str], allowed: str
) -> None:
    for text, value in accepted.items():
        loaded = load([flag, text])
        assert getattr(loaded.config, key) == value, text
        assert loaded.sources[key] == f"command line ({flag})"
    for text in refused:
        assert error_of([flag, text]) == (
            f"{key} = {text!r} from command line ({flag}): expected {allowed}"
        ), text


@pytest.mark.parametrize(
    ("flag", "env", "key", "accepted", "refused", "allowed"), LIMITS, ids=[x[2] for x in LIMITS]
)
def test_limit_ranges_from_the_environment_and_files(
    tmp_path: Path,
    flag: str,
    env: str,
    key: str,
    accepted: dict[str, object],
    refused: list[str],
    allowed: str,
) -> None:
    text, value = next(iter(accepted.items()))
    assert getattr(load([], {env: text}).config, key) == value
    assert error_of([], {env: refused[0]}) == (
        f"{key} = {refused[0]!r} from environment ({env}): expected {allowed}"
    )
    ini = tmp_path / "limits.ini"
    ini.write_text(f"[main]\n{key} = {refused[0]}\n")
    assert error_of(["-c", str(ini)]) == (
        f"{key} = {refused[0]!r} from config file {ini} [main]: expected {allowed}"
    )
    yml = tmp_path / "limits.yaml"
    yml.write_text(f"main:\n  {key}: {text}\n")
    assert getattr(load(["-c", str(yml)]).config, key) == value


def test_yaml_limits_must_have_the_right_type(tmp_path: Path) -> None:
    yml = tmp_path / "limits.yaml"
    yml.write_text("main:\n  max_client_connections: '2'\n")
    assert error_of(["-c", str(yml)]) == (
        f"max_client_connections = '2' from config file {yml} [main]: "
        "expected an integer >= 0 (0: no limit), not a string"
    )
    yml.write_text("main:\n  max_message_size: 1.5\n")
    assert error_of(["-c", str(yml)]).endswith("expected a number of bytes, not a number")
    yml.write_text("main:\n  upstream_max_lifetime: 2.5\n  client_handshake_timeout: 1\n")
    config = load(["-c", str(yml)]).config
    assert (config.upstream_max_lifetime, config.client_handshake_timeout) == (2.5, 1.0)


def test_every_new_option_is_a_config_field() -> None:
    fields = set(Config.__dataclass_fields__)
    for _, _, key, *_ in LIMITS:
        assert key in fields
    assert {"tls_port", "tls_cert_file", "tls_key_file", "tls_client_ca_file"} <= fields
