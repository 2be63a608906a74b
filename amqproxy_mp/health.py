"""The /healthz verdict: a pure function of what the master knows of its slots and the broker.

The master gathers plain data (`HealthState`); `verdict` turns it into (healthy, text): 200 with
the text when healthy, 503 otherwise. `workers_verdict` leaves the broker out: the proxy is
ready to serve (systemd's READY=1) even while the broker is away. Every text here is listed in
docs/operations.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

#: A worker whose last heartbeat is older than this (or than half of worker_timeout, so that
#: /healthz turns 503 before the worker is killed; at least 1 s) does not count as up.
BEAT_AGE: Final = 2.0
#: Failed starts in a row from which a slot without a worker counts as crash-looping.
CRASH_LOOP: Final = 3


@dataclasses.dataclass(frozen=True)
class SlotState:
    """One configured (not retiring) worker slot."""

    #: Seconds since the slot's worker last beat; None while no worker serves the slot.
    beat_age: float | None = None
    #: The slot's worker has told the master it accepts connections.
    ready: bool = False
    #: Quick deaths in a row (a slot waiting out its restart back-off has one or more).
    failures: int = 0
    #: How its last worker ended ("worker 1 exited with code 1"); "" once one is ready again.
    last_exit: str = ""


@dataclasses.dataclass(frozen=True)
class HealthState:
    """Everything the verdict depends on."""

    #: The configured slots, in slot order.
    slots: Sequence[SlotState]
    worker_timeout: float
    #: A stop (TERM, INT, QUIT) is under way.
    stopping: bool = False
    #: The broker's address as shown to operators (no password).
    upstream: str = ""
    #: Why the last TCP check of the broker failed; "" when it (or any node of it) answered.
    upstream_error: str = ""
    #: The nodes that did not answer, with why, while another node did.
    nodes_down: Sequence[str] = ()
    #: Why the last reload failed (the previous configuration still runs); "" otherwise.
    reload_error: str = ""


def verdict(state: HealthState) -> tuple[bool, str]:
    """(healthy, text) for /healthz: the workers, then the broker, then the last reload."""
    ok, text = workers_verdict(state)
    if ok and state.upstream_error:
        return False, f"upstream {state.upstream} unreachable: {state.upstream_error}"
    if ok and state.nodes_down:  # served by the other nodes: healthy, but say so
        text = f"OK; upstream nodes down: {', '.join(state.nodes_down)}"
    if ok and state.reload_error:
        # still serving, on the previous configuration: healthy, but say so
        return True, f"{text}; the last reload failed: {state.reload_error}"
    return ok, text


def workers_verdict(state: HealthState) -> tuple[bool, str]:
    """Are all configured workers up and beating? (The broker is another matter.)"""
    if state.stopping:
        return False, "shutting down"
    slots = state.slots
    stale = max(1.0, min(BEAT_AGE, state.worker_timeout / 2))
    up = [s for s in slots if s.ready and s.beat_age is not None and s.beat_age < stale]
    looping = [s for s in slots if s.failures >= CRASH_LOOP and s.beat_age is None]
    if not up:
        last_exit = f" ({slots[0].last_exit})" if slots and slots[0].last_exit else ""
        return False, "no worker alive" + last_exit
    if looping:
        return False, f"crash-looping: {looping[0].last_exit}"
    if len(up) < len(slots):
        return False, f"{len(up)} of {len(slots)} workers up"
    return True, "OK"
