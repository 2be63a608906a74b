"""The `amqproxy` command: parse the configuration, then hand over to the worker.

Every configuration or usage problem ends here as one line on stderr and exit code 2, before
the worker module is even imported, so nothing binds with a half-valid configuration.
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        options = parser.parse_args(args)  # -h and -v must work without a valid configuration
        if options.help:
            sys.stdout.write(parser.format_help())
            return 0
        if options.version:
            print(f"amqproxy-mp {__version__}")
            return 0
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
