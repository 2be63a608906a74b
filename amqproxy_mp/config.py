"""Configuration: one table of options drives the CLI, the environment, config files and help.

Sources, highest precedence first (as cloudamqp/amqproxy documents it): the config file given
with -c/--config, the command line, the environment, the defaults. Only the value that wins for
an option is parsed and validated, so an unrelated ``LOG_LEVEL`` in the environment does not stop
the proxy when the command line or the config file overrides it. Everything that is wrong raises
ConfigError with a one-line message naming the key, where it came from and what is allowed, so
the process can exit before it binds anything.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import yaml


class ConfigError(Exception):
    """A configuration problem, reported to the operator as one line before anything binds."""


@dataclass(frozen=True)
class Upstream:
    """The broker, reduced to what the proxy uses: credentials and vhost come from each client."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Config:
    upstream: Upstream
    listen_address: str = "localhost"
    listen_port: int = 5673
    tls_port: int = 0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    http_port: int = 15673
    http_address: str = "127.0.0.1"
    log_level: str = "info"
    idle_connection_timeout: float = 5.0
    max_upstream_channels: int = 0
    max_upstream_connections: int = 100
    upstream_max_lifetime: float = 3600.0
    max_client_connections: int = 10000
    term_client_close_timeout: float = 0.0
    term_timeout: float = -1.0
    retire_client_close_timeout: float = 5.0
    close_policy: str = "processed"
    client_heartbeat: int = 60
    upstream_heartbeat: int = 60
    client_handshake_timeout: float = 10.0
    client_max_buffer: int = 32 * 1024 * 1024
    consumer_window: int = 1000
    max_message_size: int = 128 * 1024 * 1024
    upstream_connect_timeout: float = 10.0
    upstream_tls_ca_file: str | None = None
    upstream_tls_cert_file: str | None = None
    upstream_tls_key_file: str | None = None
    upstream_tls_insecure_skip_verify: bool = False
    log_file: str | None = None
    workers: int = 0
    worker_timeout: float = 30.0
    config_file: str | None = None

    @property
    def worker_count(self) -> int:
        """`workers`, with 0 meaning one per CPU."""
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Value parsers. They take the text as given (YAML scalars are turned into text after a type
# check) and raise ValueError; a _BadValue carries a more precise reason than Option.allowed.


class _BadValue(ValueError):
    """A parser's own explanation, used instead of the option's generic "allowed" text."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(text)
        return value

    return parse


def _seconds(
    *, positive: bool = False, allow_minus_one: bool = False, minimum: float = 0.0
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _finite(text)
        if allow_minus_one and value == -1:
            return -1.0
        if value < minimum or (positive and value == 0):
            raise ValueError(text)
        return value

    return parse


_LOG_LEVELS = {
    "debug": "debug",
    "trace": "debug",  # Crystal's Log::Severity, accepted for amqproxy configs
    "info": "info",
    "notice": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "critical",
    "critical": "critical",
}


def _log_level(text: str) -> str:
    return _LOG_LEVELS[text.strip().lower()]  # KeyError is a LookupError, see _parse_raw


_BOOLS = {"true": True, "yes": True, "1": True, "on": True}
_BOOLS.update({"false": False, "no": False, "0": False, "off": False})


_CLOSE_POLICIES = ("processed", "local")


def _close_policy(text: str) -> str:
    value = text.strip().lower()
    if value not in _CLOSE_POLICIES:
        raise ValueError(text)
    return value


def _bool(text: str) -> bool:
    return _BOOLS[text.strip().lower()]


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError(text)
    return text


def _existing_file(text: str) -> str:
    if not text:
        raise ValueError(text)
    path = os.path.expanduser(text)
    if not os.path.isfile(path):
        raise _BadValue("no such file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _BadValue(f"cannot read it ({exc.strerror})") from None
    return path


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError(text)
    return text


_URL_FORM = "expected amqp://host[:port] or amqps://host[:port]"


def parse_upstream_url(text: str) -> tuple[Upstream, list[str]]:
    """Parse an upstream URL; the warnings name ignored parts without echoing any secret."""
    text = text.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        if "://[" not in text and text.partition("://")[2].split("/")[0].count(":") > 1:
            raise _BadValue(f"{_URL_FORM}; put IPv6 addresses in brackets: amqp://[::1]") from None
        raise _BadValue(f"{_URL_FORM} ({exc})") from None
    if parts.scheme not in ("amqp", "amqps") or not text.lower().startswith(parts.scheme + "://"):
        raise _BadValue(_URL_FORM)
    if not parts.hostname:
        raise _BadValue(f"{_URL_FORM}; the host is missing")
    if port == 0:
        raise _BadValue(f"{_URL_FORM}; the port must be 1..65535")
    default_port = 5671 if parts.scheme == "amqps" else 5672
    upstream = Upstream(parts.scheme, parts.hostname, port or default_port)

    warnings = []
    if parts.username or parts.password is not None:
        warnings.append(
            "the upstream URL contains a user name or password; they are ignored: "
            "each client authenticates with its own credentials"
        )
    if parts.path not in ("", "/"):
        vhost = unquote(parts.path[1:])
        warnings.append(
            f"the upstream URL names vhost {vhost!r}; it is ignored: "
            "each client opens its own vhost"
        )
    if parts.query or parts.fragment:
        warnings.append("the upstream URL's query string or fragment is ignored")
    return upstream, warnings


def _upstream(text: str) -> Upstream:
    return parse_upstream_url(text)[0]


def _redact_url(text: str) -> str:
    """Hide a password before a URL goes into an error message."""
    scheme, sep, rest = text.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"


# --------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Option:
    """One setting and every way to set it. Empty flags/env/file_keys: not settable there."""

    name: str
    parse: Callable[[str], Any]
    allowed: str  # what is accepted, for errors and help
    default: Any
    help: str
    metavar: str = "VALUE"
    flags: tuple[str, ...] = ()  # CLI flags that take a value
    switch: tuple[str, ...] = ()  # CLI flags without a value; they set switch_value
    switch_value: str = ""
    positional: bool = False
    env: str = ""
    file_keys: tuple[tuple[str, str], ...] = ()  # (section, key)
    yaml_types: tuple[type, ...] = (str,)
    default_text: str = ""  # shown instead of the default value where it needs explaining


def _opt(name: str, parse: Callable[[str], Any], allowed: str, **kw: Any) -> Option:
    """An option following the naming pattern: --name-with-dashes, NAME, [main] name."""
    kw.setdefault("flags", ("--" + name.replace("_", "-"),))
    kw.setdefault("env", name.upper())
    kw.setdefault("file_keys", (("main", name),))
    if "default" not in kw:
        kw["default"] = getattr(Config, name)  # Config's defaults are the only ones
    return Option(name, parse, allowed, **kw)


_SECONDS_GE_0 = "a number of seconds >= 0"
_SECONDS_GT_0 = "a number of seconds > 0"
_PORT = "a port number 1..65535"
_FILE = "a path to an existing, readable file"
_NUMBER = (int, float)

OPTIONS: tuple[Option, ...] = (
    _opt(
        "upstream", _upstream, _URL_FORM.removeprefix("expected "),
        help="AMQP URL of the broker; scheme, host and port only (clients bring their own "
        "credentials and vhost). Ports default to 5672 (amqp) and 5671 (amqps)",
        metavar="URL", flags=(), positional=True, env="AMQP_URL", default=None,
        default_text="none, required",
    ),
    _opt(
        "listen_address", _host, "a host name or IP address",
        help="address the AMQP and HTTP listeners bind to", metavar="ADDRESS",
        flags=("-l", "--listen", "--listen-address"), env="LISTEN_ADDRESS",
        file_keys=(("listen", "address"), ("listen", "bind")),
    ),
    _opt(
        "listen_port", _int_in(0, 65535), "a port number 0..65535 (0: no plain listener)",
        help="port that AMQP clients connect to (0: only the TLS listener)",
        metavar="PORT", flags=("-p", "--port", "--listen-port"), env="LISTEN_PORT",
        file_keys=(("listen", "port"),), yaml_types=(int,),
    ),
    _opt(
        "tls_port", _int_in(0, 65535), "a port number 0..65535 (0: none)",
        help="port of an AMQPS (TLS) listener, beside or instead of the plain one; needs "
        "tls_cert_file and tls_key_file", metavar="PORT", flags=("--tls-port",), env="TLS_PORT",
        file_keys=(("listen", "tls_port"),), yaml_types=(int,), default_text="0 (none)",
    ),
    _opt(
        "tls_cert_file", _existing_file, _FILE,
        help="certificate chain (PEM) of the AMQPS listener", metavar="FILE",
        file_keys=(("listen", "tls_cert_file"),),
    ),
    _opt(
        "tls_key_file", _existing_file, _FILE,
        help="private key (PEM) of the AMQPS listener", metavar="FILE",
        file_keys=(("listen", "tls_key_file"),),
    ),
    _opt(
        "tls_client_ca_file", _existing_file, _FILE,
        help="CA bundle for mutual TLS: AMQPS clients must present a certificate it signed",
        metavar="FILE", file_keys=(("listen", "tls_client_ca_file"),),
        default_text="none (no client certificates)",
    ),
    _opt(
        "http_port", _int_in(1, 65535), _PORT, help="port of the HTTP /healthz and /metrics",
        metavar="PORT", flags=("-b", "--http-port"), yaml_types=(int,),
    ),
    _opt(
        "http_address", _host, "a host name or IP address",
        help="address the HTTP /healthz, /metrics and /pools listener binds to; /pools names "
        "users and vhosts, so expose it beyond loopback only where that is wanted",
        metavar="ADDRESS", flags=("--http-address",),
    ),
    _opt(
        "log_level", _log_level, "one of debug, info, warning (warn), error, critical (fatal)",
        help="log verbosity; -d/--debug is short for --log-level debug", metavar="LEVEL",
        switch=("-d", "--debug"), switch_value="debug",
        file_keys=(("main", "log_level"), ("listen", "log_level")),
    ),
    _opt(
        "idle_connection_timeout", _seconds(), _SECONDS_GE_0,
        help="seconds an unused pooled upstream connection stays open", metavar="SECONDS",
        flags=("-t", "--idle-connection-timeout"), yaml_types=_NUMBER,
    ),
    _opt(
        "max_upstream_channels", _int_in(0, 65535), "an integer 0..65535 (0: the broker's limit)",
        help="channels per upstream connection before another one is opened",
        metavar="N", yaml_types=(int,), default_text="0 (the broker's channel_max)",
    ),
    _opt(
        "max_upstream_connections", _int_in(0, 65535), "an integer 0..65535 (0: no limit)",
        help="upstream connections per pool (user, password, vhost); when all are full, a "
        "client's Channel.Open gets 506 RESOURCE_ERROR", metavar="N", yaml_types=(int,),
    ),
    _opt(
        "upstream_max_lifetime", _seconds(), "a number of seconds >= 0 (0: no limit)",
        help="seconds after which an upstream connection takes no new channels and closes once "
        "empty: rebalances after broker restarts and bounds how long a pooled login is "
        "trusted without asking the broker again", metavar="SECONDS", yaml_types=_NUMBER,
    ),
    _opt(
        "max_client_connections", _int_in(0, 10**7), "an integer >= 0 (0: no limit)",
        help="client connections per worker; more are refused at Connection.Open with "
        "530 NOT_ALLOWED", metavar="N", yaml_types=(int,),
    ),
    _opt(
        "term_client_close_timeout", _seconds(), _SECONDS_GE_0,
        help="on TERM, seconds to wait for clients to close by themselves before the proxy "
        "closes them", metavar="SECONDS", yaml_types=_NUMBER,
    ),
    _opt(
        "term_timeout", _seconds(allow_minus_one=True), "-1 (wait forever) or a number of "
        "seconds >= 0", help="on TERM, seconds to wait for clients to disconnect after the "
        "proxy closed them", metavar="SECONDS", yaml_types=_NUMBER,
        default_text="-1 (wait forever)",
    ),
    _opt(
        "retire_client_close_timeout", _seconds(), _SECONDS_GE_0,
        help="on HUP and TTOU, seconds a retiring worker waits for its clients to close before "
        "closing them (at least term_client_close_timeout)", metavar="SECONDS",
        yaml_types=_NUMBER,
    ),
    _opt(
        "close_policy", _close_policy, "processed or local",
        help="when a client's Channel.Close or Connection.Close is answered: processed, once "
        "the broker has processed the client's publishes on that channel (one round trip, only "
        "on channels that published since their last reply; the client sees errors and order "
        "as directly); local, at once (fastest; a late error is not reported, and sequential "
        "connections on different workers may reorder)", metavar="POLICY",
    ),
    _opt(
        "client_heartbeat", _int_in(0, 65535), "an integer 0..65535 (0: no heartbeats)",
        help="heartbeat interval in seconds proposed to clients", metavar="SECONDS",
        yaml_types=(int,),
    ),
    _opt(
        "upstream_heartbeat", _int_in(0, 65535), "an integer 0..65535 (0: no heartbeats)",
        help="heartbeat interval in seconds asked of the broker", metavar="SECONDS",
        yaml_types=(int,),
    ),
    _opt(
        "client_handshake_timeout", _seconds(positive=True), _SECONDS_GT_0,
        help="seconds a client has to finish the AMQP handshake", metavar="SECONDS",
        yaml_types=_NUMBER,
    ),
    _opt(
        "client_max_buffer", _int_in(65536, 2**40), "a number of bytes >= 65536",
        help="bytes the proxy holds for a client that does not read fast enough; a client "
        "over it is disconnected, so it cannot stall or bloat the shared upstream connection",
        metavar="BYTES", yaml_types=(int,), default_text="33554432 (32 MiB)",
    ),
    _opt(
        "consumer_window", _int_in(1, 65535), "an integer 1..65535",
        help="deliveries a consumer may have in flight upstream when its client set no limit: "
        "an auto-ack consumer is consumed upstream with acks, sent as each delivery reaches "
        "the client's socket, and a prefetch-0 consumer gets this prefetch, so a consumer "
        "that reads slowly is slowed down, not disconnected, and loses nothing",
        metavar="N", yaml_types=(int,),
    ),
    _opt(
        "max_message_size", _int_in(0, 2**63 - 1), "a number of bytes",
        help="largest message body a client may publish; a larger one closes its channel with "
        "406 PRECONDITION_FAILED, as RabbitMQ's max_message_size does",
        metavar="BYTES", yaml_types=(int,), default_text="134217728 (128 MiB)",
    ),
    _opt(
        "upstream_connect_timeout", _seconds(positive=True), _SECONDS_GT_0,
        help="seconds for TCP, TLS and the AMQP handshake to the broker", metavar="SECONDS",
        yaml_types=_NUMBER,
    ),
    _opt(
        "upstream_tls_ca_file", _existing_file, _FILE,
        help="CA bundle to verify the broker's certificate with (amqps)",
        metavar="FILE", default_text="none (system CAs)",
    ),
    _opt(
        "upstream_tls_cert_file", _existing_file, _FILE,
        help="client certificate presented to the broker (amqps); needs the key file",
        metavar="FILE",
    ),
    _opt(
        "upstream_tls_key_file", _existing_file, _FILE,
        help="private key of the client certificate (amqps)", metavar="FILE",
    ),
    _opt(
        "upstream_tls_insecure_skip_verify", _bool,
        "a boolean: true/false, yes/no, on/off, 1/0",
        help="do not verify the broker's certificate (amqps); for testing only",
        flags=(), switch=("--upstream-tls-insecure-skip-verify",), switch_value="true",
        yaml_types=(bool,),
    ),
    _opt(
        "log_file", _nonempty, "a file path",
        help="append the log to this file instead of stderr; SIGUSR1 reopens it",
        metavar="FILE", default_text="none (stderr)",
    ),
    _opt(
        "workers", _int_in(0, 1024), "an integer 0..1024 (0: one per CPU)",
        help="worker processes, each accepting on the listen port with its own pools",
        metavar="N", flags=("-w", "--workers"), yaml_types=(int,),
        default_text="0 (the number of CPUs)",
    ),
    _opt(
        "worker_timeout", _seconds(minimum=1.0),
        "a number of seconds >= 1 (workers beat every 0.5 s)",
        help="seconds a worker's event loop may be blocked before the master replaces it",
        metavar="SECONDS", yaml_types=_NUMBER,
    ),
    _opt(
        "config_file", _nonempty, "a file path",
        help="config file: INI with [main] and [listen], or YAML (.yaml/.yml) with main: and "
        "listen:; its settings override the command line and the environment",
        metavar="FILE", flags=("-c", "--config"), env="", file_keys=(),
    ),
)  # fmt: skip

_BY_NAME = {option.name: option for option in OPTIONS}
_SECTIONS: dict[str, dict[str, Option]] = {}
for _option in OPTIONS:
    for _section, _key in _option.file_keys:
        _SECTIONS.setdefault(_section, {})[_key] = _option


# --------------------------------------------------------------------------------------------
# Collecting raw values from the three sources.


@dataclass(frozen=True)
class _Raw:
    value: object  # text, or a YAML scalar
    key: str  # as the user wrote it: option name, or the file key
    origin: str  # for errors: "config file /x.ini [main]", "environment (X)", ...
    source: str  # for LoadedConfig.sources
    typed: bool = False  # a YAML value: its type must fit the option


class _Parser(argparse.ArgumentParser):
    """Usage errors become ConfigError so that they, too, are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see amqproxy --help)")


class _Record(argparse.Action):
    """Remember which flag gave the value, so errors and --print-config can name it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if self.nargs == 0:
            values = self.const
        if values is None:  # an absent optional positional
            return
        flag = option_string or "argument"
        raw = _Raw(values, self.dest, f"command line ({flag})", f"command line ({flag})")
        setattr(namespace, self.dest, raw)


def _help_text(option: Option) -> str:
    where = []
    if option.env:
        where.append(f"env {option.env}")
    if option.file_keys:
        where.append("file " + " or ".join(f"[{sect}] {key}" for sect, key in option.file_keys))
    default = option.default_text or format_value(option.default)
    where.append(f"default: {default}")
    return f"{option.help} ({'; '.join(where)})"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser; -h, -v and --print-config are acted on by amqproxy_mp.cli."""
    parser = _Parser(
        prog="amqproxy",
        usage="amqproxy [options] [amqp upstream url]",
        description="AMQP 0-9-1 proxy with upstream connection and channel pooling.",
        epilog="Precedence, highest first: config file, command line, environment, defaults.\n"
        "Config file keys are option names in [main], except [listen] address/bind and port.",
        add_help=False,
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
    )
    for option in OPTIONS:
        help_text = _help_text(option)
        if option.positional:
            parser.add_argument(
                option.name, nargs="?", action=_Record, metavar=option.metavar, help=help_text
            )
        if option.flags:
            parser.add_argument(
                *option.flags,
                dest=option.name,
                action=_Record,
                metavar=option.metavar,
                help=help_text,
            )
        if option.switch:
            switch_help = help_text
            if option.flags:
                switch_help = f"same as {option.flags[-1]} {option.switch_value}"
            parser.add_argument(
                *option.switch,
                dest=option.name,
                action=_Record,
                nargs=0,
                const=option.switch_value,
                help=switch_help,
            )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting with its effective value and source, then exit",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    return parser


def _from_environment(environ: Mapping[str, str]) -> dict[str, _Raw]:
    """Empty variables count as unset, as a compose file's `VAR=` usually means."""
    found = {}
    for option in OPTIONS:
        if option.env and environ.get(option.env):
            origin = f"environment ({option.env})"
            found[option.name] = _Raw(environ[option.env], option.name, origin, origin)
    return found


def _from_file(path: str, given_by: str) -> dict[str, _Raw]:
    where = f"config file {path}"
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {where} (from {given_by}): {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {where} (from {given_by}): not UTF-8 text") from None
    typed = path.lower().endswith((".yaml", ".yml"))
    sections = _parse_yaml(text, where) if typed else _parse_ini(text, path, where)

    found: dict[str, _Raw] = {}
    for section, entries in sections.items():
        if section not in _SECTIONS:
            allowed = ", ".join(f"[{name}]" for name in _SECTIONS)
            raise ConfigError(
                f"unknown section [{section}] in {where}{_did_you_mean(section, _SECTIONS)}; "
                f"allowed sections: {allowed}"
            )
        keys = _SECTIONS[section]
        for key, value in entries.items():
            if key not in keys:
                raise ConfigError(
                    f"unknown key {key!r} in {where} [{section}]{_did_you_mean(key, keys)}; "
                    f"allowed keys in [{section}]: {', '.join(keys)}"
                )
            option = keys[key]
            raw = _Raw(value, key, f"{where} [{section}]", f"{where} [{section}] {key}", typed)
            if option.name in found:
                raise ConfigError(
                    f"{option.name} is set twice in {where}: {found[option.name].source} and "
                    f"[{section}] {key}; keep one"
                )
            found[option.name] = raw
    return found


def _did_you_mean(word: str, choices: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_ini(text: str, path: str, where: str) -> dict[str, dict[str, object]]:
    """configparser, strict, no interpolation; keys before any section belong to [main]."""
    offset = 0
    while True:
        parser = configparser.ConfigParser(
            interpolation=None,
            default_section="\0no default section",  # so [DEFAULT] is just an unknown section
            inline_comment_prefixes=("#", ";"),
            strict=True,
        )
        try:
            parser.read_string("[main]\n" + text if offset else text, source=path)
        except configparser.MissingSectionHeaderError:
            if offset:
                raise ConfigError(f"{where}: syntax error") from None  # unreachable in practice
            offset = 1  # amqproxy reads keys before the first section as [main]
            continue
        except configparser.DuplicateSectionError as exc:
            line = f" (line {exc.lineno - offset})" if exc.lineno else ""
            raise ConfigError(f"{where}: section [{exc.section}] appears twice{line}") from None
        except configparser.DuplicateOptionError as exc:
            line = f" (line {exc.lineno - offset})" if exc.lineno else ""
            raise ConfigError(
                f"{where} [{exc.section}]: key {exc.option!r} appears twice{line}"
            ) from None
        except configparser.ParsingError as exc:
            lineno = exc.errors[0][0] - offset
            line = text.splitlines()[lineno - 1].strip() if lineno > 0 else ""
            raise ConfigError(
                f"{where}: syntax error at line {lineno}: {line!r}; "
                "expected [section] or key = value"
            ) from None
        except configparser.Error as exc:
            raise ConfigError(f"{where}: {' '.join(str(exc).split())}") from None
        return {name: dict(parser.items(name, raw=True)) for name in parser.sections()}


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _parse_yaml(text: str, where: str) -> dict[str, dict[str, object]]:
    try:
        document = yaml.load(text, Loader=_StrictYamlLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise ConfigError(f"{where}: YAML syntax error{position}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: YAML error: {' '.join(str(exc).split())}") from None
    if document is None:
        return {}
    allowed = ", ".join(f"{name}:" for name in _SECTIONS)
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected a mapping with the sections {allowed}")
    sections: dict[str, dict[str, object]] = {}
    for name, body in document.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(
                f"{where}: section {name}: must be a mapping of keys to values, "
                f"not {_type_name(body)}"
            )
        sections[str(name)] = {str(key): value for key, value in body.items()}
    return sections


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------
# Putting it together.


def _parse_raw(option: Option, raw: _Raw) -> Any:
    shown = raw.value
    if option.name == "upstream" and isinstance(shown, str):
        shown = _redact_url(shown)
    prefix = f"{raw.key} = {shown!r} from {raw.origin}"
    value = raw.value
    if raw.typed or not isinstance(value, str):
        is_bool = isinstance(value, bool)
        if not isinstance(value, option.yaml_types) or (is_bool and bool not in option.yaml_types):
            raise ConfigError(f"{prefix}: expected {option.allowed}, not {_type_name(raw.value)}")
        value = str(value).lower() if is_bool else str(value)
    try:
        return option.parse(value)
    except _BadValue as exc:
        raise ConfigError(f"{prefix}: {exc}") from None
    except (ValueError, LookupError):
        raise ConfigError(f"{prefix}: expected {option.allowed}") from None


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> LoadedConfig:
    """Resolve every option from argv, environ and the config file; raise ConfigError."""
    namespace = build_parser().parse_args(list(argv))
    cli: dict[str, _Raw] = {
        option.name: getattr(namespace, option.name)
        for option in OPTIONS
        if isinstance(getattr(namespace, option.name, None), _Raw)
    }
    env = _from_environment(environ)
    file: dict[str, _Raw] = {}
    if "config_file" in cli:
        raw_path = cli["config_file"]
        path = _parse_raw(_BY_NAME["config_file"], raw_path)
        file = _from_file(path, raw_path.origin)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    winners: dict[str, _Raw] = {}
    for option in OPTIONS:
        raw = file.get(option.name) or cli.get(option.name) or env.get(option.name)
        if raw is None:
            values[option.name] = option.default
            sources[option.name] = "default"
        else:
            values[option.name] = _parse_raw(option, raw)
            sources[option.name] = raw.source
            winners[option.name] = raw

    if values["upstream"] is None:
        raise ConfigError(
            "no upstream broker configured: pass its URL as the argument "
            "(amqproxy amqp://rabbitmq.example.com), set AMQP_URL, or set upstream in the "
            "config file's [main] section"
        )
    warnings = parse_upstream_url(str(winners["upstream"].value))[1]
    _check_tls(values, sources, warnings)
    return LoadedConfig(Config(**values), sources, warnings)


def _check_tls(values: dict[str, Any], sources: dict[str, str], warnings: list[str]) -> None:
    if not values["listen_port"] and not values["tls_port"]:
        raise ConfigError(
            f"listen_port is 0 (from {sources['listen_port']}) and no tls_port is set: "
            "the proxy would not listen at all"
        )
    if values["tls_port"]:
        for needed in ("tls_cert_file", "tls_key_file"):
            if values[needed] is None:
                raise ConfigError(
                    f"tls_port is set (from {sources['tls_port']}) but {needed} is not: "
                    "the AMQPS listener needs a certificate and its key"
                )
    if values["tls_port"] and values["tls_port"] == values["listen_port"]:
        raise ConfigError("tls_port and listen_port must differ")
    cert, key = "upstream_tls_cert_file", "upstream_tls_key_file"
    for present, missing in ((cert, key), (key, cert)):
        if values[present] is not None and values[missing] is None:
            raise ConfigError(
                f"{present} is set (from {sources[present]}) but {missing} is not: "
                "set both or neither"
            )
    tls_options = [o.name for o in OPTIONS if o.name.startswith("upstream_tls_")]
    in_use = [name for name in tls_options if values[name]]
    if in_use and not values["upstream"].tls:
        warnings.append(
            f"{', '.join(in_use)} ignored: the upstream {values['upstream']} does not use TLS "
            "(use amqps://)"
        )


def format_value(value: object) -> str:
    """Values as an operator would write them in a config file."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def format_config(loaded: LoadedConfig) -> str:
    """One aligned line per option: name, effective value, where the value came from."""
    rows = [
        (
            option.name,
            format_value(getattr(loaded.config, option.name)),
            loaded.sources[option.name],
        )
        for option in OPTIONS
    ]
    name_width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return "\n".join(
        f"{name:<{name_width}}  {value:<{value_width}}  {source}" for name, value, source in rows
    )
