"""Resident memory (RSS) of the proxy's workers: one reading, or the peak over a stretch of a
test (RssSampler)."""

from __future__ import annotations

import contextlib

import psutil

from .proxy import ProxyProcess, worker_processes


def worker_rss(p: ProxyProcess) -> int:
    """Resident memory of the proxy's workers, in bytes."""
    total = 0
    for proc in worker_processes(p):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


class RssSampler:
    """Samples the workers' RSS every ``interval`` s in a thread; ``peak`` is the largest."""

    def __init__(self, p: ProxyProcess, interval: float = 0.1) -> None:
        import threading

        self.p = p
        self.interval = interval
        self.baseline = worker_rss(p)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, worker_rss(self.p))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, worker_rss(self.p))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
