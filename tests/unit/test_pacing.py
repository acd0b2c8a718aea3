"""Polling as the net while the event stream is connected (pacing.py): rare polls that look
ahead, a run scheduled in between claimed when it falls due, frequent polls again without the
stream; the heartbeat does without the pool read; a freed slot takes the next run at once."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from dockerworker.api import NotFound, StateType
from dockerworker.events import EventListener

from .fakes import FakeAPI, make_worker, settle, wait_until
from .test_events import POOL, StreamServer


def connect(worker: Any) -> threading.Event:
    """The worker's event stream, as connected (the test sets and clears it)."""
    connected = threading.Event()
    connected.set()
    worker.events = SimpleNamespace(connected=connected)
    return connected


def record_horizon(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Each poll's `scheduled_before`."""
    seen: list[datetime] = []
    real = api.get_scheduled_flow_runs

    def poll(pool: str, scheduled_before: datetime, *args: Any, **kwargs: Any) -> Any:
        seen.append(scheduled_before)
        return real(pool, scheduled_before, *args, **kwargs)

    monkeypatch.setattr(api, "get_scheduled_flow_runs", poll)
    return seen


def schedule_in(api: FakeAPI, seconds: float, name: str = "later") -> Any:
    run = api.add_run(name)
    api.runs[run.id] = run.model_copy(update={
        "next_scheduled_start_time": datetime.now(UTC) + timedelta(seconds=seconds)})
    return run


def test_without_the_stream_polls_stay_frequent_and_look_only_the_prefetch_ahead(
    api, runtime, monkeypatch
) -> None:
    worker = make_worker(api, runtime, poll_interval=5, prefetch_seconds=10)
    horizons = record_horizon(api, monkeypatch)
    assert worker._poll_interval() == 5
    before = datetime.now(UTC)
    worker.poll()
    assert timedelta(seconds=9) < horizons[0] - before < timedelta(seconds=11)


def test_with_the_stream_polls_are_rare_and_look_until_the_next_one(
    api, runtime, monkeypatch
) -> None:
    worker = make_worker(api, runtime, poll_interval=5, prefetch_seconds=10)
    connected = connect(worker)
    horizons = record_horizon(api, monkeypatch)
    assert worker._poll_interval() == 30  # the default --poll-interval-with-events
    before = datetime.now(UTC)
    worker.poll()
    assert timedelta(seconds=39) < horizons[0] - before < timedelta(seconds=41)
    connected.clear()  # the stream is gone: back to the frequent poll
    assert worker._poll_interval() == 5
    assert worker.slowest_poll_interval() == 30  # /health allows for the rare one


def test_a_longer_poll_interval_than_the_net_s_is_kept(api, runtime) -> None:
    worker = make_worker(api, runtime, poll_interval=45)
    connect(worker)
    assert worker._poll_interval() == 45


def test_a_run_scheduled_before_the_next_poll_is_claimed_when_due_not_before(
    api, runtime
) -> None:
    worker = make_worker(api, runtime, prefetch_seconds=10)
    connect(worker)
    now = api.add_run("now")
    later = schedule_in(api, 25)
    worker.poll()
    settle(worker)
    assert api.state_of(now.id).type == StateType.COMPLETED
    assert api.state_of(later.id).type == StateType.SCHEDULED  # not claimed 25 s early
    assert 14 < worker._poll_interval() <= 15  # the next poll: when it is 10 s from due
    later_now = api.runs[later.id].model_copy(update={
        "next_scheduled_start_time": datetime.now(UTC) + timedelta(seconds=5)})
    api.runs[later.id] = later_now  # time passes: it is within the prefetch now
    worker.poll()
    settle(worker)
    assert api.state_of(later.id).type == StateType.COMPLETED
    assert worker._poll_interval() == 30  # nothing ahead: the net's interval again


def test_the_loop_claims_a_run_scheduled_ahead_at_its_time(api, runtime) -> None:
    """The real loop with rare polls: a run due 1.5 s from now (prefetch 0) is claimed about
    then, not at the next net poll 30 s later."""
    worker = make_worker(api, runtime, start=False, prefetch_seconds=0)
    worker.wait_for_server = lambda: None  # type: ignore[method-assign]
    connect(worker)
    api.server = dataclasses.replace(api.server, event_stream=False)  # keep the test's stream
    run = schedule_in(api, 1.5)
    started = time.monotonic()
    threading.Thread(target=worker._loop, daemon=True).start()
    try:
        wait_until(lambda: api.state_of(run.id).type != StateType.SCHEDULED, timeout=10)
        assert 1.0 < time.monotonic() - started < 5.0
    finally:
        worker.stop()


def test_a_freed_slot_takes_the_next_run_at_once(api, runtime) -> None:
    """With --limit and rare polls, a run left scheduled starts when a slot frees, not at the
    next poll."""
    runs = [api.add_run(f"r{i}") for i in range(2)]
    worker = make_worker(api, runtime, limit=1, max_starting=0)
    connect(worker)
    worker.poll()
    wait_until(lambda: api.state_of(runs[0].id).type == StateType.COMPLETED)
    wait_until(worker._nudged.is_set)  # the loop polls at once
    worker._nudged.clear()
    worker.poll()
    settle(worker)
    assert api.state_of(runs[1].id).type == StateType.COMPLETED


def test_a_slot_freed_with_room_to_spare_asks_for_no_extra_poll(api, runtime) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime, limit=2, max_starting=0)
    connect(worker)
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert not worker._nudged.is_set()


def test_the_heartbeat_does_not_read_the_pool(api, runtime, monkeypatch) -> None:
    worker = make_worker(api, runtime)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the heartbeat read the pool")

    monkeypatch.setattr(api, "read_work_pool", refused)
    assert worker._step("heartbeat", worker._heartbeat)
    assert api.heartbeats >= 1


def test_a_pool_deleted_meanwhile_is_seen_by_the_heartbeat(api, runtime, monkeypatch) -> None:
    worker = make_worker(api, runtime)
    made: list[int] = []
    monkeypatch.setattr(worker, "ensure_pool", lambda: made.append(1) or api.pool)
    api.fail["heartbeat"] = NotFound("work pool")  # the server's 404
    assert worker._step("heartbeat", worker._heartbeat)
    assert made == [1]


def test_the_listener_says_when_a_live_stream_ends() -> None:
    server = StreamServer()
    stop = threading.Event()
    ends: list[int] = []
    listener = EventListener(
        f"http://127.0.0.1:{server.port}/api", POOL, lambda: (None, {}), lambda *a: None, stop,
        on_disconnect=lambda: ends.append(1), max_backoff=0.1, close_timeout=0.1,
    ).start()
    try:
        wait_until(listener.connected.is_set)
        assert ends == []
        server.outbox.put("close")  # the server ends the subscription
        wait_until(lambda: len(ends) == 1)
        wait_until(lambda: listener.connections == 2)  # and it subscribes again
    finally:
        stop.set()
        server.server.shutdown()
