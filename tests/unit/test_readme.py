"""The README's configuration table must list every option the code has, by all its names."""

from __future__ import annotations

from pathlib import Path

import pytest

from amqproxy_mp.config import OPTIONS, Option

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_documented(option: Option) -> None:
    names = [f"`{flag}`" for flag in option.flags[:2] + option.switch[:1]]
    if option.env:
        names.append(f"`{option.env}`")
    for section, key in option.file_keys[:1]:
        names.append(f"[{section}] {key}")
    missing = [name for name in names if name not in README]
    assert not missing, f"README.md does not mention {missing} of option {option.name}"
