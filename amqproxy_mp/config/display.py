"""Values as the operator writes them, shared by --help, --print-config and the generated docs."""

from __future__ import annotations

from amqproxy_mp.config.model import LoadedConfig
from amqproxy_mp.config.options import OPTIONS


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
    config = loaded.config
    rows = [
        (
            option.name,
            format_value(getattr(config, option.name)),
            loaded.sources[option.name],
        )
        for option in OPTIONS
    ]
    name_width = max(len(name) for name, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return "\n".join(
        f"{name:<{name_width}}  {value:<{value_width}}  {source}" for name, value, source in rows
    )
