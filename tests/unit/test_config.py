"""Configuration: precedence, file formats, URL parsing and one-line errors that name the source."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from amqproxy_mp.config import (
    OPTIONS,
    Config,
    Upstream,
    format_config,
)
from amqproxy_mp.config.model import available_cpus, default_workers
from tests.unit.config_support import URL, error_of, load, write

# --- the table -------------------------------------------------------------------------------


def test_every_config_field_has_exactly_one_option_with_the_same_default() -> None:
    names = [option.name for option in OPTIONS]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(Config))
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for option in OPTIONS:
        if option.name != "upstream":
            assert option.default == defaults[option.name], option.name


def test_defaults() -> None:
    loaded = load([URL])
    assert loaded.config == Config(upstream=Upstream("amqp", "broker.example.com", 5672))
    assert loaded.sources["upstream"] == "command line (argument)"
    assert all(loaded.sources[o.name] == "default" for o in OPTIONS if o.name != "upstream")
    assert loaded.warnings == []


# --- precedence --------------------------------------------------------------------------------


def test_precedence_file_beats_cli_beats_env_beats_default(tmp_path: Path) -> None:
    ini = write(
        tmp_path,
        "amqproxy.ini",
        "[main]\nidle_connection_timeout = 30\nupstream = amqps://file-host\n",
    )
    env = {
        "IDLE_CONNECTION_TIMEOUT": "10",
        "LISTEN_PORT": "1111",
        "HTTP_PORT": "2222",
        "AMQP_URL": "amqp://env-host",
        "CLIENT_HEARTBEAT": "15",
    }
    argv = ["-c", ini, "-t", "20", "--port", "3333", "amqp://cli-host"]
    loaded = load(argv, env)
    config, sources = loaded.config, loaded.sources

    assert config.idle_connection_timeout == 30.0
    assert sources["idle_connection_timeout"] == f"config file {ini} [main] idle_connection_timeout"
    assert config.upstream == Upstream("amqps", "file-host", 5671)
    assert sources["upstream"] == f"config file {ini} [main] upstream"
    assert config.listen_port == 3333
    assert sources["listen_port"] == "command line (--port)"
    assert config.http_port == 2222
    assert sources["http_port"] == "environment (HTTP_PORT)"
    assert config.client_heartbeat == 15
    assert sources["client_heartbeat"] == "environment (CLIENT_HEARTBEAT)"
    assert config.upstream_heartbeat == 60
    assert sources["upstream_heartbeat"] == "default"
    assert config.config_file == ini
    assert sources["config_file"] == "command line (-c)"


def test_cli_beats_env_for_the_upstream() -> None:
    loaded = load(["amqp://cli-host"], {"AMQP_URL": "amqp://env-host"})
    assert loaded.config.upstream.host == "cli-host"
    loaded = load([], {"AMQP_URL": "amqp://env-host"})
    assert loaded.config.upstream.host == "env-host"
    assert loaded.sources["upstream"] == "environment (AMQP_URL)"


def test_empty_environment_variable_counts_as_unset() -> None:
    loaded = load([URL], {"LISTEN_PORT": "", "LOG_LEVEL": ""})
    assert loaded.config.listen_port == 5673
    assert loaded.sources["listen_port"] == "default"


def test_only_the_winning_value_is_validated() -> None:
    # An unrelated LOG_LEVEL in the environment does not matter when -d overrides it.
    loaded = load([URL, "-d"], {"LOG_LEVEL": "verbose"})
    assert loaded.config.log_level == "debug"
    assert loaded.sources["log_level"] == "command line (-d)"


def test_cli_flags_and_aliases() -> None:
    argv = [
        *("-l", "0.0.0.0", "-b", "8080", "--term-timeout", "-1", "--log-level", "WARN"),
        *("--max-upstream-channels", "100", "--client-heartbeat", "0", "--upstream-heartbeat"),
        *("30", "--client-handshake-timeout", "2.5", "--upstream-connect-timeout", "3"),
        *("--term-client-close-timeout", "1.5", "--upstream-tls-insecure-skip-verify", URL),
    ]
    config = load(argv).config
    assert config.listen_address == "0.0.0.0"
    assert config.http_port == 8080
    assert config.term_timeout == -1.0
    assert config.log_level == "warning"
    assert config.max_upstream_channels == 100
    assert config.client_heartbeat == 0
    assert config.upstream_heartbeat == 30
    assert config.client_handshake_timeout == 2.5
    assert config.upstream_connect_timeout == 3.0
    assert config.term_client_close_timeout == 1.5
    assert config.upstream_tls_insecure_skip_verify is True

    long_forms = ["--listen=::1", "--idle-connection-timeout=0", "--debug", URL]
    config = load(long_forms).config
    assert (config.listen_address, config.idle_connection_timeout, config.log_level) == (
        "::1",
        0.0,
        "debug",
    )


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("debug", "debug"),
        ("DEBUG", "debug"),
        ("Info", "info"),
        ("warn", "warning"),
        ("WARNING", "warning"),
        ("error", "error"),
        ("fatal", "critical"),
        ("CRITICAL", "critical"),
    ],
)
def test_log_level_is_normalised(text: str, level: str) -> None:
    assert load([URL], {"LOG_LEVEL": text}).config.log_level == level


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("YES", True), ("1", True), ("on", True)],
        *[("false", False), ("No", False), ("0", False), ("off", False)],
    ],
)
def test_bool_values(text: str, value: bool) -> None:
    env = {"UPSTREAM_TLS_INSECURE_SKIP_VERIFY": text}
    assert load(["amqps://h"], env).config.upstream_tls_insecure_skip_verify is value


# --- config files ------------------------------------------------------------------------------


FULL_INI = """\
# comment
[main]
upstream = amqps://rabbit.example.com:5674
log_level = warn
http_port = 15999
idle_connection_timeout = 7.5  ; inline comment
max_upstream_channels = 512
term_client_close_timeout = 2
term_timeout = 10
client_heartbeat = 20
upstream_heartbeat = 25
client_handshake_timeout = 4
upstream_connect_timeout = 6
upstream_tls_insecure_skip_verify = yes

[listen]
address = 127.0.0.2
port = 5999
"""


def test_ini_file(tmp_path: Path) -> None:
    path = write(tmp_path, "amqproxy.ini", FULL_INI)
    config = load(["-c", path]).config
    assert config == Config(
        upstream=Upstream("amqps", "rabbit.example.com", 5674),
        listen_address="127.0.0.2",
        listen_port=5999,
        http_port=15999,
        log_level="warning",
        idle_connection_timeout=7.5,
        max_upstream_channels=512,
        term_client_close_timeout=2.0,
        term_timeout=10.0,
        client_heartbeat=20,
        upstream_heartbeat=25,
        client_handshake_timeout=4.0,
        upstream_connect_timeout=6.0,
        upstream_tls_insecure_skip_verify=True,
        config_file=path,
    )


def test_ini_bind_is_an_alias_of_address(tmp_path: Path) -> None:
    path = write(tmp_path, "a.ini", "[listen]\nbind = 0.0.0.0\n")
    loaded = load(["-c", path, URL])
    assert loaded.config.listen_address == "0.0.0.0"
    assert loaded.sources["listen_address"] == f"config file {path} [listen] bind"


def test_ini_keys_before_any_section_belong_to_main(tmp_path: Path) -> None:
    # cloudamqp/amqproxy reads keys before the first section header as [main].
    path = write(tmp_path, "a.conf", f"upstream = {URL}\n[listen]\nport = 6000\n")
    loaded = load(["-c", path])
    assert loaded.config.upstream.host == "broker.example.com"
    assert loaded.config.listen_port == 6000


def test_ini_log_level_in_listen_section_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "a.ini", "[listen]\nlog_level = debug\n")
    assert load(["-c", path, URL]).config.log_level == "debug"


def test_address_and_bind_together_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "a.ini", "[listen]\naddress = ::1\nbind = 0.0.0.0\n")
    message = error_of(["-c", path, URL])
    assert "listen_address is set twice" in message
    assert path in message


YAML_TEXT = """\
main:
  upstream: amqp://[fd00::1]:5680
  log_level: ERROR
  idle_connection_timeout: 3
  term_timeout: 2.5
  http_port: 16000
  upstream_tls_insecure_skip_verify: false
listen:
  {key}: "::"
  port: 6001
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
@pytest.mark.parametrize("key", ["address", "bind"])
def test_yaml_file(tmp_path: Path, suffix: str, key: str) -> None:
    path = write(tmp_path, "amqproxy" + suffix, YAML_TEXT.format(key=key))
    loaded = load(["-c", path, "-p", "1"])
    config = loaded.config
    assert config.upstream == Upstream("amqp", "fd00::1", 5680)
    assert config.log_level == "error"
    assert config.idle_connection_timeout == 3.0
    assert config.term_timeout == 2.5
    assert config.http_port == 16000
    assert config.listen_address == "::"
    assert config.listen_port == 6001
    assert loaded.sources["listen_port"] == f"config file {path} [listen] port"
    assert loaded.sources["listen_address"] == f"config file {path} [listen] {key}"


def test_empty_files_are_fine(tmp_path: Path) -> None:
    for name in ("empty.ini", "empty.yaml"):
        path = write(tmp_path, name, "")
        assert load(["-c", path, URL]).config.listen_port == 5673
    path = write(tmp_path, "sections.yaml", "main:\nlisten:\n")
    assert load(["-c", path, URL]).config.listen_port == 5673


# --- errors: bad values, named with their key and source -------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"IDLE_CONNECTION_TIMEOUT": "abc"}, "number of seconds >= 0"),
        ({"IDLE_CONNECTION_TIMEOUT": "-1"}, "number of seconds >= 0"),
        ({"IDLE_CONNECTION_TIMEOUT": "nan"}, "number of seconds >= 0"),
        ({"IDLE_CONNECTION_TIMEOUT": "inf"}, "number of seconds >= 0"),
        ({"LISTEN_PORT": "-1"}, "0..65535"),
        ({"LISTEN_PORT": "65536"}, "0..65535"),
        ({"LISTEN_PORT": "5673.0"}, "0..65535"),
        ({"HTTP_PORT": "http"}, "1..65535"),
        ({"LOG_LEVEL": "verbose"}, "debug, info, warning"),
        ({"MAX_UPSTREAM_CHANNELS": "65536"}, "0..65535"),
        ({"MAX_UPSTREAM_CHANNELS": "-1"}, "0..65535"),
        ({"TERM_TIMEOUT": "-2"}, "-1 (wait forever) or a number of seconds >= 0"),
        ({"TERM_CLIENT_CLOSE_TIMEOUT": "-0.5"}, "number of seconds >= 0"),
        ({"CLIENT_HEARTBEAT": "-1"}, "0..65535"),
        ({"UPSTREAM_HEARTBEAT": "70000"}, "0..65535"),
        ({"CLIENT_HANDSHAKE_TIMEOUT": "0"}, "number of seconds > 0"),
        ({"UPSTREAM_CONNECT_TIMEOUT": "-3"}, "number of seconds > 0"),
        ({"UPSTREAM_TLS_INSECURE_SKIP_VERIFY": "maybe"}, "true/false, yes/no, on/off, 1/0"),
        ({"LISTEN_ADDRESS": "local host"}, "host name or IP address"),
        ({"UPSTREAM_TLS_CA_FILE": "/nonexistent/ca.pem"}, "no such file"),
    ],
)
def test_bad_environment_values(env: dict[str, str], expected: str) -> None:
    [(var, value)] = env.items()
    message = error_of([URL], env)
    option = next(o for o in OPTIONS if o.env == var)
    assert message.startswith(f"{option.name} = {value!r} from environment ({var}): ")
    assert expected in message


@pytest.mark.parametrize(
    ("argv", "start", "expected"),
    [
        (["-t", "abc"], "idle_connection_timeout = 'abc' from command line (-t)", ">= 0"),
        (["--port", "x"], "listen_port = 'x' from command line (--port)", "0..65535"),
        (["-p", "99999"], "listen_port = '99999' from command line (-p)", "0..65535"),
        (["--log-level", "loud"], "log_level = 'loud' from command line (--log-level)", "debug"),
        (["--client-handshake-timeout", "0"], "client_handshake_timeout = '0'", "> 0"),
        (["--worker-timeout", "0.5"], "worker_timeout = '0.5'", ">= 1 (workers beat every"),
    ],
)
def test_bad_command_line_values(argv: list[str], start: str, expected: str) -> None:
    message = error_of([*argv, URL])
    assert message.startswith(start)
    assert expected in message


def test_bad_ini_value_message(tmp_path: Path) -> None:
    path = write(tmp_path, "amqproxy.ini", "[main]\nidle_connection_timeout = abc\n")
    assert error_of(["-c", path, URL]) == (
        f"idle_connection_timeout = 'abc' from config file {path} [main]: "
        "expected a number of seconds >= 0"
    )


def test_bad_ini_alias_value_names_the_key_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, "amqproxy.ini", "[listen]\nport = 5673x\n")
    assert error_of(["-c", path, URL]).startswith(
        f"port = '5673x' from config file {path} [listen]"
    )


@pytest.mark.parametrize(
    ("text", "start", "expected"),
    [
        ("listen:\n  port: '5673'\n", "port = '5673' from config file {} [listen]", "not a string"),
        ("main:\n  idle_connection_timeout: true\n", "idle_connection_timeout = True", "boolean"),
        ("main:\n  idle_connection_timeout: [1]\n", "idle_connection_timeout = [1]", "a list"),
        ("main:\n  client_heartbeat: 1.5\n", "client_heartbeat = 1.5", "not a number"),
        ("main:\n  upstream_tls_insecure_skip_verify: 'yes'\n", "upstream_tls", "a string"),
        ("main:\n  upstream_tls_insecure_skip_verify: 1\n", "upstream_tls", "an integer"),
        ("main:\n  log_level: 3\n", "log_level = 3", "an integer"),
        ("main:\n  log_level:\n", "log_level = None", "null"),
        ("listen:\n  port: -1\n", "port = -1 from config file {} [listen]", "0..65535"),
    ],
)
def test_bad_yaml_values(tmp_path: Path, text: str, start: str, expected: str) -> None:
    path = write(tmp_path, "amqproxy.yaml", text)
    message = error_of(["-c", path, URL])
    assert message.startswith(start.format(path))
    assert path in message
    assert expected in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "a.ini",
            "[main]\nidle_timeout = 5\n",
            "unknown key 'idle_timeout' in config file {} [main]",
        ),
        ("a.ini", "[main]\nidle_timeout = 5\n", "allowed keys in [main]: upstream,"),
        (
            "a.ini",
            "[main]\nidle_conection_timeout = 5\n",
            "(did you mean 'idle_connection_timeout'?)",
        ),
        ("a.ini", "[listen]\nhost = x\n", "allowed keys in [listen]: address, bind, port"),
        ("a.ini", "[server]\nport = 1\n", "unknown section [server] in config file {}"),
        ("a.ini", "[server]\nport = 1\n", "allowed sections: [main], [listen]"),
        ("a.ini", "[DEFAULT]\nport = 1\n", "unknown section [DEFAULT]"),
        ("a.yml", "main:\n  idle_timeout: 5\n", "unknown key 'idle_timeout' in config file {}"),
        ("a.yml", "server:\n  port: 1\n", "unknown section [server] in config file {}"),
        (
            "a.yml",
            "- main\n",
            "config file {}: expected a mapping with the sections main:, listen:",
        ),
        ("a.yml", "main: 5\n", "config file {}: section main: must be a mapping"),
    ],
)
def test_unknown_keys_and_sections(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    assert expected.format(path) in error_of(["-c", path, URL])


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("a.ini", "[main\nupstream = x\n", "syntax error at line 1"),
        ("a.ini", "[main]\njust words\n", "syntax error at line 2: 'just words'"),
        ("a.ini", "words first\n", "syntax error at line 1: 'words first'"),
        ("a.ini", "[main]\n[main]\n", "section [main] appears twice (line 2)"),
        ("a.ini", "[main]\nhttp_port = 1\nhttp_port = 2\n", "'http_port' appears twice (line 3)"),
        ("a.yaml", "main:\n  http_port: [1\n", "YAML syntax error at line"),
        ("a.yaml", "main: {\n", "YAML syntax error"),
        ("a.yaml", "main:\n  http_port: 1\n  http_port: 2\n", "duplicate key 'http_port'"),
    ],
)
def test_file_syntax_errors(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    message = error_of(["-c", path, URL])
    assert f"config file {path}" in message
    assert expected in message


def test_missing_and_unreadable_config_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.ini")
    message = error_of(["-c", missing, URL])
    assert message == (
        f"cannot read config file {missing} (from command line (-c)): No such file or directory"
    )
    message = error_of(["--config", str(tmp_path), URL])
    assert f"cannot read config file {tmp_path} (from command line (--config))" in message
    binary = tmp_path / "binary.ini"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in error_of(["-c", str(binary), URL])


def test_tls_files(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert.pem", "cert")
    key = write(tmp_path, "key.pem", "key")
    ca = write(tmp_path, "ca.pem", "ca")
    env = {"UPSTREAM_TLS_CA_FILE": ca, "UPSTREAM_TLS_KEY_FILE": key}
    loaded = load(["amqps://h", "--upstream-tls-cert-file", cert], env)
    config = loaded.config
    assert (config.upstream_tls_ca_file, config.upstream_tls_cert_file) == (ca, cert)
    assert config.upstream_tls_key_file == key
    assert config.upstream.tls
    assert loaded.warnings == []


def test_tls_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    ini = write(tmp_path, "a.ini", f"[main]\nupstream_tls_ca_file = {missing}\n")
    message = error_of(["-c", ini, "amqps://h"])
    assert message.startswith(f"upstream_tls_ca_file = {missing!r} from config file {ini} [main]")
    assert "no such file" in message


def test_tls_cert_without_key_and_key_without_cert(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert.pem", "cert")
    message = error_of(["amqps://h", "--upstream-tls-cert-file", cert])
    assert message == (
        "upstream_tls_cert_file is set (from command line (--upstream-tls-cert-file)) "
        "but upstream_tls_key_file is not: set both or neither"
    )
    message = error_of(["amqps://h"], {"UPSTREAM_TLS_KEY_FILE": cert})
    assert "upstream_tls_key_file is set (from environment (UPSTREAM_TLS_KEY_FILE))" in message


def test_tls_options_with_a_plain_upstream_warn(tmp_path: Path) -> None:
    loaded = load([URL, "--upstream-tls-insecure-skip-verify"])
    assert loaded.warnings == [
        "upstream_tls_insecure_skip_verify ignored: the upstream amqp://broker.example.com:5672 "
        "does not use TLS (use amqps://)"
    ]


# --- command line usage errors are ConfigErrors too --------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bogus", URL], "unrecognized arguments: --bogus"),
        ([URL, "-p"], "argument -p/--port/--listen-port: expected one argument"),
        ([URL, URL], "is listed twice"),
        (["--idle", "5", URL], "unrecognized arguments: --idle"),  # no abbreviations
        (["-c", "", URL], "config_file = '' from command line (-c)"),
    ],
)
def test_usage_errors(argv: list[str], expected: str) -> None:
    assert expected in error_of(argv)


# --- --print-config ----------------------------------------------------------------------------


def test_format_config_lists_every_option_aligned(tmp_path: Path) -> None:
    ini = write(tmp_path, "a.ini", "[main]\nterm_timeout = 3\n")
    loaded = load(["-c", ini, URL, "-p", "6000"], {"LOG_LEVEL": "warn"})
    lines = format_config(loaded).splitlines()
    assert [line.split()[0] for line in lines] == [option.name for option in OPTIONS]
    assert len({line.index(line.split()[1], len(line.split()[0])) for line in lines}) == 1
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["upstream"].split()[1] == "amqp://broker.example.com:5672"
    assert by_name["upstream"].endswith("command line (argument)")
    assert by_name["listen_port"].split()[1] == "6000"
    assert by_name["listen_port"].endswith("command line (-p)")
    assert by_name["log_level"].split()[1] == "warning"
    assert by_name["log_level"].endswith("environment (LOG_LEVEL)")
    assert by_name["term_timeout"].split()[1] == "3"
    assert by_name["term_timeout"].endswith(f"config file {ini} [main] term_timeout")
    assert by_name["upstream_tls_ca_file"].split()[1:] == ["none", "default"]
    assert by_name["upstream_tls_insecure_skip_verify"].split()[1:] == ["false", "default"]


def test_format_config_keeps_full_precision() -> None:
    loaded = load([URL, "-t", "1234567.25", "--upstream-connect-timeout", "0.1"])
    rows = {line.split()[0]: line.split()[1] for line in format_config(loaded).splitlines()}
    assert rows["idle_connection_timeout"] == "1234567.25"
    assert rows["upstream_connect_timeout"] == "0.1"
    assert rows["client_handshake_timeout"] == "10"


def test_default_workers_are_one_per_two_cpus_and_at_least_one() -> None:
    assert [default_workers(cpus) for cpus in (1, 2, 3, 4, 5, 16)] == [1, 1, 1, 2, 2, 8]
    upstream = Upstream("amqp", "broker.example.com", 5672)
    assert Config(upstream, workers=0).worker_count == default_workers()
    assert Config(upstream, workers=3).worker_count == 3


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("150000 100000\n", 2),  # docker --cpus=1.5: 2 cores' worth, at most
        ("50000 100000\n", 1),
        ("max 100000\n", None),  # no quota
        ("garbage", None),
        (None, None),  # no cgroup v2 file
    ],
)
def test_available_cpus_follow_affinity_and_a_cgroup_quota(
    tmp_path: Path, cpu_max: str | None, expected: int | None
) -> None:
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    want = affinity if expected is None else min(affinity, expected)
    assert available_cpus(path) == want
