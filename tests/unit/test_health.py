"""The /healthz verdict: every branch of `amqproxy_mp.health`, from plain data."""

from __future__ import annotations

import dataclasses

import pytest

from amqproxy_mp.health import (
    BEAT_AGE,
    CRASH_LOOP,
    HealthState,
    SlotState,
    verdict,
    workers_verdict,
)

UP = SlotState(beat_age=0.3, ready=True)
#: No worker serves the slot: it died and waits out its back-off (or is about to be respawned).
DEAD = SlotState(beat_age=None, failures=1, last_exit="worker 2 killed by SIGKILL")


def state(*slots: SlotState, **fields: object) -> HealthState:
    base = HealthState(slots=slots, worker_timeout=30.0, upstream="amqp://broker:5672")
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_all_workers_up_and_the_broker_reachable() -> None:
    assert verdict(state(UP, UP, UP)) == (True, "OK")
    assert workers_verdict(state(UP, UP, UP)) == (True, "OK")


def test_stopping_wins_over_everything() -> None:
    everything_wrong = state(DEAD, stopping=True, upstream_error="refused", reload_error="x")
    assert verdict(everything_wrong) == (False, "shutting down")
    assert verdict(state(UP, UP, stopping=True)) == (False, "shutting down")


def test_no_slot_at_all_is_no_worker_alive() -> None:
    assert verdict(state()) == (False, "no worker alive")


def test_no_worker_alive_names_the_first_slots_last_exit() -> None:
    first = SlotState(beat_age=None, failures=1, last_exit="worker 1 exited with code 1")
    assert verdict(state(first, DEAD)) == (False, "no worker alive (worker 1 exited with code 1)")


def test_no_worker_alive_without_a_last_exit() -> None:
    starting = SlotState(beat_age=0.1, ready=False)  # forked, not accepting yet
    assert verdict(state(starting)) == (False, "no worker alive")


def test_a_missing_worker_is_n_of_m() -> None:
    assert verdict(state(UP, DEAD, UP)) == (False, "2 of 3 workers up")


def test_a_worker_not_ready_yet_does_not_count() -> None:
    assert verdict(state(UP, SlotState(beat_age=0.1))) == (False, "1 of 2 workers up")


@pytest.mark.parametrize(
    ("worker_timeout", "age", "up"),
    [
        (30.0, BEAT_AGE - 0.1, True),  # long timeout: stale after BEAT_AGE
        (30.0, BEAT_AGE, False),
        (3.0, 1.4, True),  # short timeout: stale after half of it...
        (3.0, 1.5, False),
        (1.0, 0.9, True),  # ...but never under 1 s
        (1.0, 1.0, False),
    ],
)
def test_a_worker_with_a_stale_heartbeat_does_not_count(
    worker_timeout: float, age: float, up: bool
) -> None:
    beating = SlotState(beat_age=age, ready=True)
    expected = (True, "OK") if up else (False, "1 of 2 workers up")
    assert verdict(state(UP, beating, worker_timeout=worker_timeout)) == expected


def test_every_worker_stale_is_no_worker_alive() -> None:
    stale = SlotState(beat_age=BEAT_AGE + 5, ready=True)
    assert verdict(state(stale, stale)) == (False, "no worker alive")


def test_a_slot_backing_off_below_the_crash_loop_threshold_is_just_down() -> None:
    backing_off = SlotState(
        beat_age=None, failures=CRASH_LOOP - 1, last_exit="worker 2 exited with code 1"
    )
    assert verdict(state(UP, backing_off)) == (False, "1 of 2 workers up")


def test_a_slot_backing_off_at_the_threshold_is_crash_looping() -> None:
    looping = SlotState(beat_age=None, failures=CRASH_LOOP, last_exit="worker 2 exited with code 1")
    assert verdict(state(UP, looping)) == (False, "crash-looping: worker 2 exited with code 1")


def test_crash_looping_names_the_first_looping_slot() -> None:
    a = SlotState(beat_age=None, failures=CRASH_LOOP + 2, last_exit="worker 2 killed by SIGSEGV")
    b = SlotState(beat_age=None, failures=CRASH_LOOP, last_exit="worker 3 exited with code 1")
    assert verdict(state(UP, a, b)) == (False, "crash-looping: worker 2 killed by SIGSEGV")


def test_a_restarted_worker_still_counting_failures_is_not_crash_looping() -> None:
    # a worker serves the slot again (failures are reset once it has lived QUICK_DEATH)
    restarted = SlotState(beat_age=0.2, ready=True, failures=CRASH_LOOP + 1)
    assert verdict(state(UP, restarted)) == (True, "OK")


def test_every_slot_crash_looping_is_no_worker_alive() -> None:
    looping = SlotState(beat_age=None, failures=CRASH_LOOP, last_exit="worker 1 exited with code 1")
    assert verdict(state(looping)) == (False, "no worker alive (worker 1 exited with code 1)")


def test_upstream_down_with_all_workers_up() -> None:
    down = state(UP, UP, upstream_error="Connection refused")
    assert verdict(down) == (False, "upstream amqp://broker:5672 unreachable: Connection refused")
    # READY=1 does not wait for the broker
    assert workers_verdict(down) == (True, "OK")


def test_workers_down_are_reported_before_the_upstream() -> None:
    assert verdict(state(UP, DEAD, upstream_error="Connection refused")) == (
        False,
        "1 of 2 workers up",
    )


def test_reload_error_is_healthy_but_said() -> None:
    failed = state(UP, UP, reload_error="worker 1 exited at start with the new configuration")
    assert verdict(failed) == (
        True,
        "OK; the last reload failed: worker 1 exited at start with the new configuration",
    )
    assert workers_verdict(failed) == (True, "OK")


def test_upstream_down_is_reported_before_a_reload_error() -> None:
    both = state(UP, upstream_error="no answer within 5 s", reload_error="bad config")
    assert verdict(both) == (False, "upstream amqp://broker:5672 unreachable: no answer within 5 s")


def test_reload_error_does_not_hide_missing_workers() -> None:
    assert verdict(state(UP, DEAD, reload_error="bad config")) == (False, "1 of 2 workers up")


def test_a_cluster_with_some_nodes_down_is_healthy_and_names_them() -> None:
    down = state(UP, nodes_down=("amqp://b:5672 (Connection refused)",))
    assert verdict(down) == (True, "OK; upstream nodes down: amqp://b:5672 (Connection refused)")
    both = state(UP, nodes_down=("amqp://b:5672 (refused)",), reload_error="bad config")
    assert verdict(both) == (
        True,
        "OK; upstream nodes down: amqp://b:5672 (refused); the last reload failed: bad config",
    )
