"""The option table: one row per setting drives the CLI, the environment, config files and help.

Parsers take the text as given (YAML scalars are turned into text after a type check) and raise
ValueError; a BadValue carries a more precise reason than Option.allowed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from amqproxy_mp.config.model import Config, Upstream


class BadValue(ValueError):
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
    return _LOG_LEVELS[text.strip().lower()]  # KeyError is a LookupError, see load._parse_raw


_BOOLS = {"true": True, "yes": True, "1": True, "on": True}
_BOOLS.update({"false": False, "no": False, "0": False, "off": False})


_CLOSE_POLICIES = ("processed", "confirmed", "local")


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
        raise BadValue("no such file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise BadValue(f"cannot read it ({exc.strerror})") from None
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
            raise BadValue(f"{_URL_FORM}; put IPv6 addresses in brackets: amqp://[::1]") from None
        raise BadValue(f"{_URL_FORM} ({exc})") from None
    if parts.scheme not in ("amqp", "amqps") or not text.lower().startswith(parts.scheme + "://"):
        raise BadValue(_URL_FORM)
    if not parts.hostname:
        raise BadValue(f"{_URL_FORM}; the host is missing")
    if port == 0:
        raise BadValue(f"{_URL_FORM}; the port must be 1..65535")
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


def parse_upstream_urls(text: str) -> tuple[Upstream, list[str]]:
    """One or more upstream URLs, comma-separated: the nodes of a cluster, in order."""
    nodes: list[Upstream] = []
    warnings: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        node, node_warnings = parse_upstream_url(part)
        if node in nodes:
            raise BadValue(f"{node} is listed twice")
        nodes.append(node)
        warnings.extend(w for w in node_warnings if w not in warnings)
    if not nodes:
        raise BadValue(_URL_FORM)
    return replace(nodes[0], others=tuple(nodes[1:])), warnings


def _policy(text: str) -> str:
    value = text.strip().lower()
    if value not in ("spread", "ordered"):
        raise BadValue("expected spread or ordered")
    return value


def redact_url(text: str) -> str:
    """Hide a password before a URL goes into an error message."""
    scheme, sep, rest = text.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"


@dataclass(frozen=True)
class Option:
    """One setting and every way to set it. Empty flags/env/file_keys: not settable there."""

    name: str
    parse: Callable[[str], Any]  # upstream's also returns the URL's warnings: see load_config
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
        "upstream", parse_upstream_urls,
        _URL_FORM.removeprefix("expected ") + ", or several, comma-separated",
        help="AMQP URL of the broker, or of each node of a cluster (several arguments, or "
        "comma-separated); scheme, host and port only (clients bring their own credentials "
        "and vhost). Ports default to 5672 (amqp) and 5671 (amqps). A host name that resolves "
        "to several addresses is one node per address",
        metavar="URL", flags=(), positional=True, env="AMQP_URL", default=None,
        default_text="none, required", yaml_types=(str, list),
    ),
    _opt(
        "upstream_policy", _policy, "spread or ordered",
        help="which healthy node a new upstream connection goes to: spread (the one with the "
        "fewest of this worker's connections) or ordered (the first in the list)",
        metavar="POLICY",
    ),
    _opt(
        "upstream_node_connect_timeout", _seconds(positive=True), _SECONDS_GT_0,
        help="seconds one node gets to accept a connection and its handshake before the "
        "attempt moves on to the next node (upstream_connect_timeout is the whole budget)",
        metavar="SECONDS", yaml_types=_NUMBER,
    ),
    _opt(
        "upstream_rebalance", _bool, "a boolean: true/false, yes/no, on/off, 1/0",
        help="with several nodes, close an upstream connection that no client is using when "
        "its node has more of this worker's connections than the policy would give it (after "
        "a node failure, once the node is back), so that the next one opens where it belongs",
        metavar="BOOL", yaml_types=(bool,),
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
        "close_policy", _close_policy, "processed, confirmed or local",
        help="when a client's Channel.Close or Connection.Close is answered: processed, once "
        "the broker has processed the client's publishes on that channel (one round trip, only "
        "on channels that published since their last reply; the client sees errors and order "
        "as directly); confirmed, once the broker has also confirmed them (the proxy confirms "
        "every publish upstream: a CloseOk then means the broker has the messages, which a "
        "direct connection does not say); local, at once (fastest; a late error is not "
        "reported, and sequential connections on different workers may reorder)",
        metavar="POLICY",
    ),
    _opt(
        "unconfirmed_buffer", _int_in(65536, 2**40), "a number of bytes >= 65536",
        help="bytes of published messages a worker keeps until the broker confirms them (to "
        "send them again if their upstream connection ends first); over it, publishing "
        "clients are not read until the broker has confirmed half of it",
        metavar="BYTES", yaml_types=(int,), default_text="67108864 (64 MiB)",
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
        help="seconds a client waits for an upstream connection: TCP, TLS and the AMQP "
        "handshake, over every node tried", metavar="SECONDS",
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
        "workers", _int_in(0, 1024), "an integer 0..1024 (0: one per two CPUs)",
        help="worker processes, each accepting on the listen port with its own pools",
        metavar="N", flags=("-w", "--workers"), yaml_types=(int,),
        default_text="0 (one per two CPUs the process may use, at least one)",
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


def _by_file_key() -> dict[str, dict[str, Option]]:
    sections: dict[str, dict[str, Option]] = {}
    for option in OPTIONS:
        for section, key in option.file_keys:
            sections.setdefault(section, {})[key] = option
    return sections


BY_NAME = {option.name: option for option in OPTIONS}
SECTIONS = _by_file_key()  # section -> file key -> option, in table order
