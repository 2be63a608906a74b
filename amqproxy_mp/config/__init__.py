"""Configuration: one table of options drives the CLI, the environment, config files and help.

Layers, each importing only those above it: model (the results), options (the table and its
value parsers), display (how values are shown), sources (argv, environment, files), load
(precedence and cross-checks). Nothing here imports the rest of amqproxy_mp. This module keeps
the names callers import, so they need not know the layout.
"""

from amqproxy_mp.config.display import format_config, format_value
from amqproxy_mp.config.load import load_config
from amqproxy_mp.config.model import Config, ConfigError, LoadedConfig, Upstream
from amqproxy_mp.config.options import OPTIONS, Option, parse_upstream_url
from amqproxy_mp.config.sources import build_parser

__all__ = [
    "OPTIONS",
    "Config",
    "ConfigError",
    "LoadedConfig",
    "Option",
    "Upstream",
    "build_parser",
    "format_config",
    "format_value",
    "load_config",
    "parse_upstream_url",
]
