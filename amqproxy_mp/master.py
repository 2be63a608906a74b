"""The master process: listening sockets, worker processes, signals, health and metrics.

Modelled on gunicorn's arbiter. The master never speaks AMQP and keeps no client
state. It opens one SO_REUSEPORT listening socket per worker slot before forking
(as nginx does), so a slot's socket, and the connections queued on it, outlive
the worker that accepts from it: a crashed worker's replacement inherits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from typing import Final

from amqproxy_mp import __version__
from amqproxy_mp.config import Config, ConfigError, load_config
from amqproxy_mp.http import Response, start_http_server
from amqproxy_mp.logs import reopen_log_file, setup_logging
from amqproxy_mp.metrics import (
    MasterMetrics,
    WorkerInfo,
    archive_dead_process,
    prepare_directory,
    read_pool_status,
)
from amqproxy_mp.systemd import SystemdNotifier, watchdog_interval
from amqproxy_mp.tls import check_tls_files
from amqproxy_mp.worker import LISTEN_BACKLOG

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
#: How often the master checks that the broker accepts TCP connections (for /healthz).
UPSTREAM_CHECK_INTERVAL: Final = 2.0
#: A worker whose last heartbeat is older than this (or than half of worker_timeout, so
#: that /healthz turns 503 before the worker is killed) does not count as up in /healthz.
BEAT_AGE: Final = 2.0
#: Failed starts in a row from which /healthz reports a slot as crash-looping.
CRASH_LOOP: Final = 3

#: Tells a worker to stop accepting and drain its clients because it is being replaced.
RETIRE: Final = signal.SIGUSR2

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


class MasterError(Exception):
    """A start-up failure the operator must fix (port in use, ...); exit code 1."""


def describe_exit(status: int) -> tuple[str, str]:
    """(text for the log, reason label for the restart metric) of a wait status."""
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"killed by {name}", "signal"
    code = os.WEXITSTATUS(status)
    return f"exited with code {code}", "exit" if code else "clean_exit"


class Master:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, WorkerProcess] = {}
        self.restarts: Counter[str] = Counter()
        self.stopping = ""  # "", "graceful" or "quick"
        self.metrics_dir = ""
        self._own_metrics_dir = False
        self._wakeup: asyncio.Event | None = None
        self._http: asyncio.Server | None = None
        self._reloading = False
        self._reload_again = False
        self._quick_stop_deadline = 0.0
        self._metrics: MasterMetrics | None = None
        #: Why the last TCP check of the broker failed; "" when it answered.
        self.upstream_error = ""
        #: Why the last reload failed (the previous configuration is still running); "" when
        #: it succeeded or there was none.
        self.reload_error = ""
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
            self._check_port_free()
        except MasterError as exc:
            log.error("%s", exc)
            return 1
        self._check_tcp_migrate_req()
        self._setup_metrics_dir()
        title = f"amqproxy: master [{self._listen_text()} -> {self.config.upstream}]"
        _set_title(title)
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._main())
        finally:
            loop.close()
            if self._own_metrics_dir:
                with contextlib.suppress(OSError):
                    prepare_directory(self.metrics_dir)
                    os.rmdir(self.metrics_dir)

    def _listen_text(self) -> str:
        host = self.config.listen_address
        host = f"[{host}]" if ":" in host else host
        return ",".join(f"{'tls:' if tls else ''}{host}:{port}" for port, tls in self._ports())

    def _ports(self) -> list[tuple[int, bool]]:
        """(port, is TLS) of each configured AMQP listener."""
        config = self.config
        ports = [(config.listen_port, False), (config.tls_port, True)]
        return [(port, tls) for port, tls in ports if port]

    def _addresses(
        self, port: int
    ) -> list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]]:
        config = self.config
        try:
            infos = socket.getaddrinfo(
                config.listen_address,
                port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
        except socket.gaierror as exc:
            raise MasterError(
                f"cannot resolve listen address {config.listen_address!r}: {exc.strerror}"
            ) from None
        seen: list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]] = []
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr) not in seen:
                seen.append((family, sockaddr))  # type: ignore[arg-type]
        return seen

    def _check_port_free(self) -> None:
        """Bind without SO_REUSEPORT first, so a second instance fails instead of sharing."""
        addresses = [a for port, _ in self._ports() for a in self._addresses(port)]
        for family, sockaddr in addresses:
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(sockaddr)
            except OSError as exc:
                raise MasterError(
                    f"cannot listen on {sockaddr[0]} port {sockaddr[1]}: {exc.strerror} "
                    f"(is another amqproxy running?)"
                ) from None
            finally:
                probe.close()

    def _open_listeners(self, port: int) -> list[socket.socket]:
        """One SO_REUSEPORT socket per address for one worker slot."""
        sockets: list[socket.socket] = []
        for family, sockaddr in self._addresses(port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(LISTEN_BACKLOG)  # (the worker's create_server repeats it)
            except OSError:
                sock.close()
                for other in sockets:
                    other.close()
                raise
            sockets.append(sock)
        return sockets

    def _check_tcp_migrate_req(self) -> None:
        try:
            with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
                enabled = f.read().strip() != "0"
        except OSError:
            return
        if not enabled:
            log.info(
                "net.ipv4.tcp_migrate_req is 0: connections queued on a retiring worker's socket "
                "(TTOU, stop) are reset instead of moved to another worker; enable it with "
                "'sysctl -w net.ipv4.tcp_migrate_req=1'"
            )

    def _setup_metrics_dir(self) -> None:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        if not directory:
            directory = tempfile.mkdtemp(prefix="amqproxy-metrics-")
            self._own_metrics_dir = True
        prepare_directory(directory)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        self.metrics_dir = directory
        self._metrics = MasterMetrics(directory, __version__, str(self.config.upstream))

    # --- main loop ----------------------------------------------------------------------------

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        try:
            self._http = await start_http_server(
                self.config.http_address,
                self.config.http_port,
                {"/healthz": self._healthz, "/metrics": self._metrics_page, "/pools": self._pools},
            )
        except OSError as exc:
            log.error(
                "cannot serve HTTP on %s port %s: %s",
                self.config.http_address,
                self.config.http_port,
                exc.strerror or exc,
            )
            return 1
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        probe = loop.create_task(self._watch_upstream())
        try:
            for number in range(1, self.config.worker_count + 1):
                self._add_slot(number)
        except OSError as exc:
            log.error("cannot listen on %s: %s", self._listen_text(), exc.strerror or exc)
            return 1
        log.info(
            "amqproxy-mp %s master started: %d workers on %s, upstream %s, HTTP port %s",
            __version__,
            len(self.slots),
            self._listen_text(),
            self.config.upstream,
            self.config.http_port,
        )
        while not (self.stopping and not self.workers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), SUPERVISE_INTERVAL)
            self._wakeup.clear()
            self._reap()
            self._supervise()
        probe.cancel()
        self._http.close()
        for slot in self.slots.values():
            self._close_slot_sockets(slot)
        log.info("master exiting")
        return 0

    def _on_signal(self, signum: int) -> None:
        assert self._wakeup is not None
        self._wakeup.set()
        if signum == signal.SIGCHLD:
            return
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            if not self.stopping:
                log.info("received SIGTERM: graceful stop (workers drain their clients)")
                self._stop("graceful", signal.SIGTERM)
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            if self.stopping != "quick":
                log.info("received %s: quick stop", name)
                self._quick_stop_deadline = time.monotonic() + QUICK_STOP_TIMEOUT
                self._stop("quick", signal.SIGQUIT)
        elif self.stopping:
            return
        elif signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading the configuration and replacing workers")
            asyncio.get_running_loop().create_task(self._reload())
        elif signum == signal.SIGTTIN:
            self._add_slot(max(self.slots, default=0) + 1)
            log.info("received SIGTTIN: now %d workers", len(self._live_slots()))
        elif signum == signal.SIGTTOU:
            live = self._live_slots()
            if len(live) > 1:
                self._retire_slot(live[-1])
                log.info("received SIGTTOU: now %d workers", len(live) - 1)
        elif signum == signal.SIGUSR1:
            log.info("received SIGUSR1: reopening the log file")
            reopen_log_file()
            for worker in self.workers.values():
                self._kill(worker, signal.SIGUSR1)

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

    def _open_slot_sockets(self, slot: Slot) -> None:
        config = self.config
        slot.sockets = self._open_listeners(config.listen_port) if config.listen_port else []
        slot.tls_sockets = self._open_listeners(config.tls_port) if config.tls_port else []

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
                code = self._worker_main(slot, beat_write)
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

    def _worker_main(self, slot: Slot, beat_fd: int) -> int:
        """In the forked child: drop the master's loop, signals and sockets, then serve."""
        try:
            asyncio.events._set_running_loop(None)
            signal.set_wakeup_fd(-1)
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            _drop_inherited_sockets({sock.fileno() for sock in slot.sockets + slot.tls_sockets})
            for worker in self.workers.values():
                os.close(worker.beat_fd)
            _set_title(f"amqproxy: worker {slot.number}")
            from amqproxy_mp.worker import Worker

            return Worker(
                self.config,
                sockets=slot.sockets,
                tls_sockets=slot.tls_sockets,
                slot=slot.number,
                beat_fd=beat_fd,
                metrics_dir=self.metrics_dir,
            ).run()
        except BaseException:
            log.exception("worker %d failed", slot.number)
            return 1

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
        archive_dead_process(self.metrics_dir, worker.pid)
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
        if self._ready_due and not self._reloading and self.workers_health()[0]:
            self._ready_due = False
            self._systemd.notify(
                "READY=1",
                f"STATUS={len(self._live_slots())} workers accepting on "
                f"{self._listen_text()}, upstream {self.config.upstream}",
            )
        if self.stopping == "quick" and now > self._quick_stop_deadline:
            for worker in self.workers.values():
                self._kill(worker, signal.SIGKILL)
        timeout = self.config.worker_timeout
        for worker in list(self.workers.values()):
            if not worker.kill_reason and now - worker.last_beat > timeout:
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.1f s (worker_timeout %g s): "
                    "killing it",
                    worker.slot,
                    worker.pid,
                    now - worker.last_beat,
                    timeout,
                )
                worker.kill_reason = "timeout"
                self._kill(worker, signal.SIGKILL)
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

    async def _watch_upstream(self) -> None:
        """Try a TCP connection to the broker every few seconds, for /healthz: workers only
        connect when clients come, and an operator wants to know before they do."""
        upstream = self.config.upstream
        while True:
            try:
                async with asyncio.timeout(self.config.upstream_connect_timeout):
                    _, writer = await asyncio.open_connection(upstream.host, upstream.port)
                writer.close()
                error = ""
            except TimeoutError:
                error = f"no answer within {self.config.upstream_connect_timeout:g} s"
            except OSError as exc:
                error = exc.strerror or str(exc)
            if error != self.upstream_error:
                if error:
                    log.error("upstream %s unreachable: %s", upstream, error)
                elif self.upstream_error:
                    log.info("upstream %s reachable again", upstream)
            self.upstream_error = error
            await asyncio.sleep(UPSTREAM_CHECK_INTERVAL)

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
            self._add_slot(max(self.slots, default=0) + 1)
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

    # --- HTTP -----------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        ok, reason = self.workers_health()
        if ok and self.upstream_error:
            return False, f"upstream {self.config.upstream} unreachable: {self.upstream_error}"
        if ok and self.reload_error:
            # still serving, on the previous configuration: healthy, but say so
            return True, f"OK; the last reload failed: {self.reload_error}"
        return ok, reason

    def workers_health(self) -> tuple[bool, str]:
        """Are all configured workers up and beating? (The broker is another matter: the
        proxy is ready to serve even while it is away.)"""
        if self.stopping:
            return False, "shutting down"
        slots = self._live_slots()
        now = time.monotonic()
        stale = max(1.0, min(BEAT_AGE, self.config.worker_timeout / 2))
        up = [
            s for s in slots
            if s.worker is not None and s.worker.ready and now - s.worker.last_beat < stale
        ]  # fmt: skip
        looping = [s for s in slots if s.failures >= CRASH_LOOP and s.worker is None]
        if not up:
            return False, "no worker alive" + (
                f" ({slots[0].last_exit})" if slots and slots[0].last_exit else ""
            )
        if looping:
            return False, f"crash-looping: {looping[0].last_exit}"
        if len(up) < len(slots):
            return False, f"{len(up)} of {len(slots)} workers up"
        return True, "OK"

    def _healthz(self) -> Response:
        ok, reason = self.health()
        return (200 if ok else 503), "text/plain; charset=utf-8", (reason + "\n").encode()

    def _metrics_page(self) -> Response:
        assert self._metrics is not None
        workers = [WorkerInfo(w.slot, w.pid) for w in self.workers.values()]
        body = self._metrics.render(workers, self.restarts, not self.reload_error)
        return 200, "text/plain; version=0.0.4; charset=utf-8", body

    def _pools(self) -> Response:
        entries = read_pool_status(self.metrics_dir, list(self.workers))
        return 200, "application/json", json.dumps(entries, indent=1).encode()


def _drop_inherited_sockets(keep: set[int]) -> None:
    """In a new worker: every socket of the master's (the HTTP listener and its clients,
    other slots' listeners, an upstream probe under way) is pointed at /dev/null, so the
    worker holds none of them open. Not closed: objects of the master that the fork copied
    would close those numbers again later, when they may belong to the worker's own sockets.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for name in names:
            fd = int(name)
            if fd in keep or fd <= 2 or fd == devnull:
                continue
            try:
                is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
            except OSError:
                continue  # (the directory listing's own descriptor, gone already)
            if is_socket:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - it is a dependency, but titles are cosmetic
        return
    setproctitle.setproctitle(title)


def run(config: Config, argv: Sequence[str]) -> int:
    return Master(config, argv).run()
