"""The `amqproxy` command: parse the configuration, then hand over to the master.

Every configuration or usage problem ends here as one line on stderr and exit code 2, before
the master module is even imported, so nothing binds with a half-valid configuration.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from amqproxy_mp import __version__
from amqproxy_mp.config import ConfigError, build_parser, format_config, load_config
from amqproxy_mp.logs import setup_logging

EXIT_USAGE = 2


def _error(message: str) -> int:
    print(f"amqproxy: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return EXIT_USAGE


def _without_check_config(args: list[str]) -> list[str]:
    """The arguments minus --check-config and its value (both spellings)."""
    rest: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--check-config":
            skip = True
        elif not arg.startswith("--check-config="):
            rest.append(arg)
    return rest


def _check_config(path: str, args: list[str]) -> int:
    """Load the configuration exactly as `amqproxy -c FILE` (with the same other arguments and
    environment) would at start, and say whether it would start: for deploy pipelines."""
    rest = _without_check_config(args)
    if getattr(build_parser().parse_args(rest), "config_file", None) is not None:
        raise ConfigError("--check-config FILE cannot be combined with -c/--config")
    loaded = load_config([*rest, "--config", path], os.environ)
    from amqproxy_mp.tls import check_tls_files

    check_tls_files(loaded.config)
    for warning in loaded.warnings:
        print(f"amqproxy: warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.add_argument(
        "--check-config",
        metavar="FILE",
        help="check that the proxy would start with this config file (same as -c FILE, with "
        "the other arguments and the environment), print 'FILE: OK' and exit 0; or print the "
        "error and exit 2",
    )
    try:
        options = parser.parse_args(args)  # -h and -v must work without a valid configuration
        if options.help:
            sys.stdout.write(parser.format_help())
            return 0
        if options.version:
            print(f"amqproxy-mp {__version__}")
            return 0
        if options.check_config is not None:
            return _check_config(options.check_config, args)
        loaded = load_config(args, os.environ)
    except ConfigError as exc:
        return _error(str(exc))

    if options.print_config:
        for warning in loaded.warnings:
            print(f"amqproxy: warning: {warning}", file=sys.stderr)
        print(format_config(loaded))
        return 0

    try:
        setup_logging(loaded.config.log_level, os.environ, loaded.config.log_file)
    except OSError as exc:
        return _error(f"log_file = {loaded.config.log_file!r}: cannot open it ({exc.strerror})")
    for warning in loaded.warnings:
        logging.warning("%s", warning)

    from amqproxy_mp.master import run  # imported late: config errors must not need it

    exit_code: int = run(loaded.config, args)
    return exit_code
