"""Where raw values come from: the command line, the environment and an INI or YAML file.

Nothing is parsed here beyond finding the text (or YAML scalar) and remembering where it came
from, so that only the value that wins is validated and errors can name its source. Files are
read strictly: unknown sections and keys, duplicates and syntax errors stop the load.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from amqproxy_mp.config.display import format_value
from amqproxy_mp.config.model import ConfigError
from amqproxy_mp.config.options import OPTIONS, SECTIONS, Option


@dataclass(frozen=True)
class Raw:
    """A value as found; only the one that wins for its option is ever parsed."""

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
        if values is None or values == []:  # an absent optional positional
            return
        if isinstance(values, list):  # several positional URLs: the nodes of a cluster
            values = ",".join(values)
        flag = option_string or "argument"
        raw = Raw(values, self.dest, f"command line ({flag})", f"command line ({flag})")
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
        usage="amqproxy [options] [amqp upstream url ...]",
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
                option.name, nargs="*", action=_Record, metavar=option.metavar, help=help_text
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


def from_environment(environ: Mapping[str, str]) -> dict[str, Raw]:
    """Empty variables count as unset, as a compose file's `VAR=` usually means."""
    found = {}
    for option in OPTIONS:
        if option.env and environ.get(option.env):
            origin = f"environment ({option.env})"
            found[option.name] = Raw(environ[option.env], option.name, origin, origin)
    return found


def from_file(path: str, given_by: str) -> dict[str, Raw]:
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

    found: dict[str, Raw] = {}
    for section, entries in sections.items():
        if section not in SECTIONS:
            allowed = ", ".join(f"[{name}]" for name in SECTIONS)
            raise ConfigError(
                f"unknown section [{section}] in {where}{_did_you_mean(section, SECTIONS)}; "
                f"allowed sections: {allowed}"
            )
        keys = SECTIONS[section]
        for key, value in entries.items():
            if key not in keys:
                raise ConfigError(
                    f"unknown key {key!r} in {where} [{section}]{_did_you_mean(key, keys)}; "
                    f"allowed keys in [{section}]: {', '.join(keys)}"
                )
            option = keys[key]
            raw = Raw(value, key, f"{where} [{section}]", f"{where} [{section}] {key}", typed)
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
    allowed = ", ".join(f"{name}:" for name in SECTIONS)
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected a mapping with the sections {allowed}")
    sections: dict[str, dict[str, object]] = {}
    for name, body in document.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(
                f"{where}: section {name}: must be a mapping of keys to values, "
                f"not {type_name(body)}"
            )
        sections[str(name)] = {str(key): value for key, value in body.items()}
    return sections


def type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return names.get(type(value), type(value).__name__)
