"""The master process (the arbiter): signals, spawning, reaping, back-off and reload.

Modelled on gunicorn's arbiter. The master never speaks AMQP and keeps no client state. Each
worker slot has its own listening sockets (`amqproxy_mp.listeners`), opened before the slot's
worker is forked, so a crashed worker's replacement inherits them. Each signal is handled by
the ``handle_<name>`` method of its name. A worker whose heartbeats stop for `worker_timeout`
gets SIGABRT, which makes it write every thread's stack to the log before it dies, and SIGKILL
if it is still there `ABORT_TIMEOUT` later. What the master reports (/healthz, /metrics,
/pools) is `amqproxy_mp.status`'s, the /healthz verdict `amqproxy_mp.health`'s; what a
worker process is, and what the child does after the fork, `amqproxy_mp.worker_process`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

from amqproxy_mp import __version__
from amqproxy_mp import listeners as ls
from amqproxy_mp.config import Config, ConfigError, load_config
from amqproxy_mp.health import HealthState, SlotState, workers_verdict
from amqproxy_mp.logs import reopen_log_file, setup_logging
from amqproxy_mp.metrics_master import WorkerInfo, archive_dead_process
from amqproxy_mp.status import Status
from amqproxy_mp.systemd import SystemdNotifier, watchdog_interval
from amqproxy_mp.tls import check_tls_files
from amqproxy_mp.worker_process import (
    SIGNALS,
    Slot,
    WorkerProcess,
    describe_exit,
    set_title,
    worker_main,
)

log = logging.getLogger(__name__)

#: How often the master checks heartbeats and respawns when nothing else wakes it.
SUPERVISE_INTERVAL: Final = 0.2
#: A worker that dies younger than this counts towards crash-loop back-off.
QUICK_DEATH: Final = 10.0
MAX_BACKOFF: Final = 30.0
#: How long a new worker may take to report that it accepts, during a reload.
READY_TIMEOUT: Final = 15.0
#: After a quick stop, workers that are still there after this are killed.
QUICK_STOP_TIMEOUT: Final = 10.0
#: A hung worker still there this long after its SIGABRT (a stopped one cannot even dump its
#: stack) gets SIGKILL.
ABORT_TIMEOUT: Final = 5.0

#: Tells a worker to stop accepting and drain its clients because it is being replaced.
RETIRE: Final = signal.SIGUSR2


class Master:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, WorkerProcess] = {}
        self.restarts: Counter[str] = Counter()
        self.stopping = ""  # "", "graceful" or "quick"
        self._wakeup: asyncio.Event | None = None
        self._reloading = False
        self._reload_again = False
        self._quick_stop_deadline = 0.0
        #: Why the last reload failed (the previous configuration is still running); "" when
        #: it succeeded or there was none.
        self.reload_error = ""
        #: The metrics directory, the broker probe, and /healthz, /metrics and /pools.
        self.status = Status(
            lambda: self.config,
            self._health_state,
            lambda: [WorkerInfo(w.slot, w.pid) for w in self.workers.values()],
            self.restarts,
            lambda: self.reload_error,
        )
        self._systemd = SystemdNotifier(os.environ)
        self._watchdog = watchdog_interval(os.environ)
        self._watchdog_at = 0.0
        #: READY=1 is due once every worker accepts (at start and after a reload).
        self._ready_due = True

    # --- start ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            check_tls_files(self.config)
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
        try:
            ls.check_ports_free(self.config)
        except ls.ListenerError as exc:
            log.error("%s", exc)
            return 1
        ls.check_tcp_migrate_req()
        self.status.open_metrics_dir()
        set_title(f"amqproxy: master [{ls.listen_text(self.config)} -> {self.config.upstream}]")
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._main())
        finally:
            loop.close()
            self.status.remove_metrics_dir()

    # --- main loop ----------------------------------------------------------------------------

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        if not await self.status.start():
            return 1
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            for number in range(1, self.config.worker_count + 1):
                self._add_slot(number)
        except OSError as exc:
            log.error("cannot listen on %s: %s", ls.listen_text(self.config), exc.strerror or exc)
            self.status.close()
            return 1
        log.info(
            "amqproxy-mp %s master started: %d workers on %s, upstream %s, HTTP port %s",
            __version__,
            len(self.slots),
            ls.listen_text(self.config),
            self.config.upstream,
            self.config.http_port,
        )
        while not (self.stopping and not self.workers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), SUPERVISE_INTERVAL)
            self._wakeup.clear()
            self._reap()
            self._supervise()
        self.status.close()
        for slot in self.slots.values():
            self._close_slot_sockets(slot)
        log.info("master exiting")
        return 0

    # --- signals --------------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        """Wake the main loop (it reaps and respawns), then call ``handle_<name>``."""
        assert self._wakeup is not None
        self._wakeup.set()
        name = signal.Signals(signum).name.removeprefix("SIG").lower()
        handler: Callable[[], None] | None = getattr(self, f"handle_{name}", None)
        if handler is None:  # pragma: no cover - every signal in SIGNALS has its handler
            log.error("received %s: no handler", signal.Signals(signum).name)
            return
        handler()

    def handle_chld(self) -> None:
        """A worker exited: the wakeup is all it takes, the main loop reaps it."""

    def handle_term(self) -> None:
        if not self.stopping:
            log.info("received SIGTERM: graceful stop (workers drain their clients)")
            self._stop("graceful", signal.SIGTERM)

    def handle_int(self) -> None:
        self._quick_stop("SIGINT")

    def handle_quit(self) -> None:
        self._quick_stop("SIGQUIT")

    def handle_hup(self) -> None:
        if not self.stopping:
            log.info("received SIGHUP: reloading the configuration and replacing workers")
            asyncio.get_running_loop().create_task(self._reload())

    def handle_ttin(self) -> None:
        if not self.stopping and self._try_add_slot():
            log.info("received SIGTTIN: now %d workers", len(self._live_slots()))

    def handle_ttou(self) -> None:
        live = self._live_slots()
        if not self.stopping and len(live) > 1:
            self._retire_slot(live[-1])
            log.info("received SIGTTOU: now %d workers", len(live) - 1)

    def handle_usr1(self) -> None:
        if not self.stopping:
            log.info("received SIGUSR1: reopening the log file")
            reopen_log_file()
            for worker in self.workers.values():
                self._kill(worker, signal.SIGUSR1)

    def _quick_stop(self, name: str) -> None:
        if self.stopping != "quick":
            log.info("received %s: quick stop", name)
            self._quick_stop_deadline = time.monotonic() + QUICK_STOP_TIMEOUT
            self._stop("quick", signal.SIGQUIT)

    def _stop(self, how: str, worker_signal: signal.Signals) -> None:
        self.stopping = how
        self._systemd.notify("STOPPING=1", f"STATUS=stopping ({how})")
        for slot in self.slots.values():
            # Without the master's copy, the socket closes when the worker stops accepting.
            self._close_slot_sockets(slot)
        for worker in list(self.workers.values()):
            self._kill(worker, worker_signal)

    # --- slots and workers --------------------------------------------------------------------

    def _live_slots(self) -> list[Slot]:
        return [slot for _, slot in sorted(self.slots.items()) if not slot.removed]

    def _add_slot(self, number: int) -> None:
        slot = Slot(number, [], [])
        self._open_slot_sockets(slot)
        self.slots[number] = slot
        self._spawn(slot)

    def _try_add_slot(self) -> bool:
        """One more worker slot, while running (its listening sockets may fail now)."""
        number = max(self.slots, default=0) + 1
        try:
            self._add_slot(number)
        except OSError as exc:
            log.error("worker %d cannot listen: %s", number, exc.strerror or exc)
            return False
        return True

    def _open_slot_sockets(self, slot: Slot) -> None:
        config = self.config
        host = config.listen_address
        slot.sockets = ls.open_listeners(host, config.listen_port) if config.listen_port else []
        slot.tls_sockets = ls.open_listeners(host, config.tls_port) if config.tls_port else []

    def _retire_slot(self, slot: Slot) -> None:
        slot.removed = True
        self._close_slot_sockets(slot)
        if slot.worker is not None:
            slot.worker.retiring = True
            self._kill(slot.worker, RETIRE)
        else:
            del self.slots[slot.number]

    def _close_slot_sockets(self, slot: Slot) -> None:
        for sock in slot.sockets + slot.tls_sockets:
            sock.close()
        slot.sockets = []
        slot.tls_sockets = []

    def _spawn(self, slot: Slot, candidate: bool = False) -> WorkerProcess:
        beat_read, beat_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(beat_read)
            code = 1
            try:
                code = worker_main(
                    self.config, slot, beat_write, self.workers.values(), self.status.metrics_dir
                )
            finally:
                os._exit(code)
        os.close(beat_write)
        os.set_blocking(beat_read, False)
        now = time.monotonic()
        worker = WorkerProcess(slot.number, pid, beat_read, now, now, candidate=candidate)
        self.workers[pid] = worker
        if not candidate:
            slot.worker = worker
        asyncio.get_running_loop().add_reader(beat_read, self._on_beat, worker)
        log.info("worker %d started (pid %d)", slot.number, pid)
        return worker

    def _on_beat(self, worker: WorkerProcess) -> None:
        try:
            data = os.read(worker.beat_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone; _reap does the rest
            asyncio.get_running_loop().remove_reader(worker.beat_fd)
            return
        worker.last_beat = time.monotonic()
        if not worker.ready:
            worker.ready = True
            slot = self.slots.get(worker.slot)
            if slot is not None and slot.worker is worker:
                slot.last_exit = ""
            log.debug("worker %d (pid %d) is accepting", worker.slot, worker.pid)

    def _kill(self, worker: WorkerProcess, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status)

    def _worker_exited(self, worker: WorkerProcess, status: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.beat_fd)
        os.close(worker.beat_fd)
        archive_dead_process(self.status.metrics_dir, worker.pid)
        text, reason = describe_exit(status)
        slot = self.slots.get(worker.slot)
        if slot is not None and slot.worker is worker:
            slot.worker = None
        if self.stopping or worker.retiring or worker.candidate:
            log.info("worker %d (pid %d) %s", worker.slot, worker.pid, text)
            if slot is not None and slot.removed and slot.worker is None:
                del self.slots[slot.number]
            return
        reason = worker.kill_reason or reason
        self.restarts[reason] += 1
        if slot is None or slot.removed:
            return
        now = time.monotonic()
        slot.failures = slot.failures + 1 if now - worker.started < QUICK_DEATH else 1
        slot.last_exit = f"worker {slot.number} {text}"
        delay = 0.0 if slot.failures <= 1 else min(MAX_BACKOFF, 2.0 ** (slot.failures - 2))
        slot.restart_at = now + delay
        if delay:
            # Until it is back, the kernel would still queue a share of the new connections on
            # its socket, where nobody accepts them: close it, so that they go to the other
            # workers (or are refused, with one worker) instead of waiting for the restart.
            self._close_slot_sockets(slot)
            log.error(
                "worker %d (pid %d) %s after %.1f s; %d failures in a row, restarting in %g s",
                worker.slot,
                worker.pid,
                text,
                now - worker.started,
                slot.failures,
                delay,
            )
        else:
            log.error("worker %d (pid %d) %s; restarting it", worker.slot, worker.pid, text)

    def _supervise(self) -> None:
        now = time.monotonic()
        if self._watchdog and now - self._watchdog_at >= self._watchdog:
            self._watchdog_at = now
            self._systemd.notify("WATCHDOG=1")
        if self._ready_due and not self._reloading and workers_verdict(self._health_state())[0]:
            self._ready_due = False
            self._systemd.notify(
                "READY=1",
                f"STATUS={len(self._live_slots())} workers accepting on "
                f"{ls.listen_text(self.config)}, upstream {self.config.upstream}",
            )
        if self.stopping == "quick" and now > self._quick_stop_deadline:
            for worker in self.workers.values():
                self._kill(worker, signal.SIGKILL)
        for worker in list(self.workers.values()):
            self._check_heartbeat(worker, now)
        if self.stopping:
            return
        for slot in self._live_slots():
            if slot.worker is None and now >= slot.restart_at:
                if not (slot.sockets or slot.tls_sockets):
                    try:
                        self._open_slot_sockets(slot)
                    except OSError as exc:
                        log.error("worker %d cannot listen again: %s", slot.number, exc)
                        slot.restart_at = now + MAX_BACKOFF
                        continue
                self._spawn(slot)
            elif (
                slot.worker is not None
                and slot.worker.ready
                and now - slot.worker.started > QUICK_DEATH
            ):
                slot.failures = 0

    def _check_heartbeat(self, worker: WorkerProcess, now: float) -> None:
        """A worker silent for worker_timeout gets SIGABRT: it writes every thread's stack to
        the log and dies. If it is still there ABORT_TIMEOUT later, SIGKILL."""
        timeout = self.config.worker_timeout
        if not worker.kill_reason and now - worker.last_beat > timeout:
            log.error(
                "worker %d (pid %d) missed heartbeats for %.1f s (worker_timeout %g s): "
                "SIGABRT (stack in the log)",
                worker.slot,
                worker.pid,
                now - worker.last_beat,
                timeout,
            )
            worker.kill_reason = "timeout"
            worker.kill_at = now + ABORT_TIMEOUT
            self._kill(worker, signal.SIGABRT)
        elif worker.kill_at and now > worker.kill_at:
            log.error(
                "worker %d (pid %d) still alive %g s after SIGABRT: SIGKILL",
                worker.slot,
                worker.pid,
                ABORT_TIMEOUT,
            )
            worker.kill_at = 0.0
            self._kill(worker, signal.SIGKILL)

    # --- reload ---------------------------------------------------------------------------------

    async def _reload(self) -> None:
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        self._ready_due = True
        self._systemd.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        try:
            while True:
                self._reload_again = False
                await self._reload_once()
                if not self._reload_again or self.stopping:
                    break
        finally:
            self._reloading = False

    async def _reload_once(self) -> None:
        """Load the configuration again, check it, and replace the workers one by one. A
        reload never costs capacity: a new worker that does not get ready is stopped, the
        old one goes on serving, and the master keeps the configuration that works."""
        try:
            new = load_config(self.argv, os.environ).config
            check_tls_files(new)
        except ConfigError as exc:
            self._reload_failed(str(exc))
            return
        old = self.config
        fixed = ("listen_address", "listen_port", "tls_port", "http_address", "http_port")
        changed = [name for name in fixed if getattr(new, name) != getattr(old, name)]
        if changed:
            log.warning(
                "%s cannot change on reload (restart to apply): keeping the running values",
                ", ".join(changed),
            )
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in fixed})
        try:
            setup_logging(new.log_level, os.environ, new.log_file)
        except OSError as exc:
            self._reload_failed(f"log_file = {new.log_file!r}: cannot open it ({exc.strerror})")
            return
        self.config = new
        live = self._live_slots()
        while len(live) > new.worker_count:
            self._retire_slot(live.pop())
        for slot in live:
            if self.stopping:
                return
            failure = await self._replace(slot)
            if failure:
                self.config = old
                setup_logging(old.log_level, os.environ, old.log_file)
                self._reload_failed(f"worker {slot.number} {failure} with the new configuration")
                return
        while len(self._live_slots()) < new.worker_count and not self.stopping:
            if not self._try_add_slot():
                # (the new configuration runs, with fewer workers than it asks for)
                self.reload_error = (
                    f"reloaded with {len(self._live_slots())} of {new.worker_count} workers: "
                    f"a new worker cannot listen (see the log)"
                )
                log.error("%s", self.reload_error)
                return
        self.reload_error = ""
        log.info("reload complete: %d workers", len(self._live_slots()))

    def _reload_failed(self, reason: str) -> None:
        self.reload_error = reason
        log.error("reload failed, the running configuration stays: %s", reason)

    async def _replace(self, slot: Slot) -> str:
        """Start the slot's new worker on the same socket; once it accepts, retire the old
        one. Returns why the new one could not take over ("" when it did)."""
        new = self._spawn(slot, candidate=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not new.ready and new.pid in self.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not new.ready:
            if new.pid in self.workers:
                self._kill(new, signal.SIGKILL)
                return f"did not get ready within {READY_TIMEOUT:g} s"
            return "exited at start"
        new.candidate = False
        # (whatever serves the slot now: the old worker may have died meanwhile and its
        # replacement been started)
        old, slot.worker = slot.worker, new
        if old is not None and old.pid in self.workers:
            old.retiring = True
            self._kill(old, RETIRE)
        return ""

    # --- health -----------------------------------------------------------------------------------

    def _health_state(self) -> HealthState:
        now = time.monotonic()
        return HealthState(
            slots=[
                SlotState(
                    beat_age=None if s.worker is None else now - s.worker.last_beat,
                    ready=s.worker is not None and s.worker.ready,
                    failures=s.failures,
                    last_exit=s.last_exit,
                )
                for s in self._live_slots()
            ],
            worker_timeout=self.config.worker_timeout,
            stopping=bool(self.stopping),
            upstream=str(self.config.upstream),
            upstream_error=self.status.probe.error,
            nodes_down=self.status.probe.down,
            reload_error=self.reload_error,
        )


def run(config: Config, argv: Sequence[str]) -> int:
    return Master(config, argv).run()
