"""The worker on the fakes: admission, cancellation at each phase, adoption, reconciliation,
warm hand-over, leaving."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from dockerworker import admission
from dockerworker.api import ServerUnreachable, StateType
from dockerworker.checks import CANCEL_CHECK_WITH_EVENTS
from dockerworker.containers import LABEL_FLOW_RUN_ID, LABEL_WORKER
from dockerworker.events import RUNNING_EVENT
from dockerworker.ownership import Claim
from dockerworker.rounds import OWED_SECONDS, RECONCILE_SECONDS
from dockerworker.runs import Phase
from dockerworker.runtime import EngineError
from dockerworker.warm import LABEL_WARM, WARM_NAME_PREFIX, handed_name

from .fakes import FAKE_HOST, FakeAPI, FakeRuntime, Script, make_worker, settle, wait_until


@pytest.fixture
def hold(runtime: FakeRuntime):
    """Containers run until the test lets them end."""
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate)
    yield gate
    gate.set()


def cancel(api: FakeAPI, worker, run_id) -> None:
    api.set_state(run_id, StateType.CANCELLING, force=True)
    worker.check_cancellations()


def running(worker) -> int:
    return sum(1 for s in worker.active_runs() if s.phase == Phase.RUNNING)


# --- admission ---------------------------------------------------------------------------
def test_limit_bounds_runs_at_once(api, runtime, hold) -> None:
    runs = [api.add_run(f"r{i}") for i in range(5)]
    worker = make_worker(api, runtime, limit=2, max_starting=0)
    worker.poll()
    wait_until(lambda: running(worker) == 2)
    worker.poll()
    assert len(runtime.containers) == 2
    hold.set()
    settle(worker)
    worker.poll()
    settle(worker)
    done = [r for r in runs if api.state_of(r.id).type == StateType.COMPLETED]
    assert len(done) == 4


def test_max_starting_waits_for_running_before_taking_more(api, runtime, hold) -> None:
    runtime.script_for = lambda spec: Script(hold=hold, reports_running=False)
    runs = [api.add_run(f"r{i}") for i in range(5)]
    worker = make_worker(api, runtime, max_starting=2)
    worker.poll()
    wait_until(lambda: running(worker) == 2)
    worker.poll()
    assert len(runtime.containers) == 2
    started = next(iter(worker.admission.supervisors()))
    worker._on_event(RUNNING_EVENT, f"prefect.flow-run.{started}")
    assert worker._nudged.is_set()
    worker.poll()
    wait_until(lambda: len(runtime.containers) == 3)
    assert len(runs) == 5


def test_a_slot_freed_while_a_claim_is_under_way_gets_a_new_run(
        api, runtime, hold, monkeypatch) -> None:
    """A run whose claim has not reached the server yet is still SCHEDULED there and comes
    first in the next poll: the freed slot must get the run after it, not stay empty until
    the next event (seen in a burst: two Running events 35 ms apart, one start lost)."""
    runtime.script_for = lambda spec: Script(hold=hold, reports_running=False)
    first, second, third = (api.add_run(f"r{i}") for i in range(3))
    claim_sent = threading.Event()
    claim_waits = threading.Event()
    propose = api.set_state

    def slow_first_claim(flow_run_id, type_, *args, **kwargs):
        if flow_run_id == first.id and type_ == StateType.PENDING:
            claim_sent.set()
            claim_waits.wait(10)
        return propose(flow_run_id, type_, *args, **kwargs)

    monkeypatch.setattr(api, "set_state", slow_first_claim)
    worker = make_worker(api, runtime, max_starting=2)
    worker.poll()  # takes the first two; the first's claim hangs on the way
    assert claim_sent.wait(5)
    wait_until(lambda: runtime.of_run(second.id) is not None)
    worker._on_event(RUNNING_EVENT, f"prefect.flow-run.{second.id}")  # a slot is free
    worker.poll()
    wait_until(lambda: runtime.of_run(third.id) is not None)
    claim_waits.set()
    wait_until(lambda: runtime.of_run(first.id) is not None)


def test_fresh_starts_of_other_workers_on_this_engine_share_max_starting(
        api, runtime, monkeypatch) -> None:
    """Replicas on one host: another worker's container younger than our typical start
    takes one of our start slots; the worker polls again by itself once it is older."""
    monkeypatch.setattr(admission, "FIRST_START_GUESS", 0.6)
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, reports_running=False)
    runtime.add("theirs", {LABEL_WORKER: "w2"}, Script(hold=gate))
    first = api.add_run("first")
    worker = make_worker(api, runtime, max_starting=1)
    assert worker.free_slots() == 0
    worker.poll()
    assert worker.held_back and runtime.of_run(first.id) is None
    assert 0 < worker._poll_interval() <= 0.6  # a re-check, not the next interval
    wait_until(lambda: worker.free_slots() == 1)  # theirs is no longer a fresh start
    worker.poll()
    wait_until(lambda: runtime.of_run(first.id) is not None)
    assert worker.free_slots() == 0  # our own start now
    worker._next_due = time.monotonic() - 1  # a run found ahead fell due meanwhile
    worker.poll()  # full with our own start: no re-check, and no spinning on a past due time
    assert worker._poll_interval() == worker.poll_every()
    gate.set()


def test_without_the_event_stream_the_cancel_check_sees_runs_running(api, runtime, hold):
    api.add_run()
    worker = make_worker(api, runtime, max_starting=1)
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    assert worker.free_slots() == 0
    worker.check_cancellations()  # the run is RUNNING on the server
    assert worker.free_slots() == 1


def test_a_running_event_missed_by_the_connected_stream_frees_the_slot_anyway(
    api, runtime, hold
) -> None:
    api.add_run()
    worker = make_worker(api, runtime, max_starting=1)
    worker.events = SimpleNamespace(connected=threading.Event())  # type: ignore[assignment]
    worker.events.connected.set()  # connected, but the Running event was lost on the way
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    assert worker.free_slots() == 0
    assert worker._cancel_check_interval() == CANCEL_CHECK_WITH_EVENTS  # a longer interval
    worker.check_cancellations()
    assert worker.free_slots() == 1
    assert worker._nudged.is_set()  # take the next run at once


def test_run_once_ignores_max_starting(api, runtime) -> None:
    for i in range(4):
        api.add_run(f"r{i}")
    worker = make_worker(api, runtime, max_starting=1, run_once=True)
    assert worker.free_slots() is None
    worker.poll()
    settle(worker)
    assert len(runtime.containers) == 4


def test_run_once_keeps_checking_cancellations_until_its_runs_end(
    api, runtime, hold, monkeypatch
) -> None:
    monkeypatch.setattr("dockerworker.checks.CANCEL_CHECK_SECONDS", 0.05)
    run = api.add_run()
    worker = make_worker(api, runtime, start=False, run_once=True,
                         api_url="http://127.0.0.1:9/api")  # no event stream there
    worker.shipper.stop(1)  # run() starts its own
    worker.shipper = type(worker.shipper)(api)  # type: ignore[arg-type]
    exit_code: list[int] = []
    loop = threading.Thread(target=lambda: exit_code.append(worker.run()), daemon=True)
    loop.start()
    wait_until(lambda: running(worker) == 1)
    later = api.add_run("later")  # due after the one poll: not this worker's
    worker._nudge("poll", "cancellations")
    api.set_state(run.id, StateType.CANCELLING, force=True)
    wait_until(lambda: api.state_of(run.id).type == StateType.CANCELLED)
    loop.join(5)
    assert exit_code == [0]
    assert runtime.of_run(later.id) is None  # one poll only


def test_a_full_worker_still_counts_as_polling(api, runtime, hold) -> None:
    api.add_run()
    worker = make_worker(api, runtime, limit=1)
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    worker.last_poll = None
    worker.poll()
    assert worker.last_poll is not None


def test_a_scheduled_event_nudges_the_loop(api, runtime) -> None:
    worker = make_worker(api, runtime)
    worker._on_event("prefect.flow-run.Scheduled", "prefect.flow-run.x")
    assert worker._nudged.is_set()


def test_a_running_event_of_a_stranger_changes_nothing(api, runtime) -> None:
    worker = make_worker(api, runtime)
    worker._on_event(RUNNING_EVENT, "prefect.flow-run.not-a-uuid")
    worker._on_event(RUNNING_EVENT, "prefect.flow-run.00000000-0000-0000-0000-000000000000")
    assert not worker._nudged.is_set()


# --- cancellation at each phase ----------------------------------------------------------
def test_cancel_while_the_image_is_pulled(api, runtime) -> None:
    runtime.image_gate = threading.Event()
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: ("ensure_image", "") in runtime.calls)
    cancel(api, worker, run.id)
    settle(worker)
    runtime.image_gate.set()
    state = api.state_of(run.id)
    assert state.type == StateType.CANCELLED
    assert state.message == "Cancelled before its container started; no container was created."
    assert runtime.containers == {}


def test_cancel_during_a_build(api, runtime) -> None:
    run = api.add_run(job_variables={"pip_packages": ["six"]})
    worker = make_worker(api, runtime)
    worker.builder.gate = threading.Event()
    worker.poll()
    wait_until(lambda: any(s.phase == Phase.PREPARING for s in worker.active_runs()))
    wait_until(lambda: any("dependencies" in m for m in _shipped(worker, api, run.id)))
    cancel(api, worker, run.id)
    settle(worker)
    worker.builder.gate.set()
    assert api.state_of(run.id).type == StateType.CANCELLED
    assert runtime.containers == {}


def _shipped(worker, api, run_id):
    worker.shipper.flush(1)
    return api.messages(run_id)


def test_cancel_a_running_flow_through_prefect_s_engine(api, runtime, hold) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    cancel(api, worker, run.id)
    settle(worker)
    assert api.history[run.id][-2:] == [StateType.CANCELLING, StateType.CANCELLED]
    assert runtime.of_run(run.id) is None  # removed
    messages = _shipped(worker, api, run.id)
    assert "cancellation requested" in messages
    assert any(m.startswith("Cancelled: container") for m in messages)


def test_cancel_a_command_container_by_sigterm(api, runtime, hold) -> None:
    run = api.add_run(job_variables={"command": "python flow.py"})
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    cancel(api, worker, run.id)
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CANCELLED
    assert "was stopped (killed by SIGTERM (exit code 143))" in state.message


@pytest.mark.parametrize("started", [True, False], ids=["container", "no container yet"])
def test_a_cancellation_the_server_did_not_take_is_finished_by_reconciliation(
        api, runtime, hold, started: bool) -> None:
    """The run was stopped (its container, or its preparation) but the server was away for
    its CANCELLED state: the run stays CANCELLING, and the first reconciliation once the
    server answers sets it CANCELLED, once; a reconciliation while it is away changes nothing,
    another live worker's CANCELLING run is left to it, a gone worker's is finished too."""
    run = api.add_run(job_variables={"command": "python flow.py"})
    worker = make_worker(api, runtime)
    if not started:
        runtime.image_gate = threading.Event()  # held in preparation
    real = api.set_state

    def away(run_id, type_, *args, **kwargs):
        if type_ == StateType.CANCELLED:
            raise ServerUnreachable("cannot reach the Prefect server")
        return real(run_id, type_, *args, **kwargs)

    api.set_state = away
    worker.poll()
    if started:
        wait_until(lambda: running(worker) == 1)
    else:
        wait_until(lambda: api.state_of(run.id).type == StateType.PENDING)
    cancel(api, worker, run.id)
    if runtime.image_gate is not None:
        runtime.image_gate.set()
    settle(worker)
    assert api.state_of(run.id).type == StateType.CANCELLING
    assert runtime.of_run(run.id) is None or runtime.of_run(run.id).ended.is_set()
    # owed: reconciliation now, and every few seconds until a round goes through
    assert "reconciliation" in worker._wanted and worker._reconcile_interval() == OWED_SECONDS
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.CANCELLING  # still away
    assert worker._reconcile_interval() == OWED_SECONDS  # the round did not go through
    api.set_state = real
    other = api.add_run("other's")  # claimed by a live worker, which stops it
    api.set_state(other.id, StateType.PENDING, Claim("w2", FAKE_HOST).message)
    api.set_state(other.id, StateType.CANCELLING, force=True)
    api.heartbeat(api.pool.name, "w2", 30)
    orphan = api.add_run("gone's")  # claimed by a worker that is gone: nobody else stops it
    api.set_state(orphan.id, StateType.PENDING, Claim("w3", FAKE_HOST).message)
    api.set_state(orphan.id, StateType.CANCELLING, force=True)
    api.workers["w3"] = {"name": "w3", "status": "OFFLINE"}
    worker.reconcile()
    assert api.state_of(orphan.id).type == StateType.CANCELLED
    state = api.state_of(run.id)
    assert state.type == StateType.CANCELLED, state
    assert "reported by dockerworker's reconciliation" in state.message
    assert api.history[run.id].count(StateType.CANCELLED) == 1
    assert worker._reconcile_interval() == RECONCILE_SECONDS  # nothing owed any more
    worker.reconcile()
    assert api.history[run.id].count(StateType.CANCELLED) == 1
    assert api.state_of(other.id).type == StateType.CANCELLING


def test_a_verdict_owed_during_a_reconciliation_round_is_still_owed_after_it(
        api, runtime, monkeypatch) -> None:
    """A run that ends unjudged while a round is under way may have been looked at before it
    ended: the next round (a few seconds on) must still look, not the one a minute later."""
    worker = make_worker(api, runtime)
    assert worker.recovery is not None
    reconcile = worker.recovery.reconcile
    monkeypatch.setattr(worker.recovery, "reconcile",
                        lambda *args: (reconcile(*args), worker._owe_verdict()))
    worker.reconcile()
    assert worker._reconcile_interval() == OWED_SECONDS
    monkeypatch.setattr(worker.recovery, "reconcile", reconcile)
    worker.reconcile()
    assert worker._reconcile_interval() == RECONCILE_SECONDS


def test_cancel_while_the_container_is_being_created(api, runtime, hold) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime)

    def script(spec):
        worker.active_runs()[0].cancel()  # arrives before the supervisor knows its container
        return Script(hold=hold)

    runtime.script_for = script
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.CANCELLED
    assert any(method == "stop" for method, _ in runtime.calls)  # stopped once it existed


def test_a_second_cancel_request_stops_once(api, runtime, hold) -> None:
    runtime.script_for = lambda spec: Script(hold=hold, cancellable=False)
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    supervisor = worker.active_runs()[0]
    supervisor.cancel()
    supervisor.cancel()
    settle(worker)
    assert [c[0] for c in runtime.calls].count("stop") == 1
    assert api.state_of(run.id).type == StateType.CANCELLED


def test_cancelling_runs_of_others_are_not_touched(api, runtime, hold) -> None:
    other = api.add_run(state=StateType.CANCELLING)
    worker = make_worker(api, runtime)
    worker.check_cancellations()
    assert api.state_of(other.id).type == StateType.CANCELLING


# --- adoption ----------------------------------------------------------------------------
def ours(run_id=None, **labels) -> dict[str, str]:
    found = {LABEL_WORKER: "w1", **labels}
    if run_id is not None:
        found[LABEL_FLOW_RUN_ID] = str(run_id)
    return found


def test_a_restarted_worker_adopts_its_running_container_and_judges_it(api, runtime) -> None:
    run = api.add_run(state=StateType.RUNNING)
    gate = threading.Event()
    container = runtime.add("etl-1", ours(run.id), Script(exit_code=3, final_state=None,
                                                          hold=gate), run_id=run.id)
    worker = make_worker(api, runtime)
    assert run.id in worker.admission
    assert worker.admission.booting() == []  # an adopted run is not starting
    gate.set()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "exited with code 3" in state.message
    assert container.workload.id in runtime.containers


def test_a_container_created_but_never_started_is_started_at_adoption(api, runtime) -> None:
    run = api.add_run(state=StateType.PENDING)
    runtime.add("etl-1", ours(run.id), Script(final_state=None), status="created",
                run_id=run.id)
    worker = make_worker(api, runtime)
    settle(worker)
    assert ("resume", "etl-1") in runtime.calls


def test_a_container_of_a_deleted_run_is_removed(api, runtime) -> None:
    run = api.add_run()
    del api.runs[run.id]
    runtime.add("etl-1", ours(run.id), status="exited")
    make_worker(api, runtime)
    assert runtime.containers == {}


def test_waiting_warm_containers_are_removed_at_start_up(api, runtime) -> None:
    runtime.add(f"{WARM_NAME_PREFIX}abc", ours(**{LABEL_WARM: "k"}))
    make_worker(api, runtime)
    assert runtime.containers == {}


def test_a_warm_container_that_took_a_run_is_adopted_by_its_infrastructure_pid(api, runtime):
    gate = threading.Event()
    run = api.add_run(state=StateType.RUNNING)
    container = runtime.add(handed_name("etl-run-1234abcd", run.id), ours(**{LABEL_WARM: "k"}),
                            Script(hold=gate), run_id=run.id)
    api.runs[run.id].infrastructure_pid = f"{FAKE_HOST}:{container.workload.id}"
    worker = make_worker(api, runtime)
    assert run.id in worker.admission
    runtime.finish(container)
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED


def test_exited_containers_of_finished_runs_go_only_if_they_asked(api, runtime) -> None:
    done = api.add_run(state=StateType.COMPLETED)
    kept = api.add_run(state=StateType.COMPLETED)
    runtime.add("a", ours(done.id, **{"io.dockerworker.auto-remove": "true"}), status="exited")
    runtime.add("b", ours(kept.id), status="exited")
    worker = make_worker(api, runtime)
    assert [c.workload.name for c in runtime.containers.values()] == ["b"]
    assert len(worker.admission) == 0


def test_containers_of_another_worker_are_not_adopted(api, runtime) -> None:
    run = api.add_run(state=StateType.RUNNING)
    runtime.add("x", {LABEL_WORKER: "w2", LABEL_FLOW_RUN_ID: str(run.id)},
                Script(hold=threading.Event()), run_id=run.id)
    worker = make_worker(api, runtime)
    assert len(worker.admission) == 0


# --- reconciliation ----------------------------------------------------------------------
def test_a_run_whose_container_vanished_is_retried_then_crashed(api, runtime) -> None:
    from dockerworker.policy import Policy

    run = api.add_run(state=StateType.RUNNING, infrastructure_pid=f"{FAKE_HOST}:feedbeef")
    worker = make_worker(api, runtime)
    worker.reconcile()
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and "container vanished: feedbeef" in state.message
    assert state.message.startswith("Rescheduled by dockerworker after an infrastructure "
                                    "failure (retry 1 of 1)")
    again = api.add_run(state=StateType.RUNNING, infrastructure_pid=f"{FAKE_HOST}:deadbeef")
    make_worker(api, runtime, name="w2", policy=Policy(infra_retries=0)).reconcile()
    state = api.state_of(again.id)
    assert state.type == StateType.CRASHED and "no infrastructure retries left" in state.message


def test_runs_on_another_engine_are_not_reconciled(api, runtime) -> None:
    run = api.add_run(state=StateType.RUNNING, infrastructure_pid="other-engine:feedbeef")
    worker = make_worker(api, runtime)
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.RUNNING


def test_a_claim_abandoned_by_a_restart_is_rescheduled(api, runtime) -> None:
    run = api.add_run(state=StateType.PENDING, message=Claim("w1", FAKE_HOST).message)
    worker = make_worker(api, runtime)
    worker.reconcile()
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and "rescheduled" in state.message


def test_a_claim_of_another_worker_is_not_rescheduled(api, runtime) -> None:
    run = api.add_run(state=StateType.PENDING, message=Claim("w2", FAKE_HOST).message)
    worker = make_worker(api, runtime)
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.PENDING


def test_a_claim_with_a_container_is_not_rescheduled(api, runtime) -> None:
    run = api.add_run(state=StateType.PENDING, message=Claim("w1", FAKE_HOST).message)
    worker = make_worker(api, runtime)
    runtime.add("x", {LABEL_WORKER: "w9", LABEL_FLOW_RUN_ID: str(run.id)}, status="exited")
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.PENDING


def test_reconciliation_removes_finished_auto_remove_containers_not_its_own(api, runtime,
                                                                           hold) -> None:
    finished = api.add_run(state=StateType.COMPLETED)
    worker = make_worker(api, runtime)
    runtime.add("old", ours(finished.id, **{"io.dockerworker.auto-remove": "true"}),
                status="exited")
    mine = api.add_run(job_variables={"auto_remove": True})
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    runtime.of_run(mine.id).workload.status = "exited"  # as if between exit and verdict
    worker.reconcile()
    assert [c.workload.name for c in runtime.containers.values()] == [
        runtime.of_run(mine.id).workload.name]


def test_a_run_being_supervised_is_not_reconciled(api, runtime, hold) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: running(worker) == 1)
    api.runs[run.id].infrastructure_pid = f"{FAKE_HOST}:nothing-here"
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.RUNNING


# --- warm hand-over ----------------------------------------------------------------------
def warm_containers(runtime: FakeRuntime) -> list:
    return [c for c in runtime.containers.values() if LABEL_WARM in c.workload.labels]


def warmed_up(api: FakeAPI, runtime: FakeRuntime):
    """A worker with `--warm 1` after a first (cold) run, and its waiting container."""
    worker = make_worker(api, runtime, warm=1)
    api.add_run("first")
    worker.poll()
    settle(worker)
    wait_until(lambda: any(c.run_id is None for c in warm_containers(runtime)))
    return worker, next(c for c in warm_containers(runtime) if c.run_id is None)


def test_a_warm_container_takes_the_next_run(api, runtime) -> None:
    worker = make_worker(api, runtime, warm=1)
    first = api.add_run("first")
    worker.poll()
    settle(worker)
    wait_until(lambda: len(warm_containers(runtime)) == 1)  # the first run started cold
    second = api.add_run("second")
    worker.poll()
    settle(worker)
    assert api.state_of(first.id).type == api.state_of(second.id).type == StateType.COMPLETED
    taken = runtime.of_run(second.id)
    assert LABEL_WARM in taken.workload.labels
    assert not taken.workload.name.startswith(WARM_NAME_PREFIX)  # renamed after the run
    assert api.runs[second.id].infrastructure_pid.endswith(taken.workload.id)
    assert any("took over the run" in m for m in _shipped(worker, api, second.id))


def test_a_warm_container_that_fails_at_hand_over_means_a_cold_start(api, runtime) -> None:
    worker, failing = warmed_up(api, runtime)
    runtime.fail["hand_over"] = EngineError("rename failed")
    second = api.add_run("second")
    worker.poll()
    settle(worker)
    assert api.state_of(second.id).type == StateType.COMPLETED
    assert LABEL_WARM not in runtime.of_run(second.id).workload.labels
    assert failing.workload.id not in worker.warm.holds()  # removed: nobody holds it


@pytest.mark.parametrize("moment", ["before the rename", "after the rename"])
def test_an_adoption_pass_never_removes_a_warm_container_being_handed_over(
        api, runtime, monkeypatch, moment) -> None:
    """A full adoption pass (after an incomplete orphans round) lists this worker's
    containers; one taken from the pool and not yet held by its supervisor (still named as
    waiting, or renamed after the listing) must not be removed as a leftover warm one."""
    worker, waiting = warmed_up(api, runtime)
    waiting_name = waiting.workload.name
    listed = runtime.list_workloads(api.pool.name)  # the pass's listing: the old name
    second = api.add_run("second")

    def adoption_pass() -> None:
        assert worker.recovery is not None
        worker.recovery.adopt(set(), worker._adopt)

    if moment == "before the rename":
        record = api.set_infrastructure_pid
        monkeypatch.setattr(api, "set_infrastructure_pid",
                            lambda *args, **kw: (adoption_pass(), record(*args, **kw)))
    else:
        hand_over = runtime.hand_over

        def renamed_then_adoption(workload, spec) -> None:
            hand_over(workload, spec)
            monkeypatch.setattr(runtime, "list_workloads", lambda *args, **kw: listed)
            adoption_pass()
            monkeypatch.undo()

        monkeypatch.setattr(runtime, "hand_over", renamed_then_adoption)
    worker.poll()
    settle(worker)
    assert api.state_of(second.id).type == StateType.COMPLETED
    assert runtime.of_run(second.id).workload.id == waiting.workload.id  # warm, not cold
    assert ("remove", waiting_name) not in runtime.calls  # removed only after, renamed
    assert waiting.workload.id not in worker.warm.holds()  # its supervisor held it, then let go


def test_an_infrastructure_pid_the_server_did_not_take_is_recorded_by_reconciliation(
        api, runtime) -> None:
    """A warm container took the run while the server did not answer for its
    infrastructure_pid (its only link to the run): reconciliation records it, every few
    seconds until it has; so the worker, restarted, finds the run by it and adopts it,
    instead of giving a claim that looks abandoned back to the pool (a run made twice)."""
    worker, waiting = warmed_up(api, runtime)
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, reports_running=False)
    api.fail["set_infrastructure_pid"] = ServerUnreachable("cannot reach the Prefect server")
    run = api.add_run("second")
    worker.poll()
    wait_until(lambda: runtime.of_run(run.id) is not None)
    assert runtime.of_run(run.id).workload.id == waiting.workload.id
    assert not api.runs[run.id].infrastructure_pid
    assert "reconciliation" in worker._wanted  # at once, then every few seconds
    assert worker._reconcile_interval() == OWED_SECONDS
    worker.reconcile()
    assert api.runs[run.id].infrastructure_pid == f"{FAKE_HOST}:{waiting.workload.id}"
    assert worker._reconcile_interval() == RECONCILE_SECONDS
    worker._leave()  # restarted: the container runs on
    restarted = make_worker(api, runtime)
    restarted.reconcile()
    assert run.id in restarted.admission
    gate.set()
    settle(restarted)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert api.history[run.id].count(StateType.PENDING) == 1  # never given back


def test_booting_warm_containers_do_not_hold_back_claims(api, runtime) -> None:
    """A run arriving while replacements import Prefect is claimed at once and takes the
    oldest booting one: waiting for it to be ready made warm starts slower."""
    runtime.boot_at_once = False
    worker = make_worker(api, runtime, warm=2, max_starting=2)
    api.add_run("first")
    worker.poll()
    settle(worker)  # cold; two warm containers now boot, none ready
    wait_until(lambda: len(warm_containers(runtime)) == 2)
    assert worker.free_slots() == 2
    oldest = min(warm_containers(runtime), key=lambda c: c.started)
    second = api.add_run("second")
    worker.poll()
    wait_until(lambda: runtime.of_run(second.id) is not None)
    assert runtime.of_run(second.id).workload.id == oldest.workload.id
    for container in warm_containers(runtime):
        container.ready.set()
    settle(worker)
    assert api.state_of(second.id).type == StateType.COMPLETED


def test_a_job_with_its_own_command_never_waits_warm(api, runtime) -> None:
    worker = make_worker(api, runtime, warm=2)
    api.add_run(job_variables={"command": "python flow.py"})
    worker.poll()
    settle(worker)
    assert warm_containers(runtime) == []


# --- leaving -----------------------------------------------------------------------------
def test_leaving_lets_a_claim_in_preparation_get_its_container_first(api, runtime, hold
                                                                     ) -> None:
    """A graceful stop waits for runs still being prepared (claimed: no other worker would
    take them) until their containers run; the next worker adopts them."""
    runtime.image_gate = threading.Event()  # the run is held in preparation
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: api.state_of(run.id).type == StateType.PENDING)
    leaving = threading.Thread(target=worker._leave, daemon=True)
    leaving.start()
    time.sleep(0.3)
    assert leaving.is_alive()  # waits for the claim in flight
    runtime.image_gate.set()
    leaving.join(5)
    assert not leaving.is_alive()
    assert runtime.of_run(run.id) is not None  # it got its container
    assert api.state_of(run.id).type == StateType.RUNNING


def test_leaving_leaves_running_containers_for_the_next_worker(api, runtime, hold) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime, warm=1)
    worker.poll()
    wait_until(lambda: running(worker) == 1 and worker.active_runs()[0].output is not None)
    wait_until(lambda: any(c.run_id is None for c in warm_containers(runtime)))
    worker._leave()
    settle(worker)
    assert api.state_of(run.id).type == StateType.RUNNING
    assert runtime.of_run(run.id).workload.status == "running"
    assert [c for c in warm_containers(runtime) if c.run_id is None] == []  # closed


def test_no_claims_while_the_engine_does_not_answer(api, runtime) -> None:
    from dockerworker.runtime import EngineUnavailable

    run = api.add_run()
    worker = make_worker(api, runtime)
    runtime.fail["ping"] = EngineUnavailable("connection refused")
    worker.poll()
    settle(worker)
    assert api.history[run.id] == [StateType.SCHEDULED]  # left for later (or another worker)
    worker.poll()  # the engine answers again
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED


def test_the_rounds_keep_the_cadences_the_docs_give(api, runtime) -> None:
    """docs/operations.md and design.md: heartbeats, adoption and orphans every heartbeat
    (30 s); cancellation checks every 2 s, every 15 s while the event stream is connected;
    reconciliation every minute, every 5 s while something is owed; removal and warm expiry
    every minute."""
    worker = make_worker(api, runtime)

    def cadences() -> dict[str, float]:
        return {name: interval() for name, (interval, _) in worker._rounds().items()
                if name != "poll"}  # the poll's own pacing: test_pacing.py

    beat = {name: 30.0 for name in ("heartbeat", "adoption", "orphans", "ownership")}
    assert cadences() == {**beat, "cancellations": 2.0, "reconciliation": 60.0,
                          "removal": 60.0, "warm expiry": 60.0}
    worker.events = SimpleNamespace(connected=threading.Event())  # type: ignore[assignment]
    worker.events.connected.set()
    worker._owe_verdict()
    assert cadences() == {**beat, "cancellations": 15.0, "reconciliation": 5.0,
                          "removal": 60.0, "warm expiry": 60.0}
