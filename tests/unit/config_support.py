"""What the configuration tests share: loading from argv and env, errors, files."""

from __future__ import annotations

from pathlib import Path

import pytest

from amqproxy_mp.config import ConfigError, LoadedConfig, load_config

URL = "amqp://broker.example.com"


def load(argv: list[str], env: dict[str, str] | None = None) -> LoadedConfig:
    return load_config(argv, env or {})


def error_of(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, env)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)
