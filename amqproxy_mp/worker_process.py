"""A worker process as the master sees it (its slot, pid and heartbeat pipe, how it ended),
and the child's side of the fork: what a new worker drops from the master before it serves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable
from typing import IO, Final

from amqproxy_mp import listeners as ls
from amqproxy_mp.config import Config

log = logging.getLogger(__name__)

#: The signals the master handles (a worker sets its own).
SIGNALS: Final = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD,
)  # fmt: skip


@dataclasses.dataclass(eq=False)
class WorkerProcess:
    slot: int
    pid: int
    beat_fd: int
    started: float
    last_beat: float
    ready: bool = False
    retiring: bool = False
    #: Started by a reload and not yet accepting: the slot's old worker still serves, and if
    #: this one dies or never gets ready, the reload fails, not the slot.
    candidate: bool = False
    #: Why the master killed it, if it did ("timeout"); otherwise the exit status tells.
    kill_reason: str = ""
    #: When it gets SIGKILL if it is still there after the SIGABRT for missed heartbeats.
    kill_at: float = 0.0


@dataclasses.dataclass(eq=False)
class Slot:
    number: int
    sockets: list[socket.socket]
    tls_sockets: list[socket.socket]
    worker: WorkerProcess | None = None
    #: Quick deaths in a row: drives the back-off and the crash-loop health state.
    failures: int = 0
    restart_at: float = 0.0
    last_exit: str = ""
    removed: bool = False


def describe_exit(status: int) -> tuple[str, str]:
    """(text for the log, reason label for the restart metric) of a wait status."""
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"killed by {name}", "signal"
    code = os.WEXITSTATUS(status)
    return f"exited with code {code}", "exit" if code else "clean_exit"


def worker_main(
    config: Config,
    slot: Slot,
    beat_fd: int,
    others: Iterable[WorkerProcess],
    metrics_dir: str,
) -> int:
    """In the forked child: drop the master's loop, signals, sockets and the other workers'
    heartbeat pipes, then serve. The exit code."""
    try:
        asyncio.events._set_running_loop(None)
        signal.set_wakeup_fd(-1)
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        ls.drop_inherited_sockets({sock.fileno() for sock in slot.sockets + slot.tls_sockets})
        for worker in others:
            os.close(worker.beat_fd)
        _enable_stack_dumps(config)
        set_title(f"amqproxy: worker {slot.number}")
        from amqproxy_mp.worker import Worker

        return Worker(
            config,
            sockets=slot.sockets,
            tls_sockets=slot.tls_sockets,
            slot=slot.number,
            beat_fd=beat_fd,
            metrics_dir=metrics_dir,
        ).run()
    except BaseException:
        log.exception("worker %d failed", slot.number)
        return 1


def _enable_stack_dumps(config: Config) -> None:
    """On SIGABRT (what the master sends a worker that misses its heartbeats), and on a fatal
    signal such as SIGSEGV, Python writes every thread's stack to the log file, or to stderr
    without one, before the signal ends the process as it would have anyway."""
    target: IO[str] = sys.stderr
    if config.log_file:
        with contextlib.suppress(OSError):
            # its own descriptor: the logging handler's is closed on SIGUSR1, and faulthandler
            # would write to whatever file or socket then got that number
            target = open(config.log_file, "a", encoding="utf-8")  # noqa: SIM115 - kept open
    try:
        faulthandler.enable(file=target, all_threads=True)
    except (RuntimeError, ValueError, OSError) as exc:  # no usable stderr: serve anyway
        log.warning("cannot enable stack dumps: %s", exc)


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - it is a dependency, but titles are cosmetic
        return
    setproctitle.setproctitle(title)
