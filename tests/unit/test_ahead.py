"""Warming ahead (ahead.py): a run seen scheduled for later gets a waiting container of its
configuration before it is due and is not claimed early; each run is worked out once however
often polls see it; what could not start (dependencies to build, a refused job, a missing
image, a deployment gone) is not warmed and is reported by its claim as before."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from dockerworker.ahead import WarmAhead
from dockerworker.api import FlowRun, StateType
from dockerworker.warm import LABEL_WARM

from .fakes import FakeAPI, FakeRuntime, make_worker, settle, wait_until
from .test_pacing import record_horizon


def scheduled(api: FakeAPI, seconds: float, **run: Any) -> FlowRun:
    """A run of a deployment due in `seconds`."""
    flow_run = api.add_run("later", deployment=api.add_deployment(), **run)
    api.runs[flow_run.id] = flow_run.model_copy(update={
        "next_scheduled_start_time": datetime.now(UTC) + timedelta(seconds=seconds)})
    return api.runs[flow_run.id]


def fall_due(api: FakeAPI, run_id: UUID) -> None:
    api.runs[run_id] = api.runs[run_id].model_copy(update={
        "next_scheduled_start_time": datetime.now(UTC)})


def waiting(runtime: FakeRuntime) -> list[str]:
    with runtime._lock:
        return [c.workload.id for c in runtime.containers.values()
                if LABEL_WARM in c.workload.labels and c.workload.name.startswith(
                    "dockerworker-warm-")]


def warmed_ahead_done() -> bool:
    return not any(t.name == "warm-ahead" for t in threading.enumerate())


def test_a_run_seen_scheduled_later_is_warmed_for_and_then_served_warm(api, runtime) -> None:
    worker = make_worker(api, runtime, warm=1, prefetch_seconds=10)
    run = scheduled(api, 40)  # past the prefetch, within the warm lead
    worker.poll()
    wait_until(lambda: len(waiting(runtime)) == 1)
    assert api.state_of(run.id).type == StateType.SCHEDULED  # not claimed before its time
    assert len(worker.admission) == 0
    [warmed] = waiting(runtime)

    fall_due(api, run.id)
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert api.runs[run.id].infrastructure_pid.endswith(":" + warmed)  # the first run: warm
    worker.shipper.flush()
    assert any("took over the run" in m for m in api.messages(run.id))


def test_what_is_warmed_ahead_says_nothing_to_the_run(api, runtime) -> None:
    """Another worker may claim it: its logs hold only what its own claim did."""
    worker = make_worker(api, runtime, warm=1, prefetch_seconds=10)
    run = scheduled(api, 40)
    worker.poll()
    wait_until(lambda: len(waiting(runtime)) == 1)
    worker.shipper.flush()
    assert api.messages(run.id) == []


def test_with_warm_the_poll_looks_the_warm_lead_further(api, runtime, monkeypatch) -> None:
    worker = make_worker(api, runtime, warm=1, poll_interval=5, prefetch_seconds=10)
    horizons = record_horizon(api, monkeypatch)
    before = datetime.now(UTC)
    worker.poll()
    assert timedelta(seconds=69) < horizons[0] - before < timedelta(seconds=71)


def test_each_run_is_worked_out_once_however_often_it_is_seen(api) -> None:
    worked: list[UUID] = []
    warmed: list[object] = []
    ahead = WarmAhead(_Pool(warmed), lambda run, pool: worked.append(run.id) or object())
    one = scheduled(api, 40)
    two = scheduled(api, 50, job_variables={"mem_limit": "1g"})
    _join(ahead.see([one, two], "p"))
    assert ahead.see([one, two], "p") is None  # the next poll sees them again: nothing new
    assert ahead.see([two], "p") is None  # `one` was claimed
    assert worked == [one.id, two.id]
    assert len(warmed) == 2
    _join(ahead.see([one, two], "p"))  # `one` is back (rescheduled): worked out again
    assert worked == [one.id, two.id, one.id]


def test_runs_of_one_configuration_are_worked_out_once(api) -> None:
    worked: list[UUID] = []
    ahead = WarmAhead(_Pool([]), lambda run, pool: worked.append(run.id) or object())
    deployment = api.add_deployment()
    runs = [api.add_run(f"r{i}", deployment=deployment) for i in range(5)]
    odd = api.add_run("odd", deployment=deployment, job_variables={"cpu": 2})
    _join(ahead.see([*runs, odd], "p"))
    assert worked == [runs[0].id, odd.id]


def test_one_run_that_cannot_be_worked_out_leaves_the_others_warmed(api) -> None:
    warmed: list[object] = []
    first, second = scheduled(api, 40), scheduled(api, 45)

    def spec_of(run: FlowRun, pool: str) -> object:
        if run.id == first.id:
            raise RuntimeError("anything at all")
        return "spec"

    _join(WarmAhead(_Pool(warmed), spec_of).see([first, second], "p"))  # type: ignore[arg-type]
    assert warmed == ["spec"]


def test_runs_that_could_not_start_are_not_warmed_and_their_claims_say_why(
    api, runtime
) -> None:
    runtime.missing_images.add("nowhere/nothing:1")
    worker = make_worker(api, runtime, warm=1, prefetch_seconds=10, max_starting=0,
                         policy={"allow_privileged": False})
    builds = scheduled(api, 40, job_variables={"env": {"EXTRA_PIP_PACKAGES": "cowsay"}})
    refused = scheduled(api, 40, job_variables={"privileged": True})
    missing = scheduled(api, 40, job_variables={"image": "nowhere/nothing:1"})
    gone = scheduled(api, 40)
    del api.deployments[gone.deployment_id]
    worker.poll()
    wait_until(warmed_ahead_done)
    assert waiting(runtime) == []

    for run in (refused, missing, gone):
        fall_due(api, run.id)
    worker.poll()
    settle(worker)
    assert "refused by the worker's policy" in api.state_of(refused.id).message
    assert "nowhere/nothing:1" in api.state_of(missing.id).message
    assert api.state_of(gone.id).type == StateType.CANCELLED
    assert api.state_of(builds.id).type == StateType.SCHEDULED  # still ahead, untouched


class _Pool:
    """A warm pool that records what it was asked to warm."""

    def __init__(self, warmed: list[object]) -> None:
        self.warmed = warmed

    def prewarm(self, spec: object) -> None:
        self.warmed.append(spec)


def _join(thread: threading.Thread | None) -> None:
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()
