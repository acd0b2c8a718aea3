"""Warm readiness: a run goes to a warm container that has imported Prefect before one that is
still booting, a booting one still beats a cold start, and one that dies while booting is
removed, never handed a run."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from dockerworker import metrics, warm
from dockerworker.jobs import JobVariables
from dockerworker.warm import LABEL_WARM, WarmPool

from .fakes import FakeContainer, FakeRuntime, wait_until
from .test_warm_keys import spec_for

JOB = JobVariables(image="flows:1")


def waiting(runtime: FakeRuntime) -> list[FakeContainer]:
    """The warm containers, oldest first."""
    with runtime._lock:
        found = [c for c in runtime.containers.values() if LABEL_WARM in c.workload.labels]
    return sorted(found, key=lambda c: c.started)


@pytest.fixture
def booting(runtime: FakeRuntime) -> FakeRuntime:
    runtime.boot_at_once = False  # each says it is ready when the test sets its `ready`
    return runtime


def test_a_ready_container_is_taken_before_an_older_one_still_booting(booting) -> None:
    pool = WarmPool(booting, size=2)
    assert pool.take(spec_for(JOB)) is None  # the first run of a configuration: cold
    wait_until(lambda: len(waiting(booting)) == 2)
    wait_until(lambda: pool.waiting() == 2)  # the metric: booting ones wait too
    _older, newer = waiting(booting)
    newer.ready.set()
    wait_until(lambda: pool.ready() == 1)
    taken = pool.take(spec_for(JOB))
    assert taken is not None and taken.id == newer.workload.id
    assert pool.ready() == 0
    pool.close()


def test_with_none_ready_the_oldest_booting_one_is_still_taken(booting) -> None:
    pool = WarmPool(booting, size=2)
    pool.take(spec_for(JOB))
    wait_until(lambda: len(waiting(booting)) == 2)
    older, _newer = waiting(booting)
    taken = pool.take(spec_for(JOB))  # ahead of a cold start all the same
    assert taken is not None and taken.id == older.workload.id
    pool.close()


def test_one_that_ends_while_booting_is_removed_and_never_handed_a_run(booting) -> None:
    pool = WarmPool(booting, size=1)
    pool.take(spec_for(JOB))
    wait_until(lambda: len(waiting(booting)) == 1)
    (broken,) = waiting(booting)
    booting.finish(broken, exit_code=1)  # its import failed
    wait_until(lambda: broken.removed)  # dropped from the pool first, then removed
    assert broken.workload.id not in pool.holds()
    assert pool.ready() == 0
    pool.close()


def test_a_slow_one_past_the_boot_timeout_stays_booting_not_removed(booting,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(warm, "BOOT_TIMEOUT", 0.05)
    pool = WarmPool(booting, size=1)
    pool.take(spec_for(JOB))
    wait_until(lambda: len(waiting(booting)) == 1)
    (slow,) = waiting(booting)
    follower = f"warm-ready-{slow.workload.name[-6:]}"  # the thread waiting for it
    wait_until(lambda: ("wait_ready", slow.workload.name) in booting.calls)
    wait_until(lambda: follower not in {t.name for t in threading.enumerate()})  # gave up
    assert slow.workload.id in pool.holds() and not slow.removed and pool.ready() == 0
    taken = pool.take(spec_for(JOB))
    assert taken is not None and taken.id == slow.workload.id
    pool.close()


def test_a_taken_container_is_held_until_handed_and_an_ended_one_not_at_all(
        booting, monkeypatch) -> None:
    """Recovery asks `holds()` which containers are not leftovers: one given out is still
    the pool's until its supervisor holds it; one that had ended when taken is removed and
    not held (else nothing would ever remove a container left behind)."""
    pool = WarmPool(booting, size=2)
    pool.take(spec_for(JOB))
    wait_until(lambda: len(waiting(booting)) == 2)
    older, newer = waiting(booting)
    is_running = booting.is_running  # older ended while waiting; its follower has not seen it
    monkeypatch.setattr(booting, "is_running",
                        lambda w: w.id != older.workload.id and is_running(w))
    taken = pool.take(spec_for(JOB))
    assert taken is not None and taken.id == newer.workload.id
    assert older.removed and older.workload.id not in pool.holds()
    assert taken.id in pool.holds()  # being handed over: not a leftover
    pool.handed(taken)
    assert taken.id not in pool.holds()
    pool.close()


def test_a_waiting_container_is_removed_before_its_entry_script_gives_up(
        runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry script exits unused after the pool's ttl (WARM_TTL): 30 s before, the worker
    neither hands it a run (a run would start in a container about to exit) nor keeps it."""
    clock = SimpleNamespace(monotonic=time.monotonic)
    monkeypatch.setattr(warm, "time", clock)
    pool = WarmPool(runtime, size=1, ttl=100)
    pool.take(spec_for(JOB))
    wait_until(lambda: pool.ready() == 1)
    (first,) = waiting(runtime)
    made = time.monotonic()
    evicted = metrics.WARM_EVICTIONS._value.get()
    clock.monotonic = lambda: made + 100 - 30 - 1
    pool.expire()
    assert not first.removed and pool.holds() == {first.workload.id}
    clock.monotonic = lambda: made + 100 - 30 + 1
    assert pool.take(spec_for(JOB)) is None  # too close to its end: cold, and removed
    wait_until(lambda: first.removed)
    wait_until(lambda: pool.ready() == 1)  # its replacement
    (second,) = [c for c in waiting(runtime) if not c.removed]  # made at made + 71
    clock.monotonic = lambda: made + 2 * (100 - 30 + 1)
    pool.expire()
    wait_until(lambda: second.removed)
    assert pool.holds() == set()
    assert metrics.WARM_EVICTIONS._value.get() == evicted + 1  # expired unused
    pool.close()
