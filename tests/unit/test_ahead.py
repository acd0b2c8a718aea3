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


def warm_keys(runtime: FakeRuntime) -> set[str]:
    """The configurations of the waiting containers."""
    with runtime._lock:
        return {c.workload.labels[LABEL_WARM] for c in runtime.containers.values()
                if c.workload.name.startswith("dockerworker-warm-")}


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


def test_the_claiming_poll_keeps_its_horizon_and_a_second_request_looks_further(
    api, runtime, monkeypatch
) -> None:
    """Runs due later never take the places of due ones in the poll's limit (the server
    orders by queue priority before time): the look-ahead is a request of its own."""
    worker = make_worker(api, runtime, warm=2, poll_interval=5, prefetch_seconds=10,
                         max_starting=1)
    calls: list[dict[str, Any]] = []
    real = api.get_scheduled_flow_runs

    def poll(pool: str, scheduled_before: datetime, limit: int | None, queues: list[str],
             patience: float | None = None, scheduled_after: datetime | None = None) -> Any:
        calls.append({"before": scheduled_before, "limit": limit, "after": scheduled_after})
        return real(pool, scheduled_before, limit, queues, patience, scheduled_after)

    monkeypatch.setattr(api, "get_scheduled_flow_runs", poll)
    due = api.add_run("due", deployment=api.add_deployment())
    later = scheduled(api, 40)
    before = datetime.now(UTC)
    worker.poll()
    claiming, ahead = calls
    assert timedelta(seconds=9) < claiming["before"] - before < timedelta(seconds=11)
    assert claiming["after"] is None and claiming["limit"] == 1
    assert ahead["after"] == claiming["before"]
    assert ahead["before"] - ahead["after"] == timedelta(seconds=60)
    assert ahead["limit"] == 2  # no more than the pool holds
    settle(worker)
    assert api.state_of(due.id).type == StateType.COMPLETED
    wait_until(lambda: len(waiting(runtime)) >= 1)
    assert api.state_of(later.id).type == StateType.SCHEDULED


def test_warming_ahead_never_evicts_what_runs_in_use_keep_warm(api, runtime) -> None:
    """--warm 2 and two configurations in use, one place each: runs scheduled later (a
    tenant's, perhaps deleted before they are due) get no place."""
    worker = make_worker(api, runtime, warm=2, prefetch_seconds=10)
    for value in ("1", "2"):
        api.add_run(f"now-{value}", deployment=api.add_deployment(),
                    job_variables={"env": {"K": value}})
        worker.poll()
        settle(worker)
    wait_until(lambda: len(waiting(runtime)) == 2 and len(warm_keys(runtime)) == 2)
    kept = sorted(waiting(runtime))
    for i in range(3):
        scheduled(api, 40, job_variables={"env": {"TENANT": str(i)}})
    worker.poll()
    wait_until(warmed_ahead_done)
    assert sorted(waiting(runtime)) == kept


def test_warming_ahead_takes_a_place_a_configuration_holds_beyond_its_share(
    api, runtime
) -> None:
    worker = make_worker(api, runtime, warm=2, prefetch_seconds=10)
    api.add_run("now", deployment=api.add_deployment())
    worker.poll()
    settle(worker)
    wait_until(lambda: len(waiting(runtime)) == 2)  # one configuration: both places
    later = scheduled(api, 40, job_variables={"env": {"K": "3"}})
    worker.poll()
    wait_until(warmed_ahead_done)
    wait_until(lambda: len(warm_keys(runtime)) == 2 and len(waiting(runtime)) == 2
               and worker.warm.ready() == 2)  # the surplus place went to `later`'s
    fall_due(api, later.id)
    worker.poll()
    settle(worker)
    assert worker.warm is not None
    worker.shipper.flush()
    assert any("took over the run" in m for m in api.messages(later.id))


def test_each_run_is_worked_out_once_however_often_it_is_seen(api) -> None:
    worked: list[UUID] = []
    warmed: list[object] = []
    clock = [0.0]
    ahead = WarmAhead(_Pool(warmed), lambda run, pool: worked.append(run.id) or object(),
                      clock=lambda: clock[0])
    one = scheduled(api, 40)
    two = scheduled(api, 50, job_variables={"mem_limit": "1g"})
    _join(ahead.see([one, two], "p"))
    assert ahead.see([one, two], "p") is None  # the next poll sees them again: nothing new
    assert ahead.see([two], "p") is None  # `one` was claimed
    assert worked == [one.id, two.id]
    assert len(warmed) == 2
    assert ahead.see([one, two], "p") is None  # `one` is back in view: still not again
    assert worked == [one.id, two.id]
    clock[0] += 121  # SEEN_FOR later: worked out again (rescheduled, say)
    _join(ahead.see([one], "p"))
    assert worked == [one.id, two.id, one.id]


def test_a_round_at_work_starts_no_other_and_loses_no_run(api) -> None:
    """A slow pull holds the round: the runs of later polls wait for the next one."""
    gate = threading.Event()
    worked: list[UUID] = []

    def spec_of(run: FlowRun, pool: str) -> object:
        gate.wait(5)
        worked.append(run.id)
        return object()

    ahead = WarmAhead(_Pool([]), spec_of)  # type: ignore[arg-type]
    one, two = scheduled(api, 40), scheduled(api, 45)
    first = ahead.see([one], "p")
    assert ahead.see([one, two], "p") is None  # busy
    gate.set()
    _join(first)
    _join(ahead.see([one, two], "p"))
    assert worked == [one.id, two.id]


def test_while_a_round_is_at_work_a_poll_does_not_look_ahead(api, runtime,
                                                              monkeypatch) -> None:
    """Its runs would only be seen again: each poll while a slow pull holds the round is the
    claiming request alone."""
    worker = make_worker(api, runtime, warm=1, prefetch_seconds=10)
    assert worker.ahead is not None
    gate = threading.Event()
    real_spec_of = worker.ahead.spec_of

    def slow_spec_of(run: FlowRun, pool: str) -> Any:
        gate.wait(5)
        return real_spec_of(run, pool)

    worker.ahead.spec_of = slow_spec_of
    afters: list[datetime | None] = []
    real = api.get_scheduled_flow_runs

    def poll(pool: str, scheduled_before: datetime, limit: int | None, queues: list[str],
             patience: float | None = None, scheduled_after: datetime | None = None) -> Any:
        afters.append(scheduled_after)
        return real(pool, scheduled_before, limit, queues, patience, scheduled_after)

    monkeypatch.setattr(api, "get_scheduled_flow_runs", poll)
    scheduled(api, 40)
    worker.poll()
    assert len(afters) == 2 and afters[1] is not None  # the claiming poll, the look-ahead
    worker.poll()
    worker.poll()
    assert afters[2:] == [None, None]  # the round is at work: claiming polls only
    gate.set()
    wait_until(warmed_ahead_done)
    worker.poll()
    assert len(afters) == 6 and afters[5] is not None


def test_at_most_the_pool_s_size_of_configurations_soonest_first(api) -> None:
    warmed: list[object] = []
    ahead = WarmAhead(_Pool(warmed, size=2), lambda run, pool: run.name)  # type: ignore[arg-type]
    runs = [scheduled(api, seconds, job_variables={"cpu": seconds})
            for seconds in (50, 20, 40, 30)]
    for run, name in zip(runs, ("r50", "r20", "r40", "r30"), strict=True):
        api.runs[run.id] = run = api.runs[run.id].model_copy(update={"name": name})
    _join(ahead.see([api.runs[r.id] for r in runs], "p"))
    assert warmed == ["r20", "r30"]


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
    api, runtime, tmp_path
) -> None:
    runtime.missing_images.add("nowhere/nothing:1")
    worker = make_worker(api, runtime, warm=1, prefetch_seconds=10, max_starting=0,
                         secrets_dir=tmp_path,
                         policy={"allow_privileged": False, "allowed_secrets": ["db*"]})
    no_file = scheduled(api, 40, job_variables={"secrets": ["db_password"]})
    builds = scheduled(api, 40, job_variables={"env": {"EXTRA_PIP_PACKAGES": "cowsay"}})
    refused = scheduled(api, 40, job_variables={"privileged": True})
    missing = scheduled(api, 40, job_variables={"image": "nowhere/nothing:1"})
    gone = scheduled(api, 40)
    del api.deployments[gone.deployment_id]
    worker.poll()
    wait_until(warmed_ahead_done)
    assert waiting(runtime) == []

    for run in (refused, missing, gone, no_file):
        fall_due(api, run.id)
    worker.poll()
    settle(worker)
    assert "db_password" in api.state_of(no_file.id).message
    assert "refused by the worker's policy" in api.state_of(refused.id).message
    assert "nowhere/nothing:1" in api.state_of(missing.id).message
    assert api.state_of(gone.id).type == StateType.CANCELLED
    assert api.state_of(builds.id).type == StateType.SCHEDULED  # still ahead, untouched


class _Pool:
    """A warm pool that records what it was asked to warm."""

    def __init__(self, warmed: list[object], size: int = 8) -> None:
        self.warmed = warmed
        self.size = size

    def prewarm(self, spec: object) -> None:
        self.warmed.append(spec)


def _join(thread: threading.Thread | None) -> None:
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()
