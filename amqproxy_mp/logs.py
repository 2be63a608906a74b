"""Logging to stderr or a file: timestamped lines, or sd-daemon priority prefixes under systemd.

The pid is in every line because several worker processes share one stderr.
A log file is opened in append mode by every process and reopened on SIGUSR1,
so logrotate can move it away.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

PLAIN_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
JOURNAL_FORMAT = "[%(process)d] %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """sd-daemon(3) priority: journald reads it from the `<N>` line prefix."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds one); every line prefixed, so tracebacks keep the priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class _Pid(logging.Filter):
    """Stamps each record with this process's pid, read once per process: LogRecord would ask
    the kernel for it on every line (glibc does not cache getpid)."""

    pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.process = self.pid
        return True


os.register_at_fork(after_in_child=lambda: setattr(_Pid, "pid", os.getpid()))


def _cheap_records() -> None:
    """Leave out what no line of ours shows: the caller's file and line (a stack walk per
    record), the thread and the multiprocessing process name; the pid comes from _Pid."""
    logging._srcfile = None  # the switch the logging docs give for this
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second setup replaces it."""


class _FileHandler(logging.FileHandler):
    """The log file handler; `reopen_log_file` finds it by this class."""


def _stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode; children whose stderr was redirected inherit it."""
    stream = environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    device, _, inode = stream.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):
        return True  # cannot tell (no real stderr, odd value): trust the variable


def setup_logging(level: str, environ: Mapping[str, str], log_file: str | None = None) -> None:
    """Configure the root logger; safe to call again (e.g. on reload) without doubling lines."""
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}"
        ) from None
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _StderrHandler | _FileHandler):
            root.removeHandler(old)
            old.close()
    handler: logging.Handler
    if log_file:
        handler = _FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    elif _stderr_is_journal(environ):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    _cheap_records()
    handler.addFilter(_Pid())
    root.addHandler(handler)
    root.setLevel(levelno)


def reopen_log_file() -> None:
    """Reopen the log file (SIGUSR1), e.g. after logrotate moved it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
