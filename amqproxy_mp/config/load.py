"""load_config: which source wins for each option, then the checks that need several options.

Sources, highest precedence first (as cloudamqp/amqproxy documents it): the config file given
with -c/--config, the command line, the environment, the defaults. Only the value that wins for
an option is parsed and validated, so an unrelated ``LOG_LEVEL`` in the environment does not stop
the proxy when the command line or the config file overrides it. Everything that is wrong raises
ConfigError with a one-line message naming the key, where it came from and what is allowed, so
the process can exit before it binds anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from amqproxy_mp.config.model import Config, ConfigError, LoadedConfig
from amqproxy_mp.config.options import BY_NAME, OPTIONS, BadValue, Option, redact_url
from amqproxy_mp.config.sources import (
    Raw,
    build_parser,
    from_environment,
    from_file,
    type_name,
)


def _parse_raw(option: Option, raw: Raw) -> Any:
    shown = raw.value
    if option.name == "upstream" and isinstance(shown, str):
        shown = redact_url(shown)
    prefix = f"{raw.key} = {shown!r} from {raw.origin}"
    value = raw.value
    if isinstance(value, list) and list in option.yaml_types:  # a YAML list of URLs
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{prefix}: expected {option.allowed}, not a list of other values")
        value = ",".join(value)
    elif raw.typed or not isinstance(value, str):
        is_bool = isinstance(value, bool)
        if not isinstance(value, option.yaml_types) or (is_bool and bool not in option.yaml_types):
            raise ConfigError(f"{prefix}: expected {option.allowed}, not {type_name(raw.value)}")
        value = str(value).lower() if is_bool else str(value)
    try:
        return option.parse(value)
    except BadValue as exc:
        raise ConfigError(f"{prefix}: {exc}") from None
    except (ValueError, LookupError):
        raise ConfigError(f"{prefix}: expected {option.allowed}") from None


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> LoadedConfig:
    """Resolve every option from argv, environ and the config file; raise ConfigError."""
    namespace = build_parser().parse_args(list(argv))
    cli: dict[str, Raw] = {
        option.name: getattr(namespace, option.name)
        for option in OPTIONS
        if isinstance(getattr(namespace, option.name, None), Raw)
    }
    env = from_environment(environ)
    file: dict[str, Raw] = {}
    if "config_file" in cli:
        raw_path = cli["config_file"]
        path = _parse_raw(BY_NAME["config_file"], raw_path)
        file = from_file(path, raw_path.origin)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        raw = file.get(option.name) or cli.get(option.name) or env.get(option.name)
        if raw is None:
            values[option.name] = option.default
            sources[option.name] = "default"
        else:
            values[option.name] = _parse_raw(option, raw)
            sources[option.name] = raw.source

    if values["upstream"] is None:
        raise ConfigError(
            "no upstream broker configured: pass its URL as the argument "
            "(amqproxy amqp://rabbitmq.example.com), set AMQP_URL, or set upstream in the "
            "config file's [main] section"
        )
    upstream, warnings = values["upstream"]  # parse_upstream_urls's result, from its one run
    values["upstream"] = upstream
    _check_combinations(values, sources, warnings)
    return LoadedConfig(Config(**values), sources, warnings)


def _check_combinations(
    values: dict[str, Any], sources: dict[str, str], warnings: list[str]
) -> None:
    """Each value was valid on its own; these rules need several options together."""
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
    if in_use and not any(node.tls for node in values["upstream"].nodes):
        warnings.append(
            f"{', '.join(in_use)} ignored: the upstream {values['upstream']} does not use TLS "
            "(use amqps://)"
        )
