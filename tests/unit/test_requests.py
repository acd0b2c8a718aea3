"""What one flow run costs in Prefect API requests: the exact sequence, so that a request
added (or a cache lost) fails here, loudly. And the short-lived copies' expiry."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dockerworker.api import NotFound, StateType
from dockerworker.cache import CachedReads, ShortLived
from dockerworker.jobs import with_default_image

from .fakes import FakeAPI, FakeRuntime, Script, make_worker, settle, wait_until

# Each client call is one HTTP request of PrefectAPI (api.py).
ENDPOINTS = {
    "get_scheduled_flow_runs": "POST /work_pools/{pool}/get_scheduled_flow_runs",
    "read_deployment": "GET /deployments/{id}",
    "set_state": "POST /flow_runs/{id}/set_state",
    "read_work_pool": "GET /work_pools/{pool}",
    "read_flow": "GET /flows/{id}",
    "set_infrastructure_pid": "PATCH /flow_runs/{id}",
    "read_flow_run": "GET /flow_runs/{id}",
    "filter_flow_runs": "POST /flow_runs/filter",
    "heartbeat": "POST /work_pools/{pool}/workers/heartbeat",
    "read_workers": "POST /work_pools/{pool}/workers/filter",
    "read_flow_run_states": "GET /flow_run_states/?flow_run_id={id}",
    "read_block_data": "GET /block_types/slug/{type}/block_documents/name/{name}",
    "read_variable": "GET /variables/name/{name}",
    "read_logs_newest_first": "POST /logs/filter",
    "send_logs": "POST /logs/",
    "create_work_pool": "POST /work_pools/",
    "health": "GET /health",
}


class Recorder:
    """FakeAPI as the worker sees it, recording each client call as its HTTP request. The
    fake engine's own reports (Running, Completed) go to the FakeAPI directly: they are
    Prefect's engine's requests, not the worker's."""

    def __init__(self, api: FakeAPI) -> None:
        self._api = api
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        if name not in ENDPOINTS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            request = ENDPOINTS[name]
            if name == "set_state":
                request += " " + (kwargs.get("type_") or args[1]).value
            with self._lock:
                self.calls.append(request)
            return attr(*args, **kwargs)

        return call

    def requests(self) -> list[str]:
        """In order, without the log shipper's batches (their number depends on timing)."""
        with self._lock:
            return [c for c in self.calls if c != ENDPOINTS["send_logs"]]

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()


@pytest.fixture
def recorder(api: FakeAPI) -> Recorder:
    return Recorder(api)


POLL = ENDPOINTS["get_scheduled_flow_runs"]
CLAIM = ENDPOINTS["set_state"] + " PENDING"
PID = ENDPOINTS["set_infrastructure_pid"]
STATE = ENDPOINTS["read_flow_run"]


def test_the_first_run_of_a_deployment(api, runtime, recorder) -> None:
    deployment = api.add_deployment()
    worker = make_worker(recorder, runtime)  # type: ignore[arg-type]
    recorder.clear()  # start-up is not per run
    run = api.add_run(deployment=deployment)
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert recorder.requests() == [
        POLL,  # what is due (one request for all of them)
        CLAIM,  # the answer holds the state: no read after it
        ENDPOINTS["read_deployment"],  # its job variables; gone: the run is cancelled
        ENDPOINTS["read_work_pool"],  # the base job template
        ENDPOINTS["read_flow"],  # the flow's name: labels, container name
        PID,  # where it runs: adoption and reconciliation find it by this
        STATE,  # after the exit: did Prefect's engine report a final state?
    ]


def test_the_next_runs_of_a_deployment_use_what_the_worker_knows(api, runtime,
                                                                  recorder) -> None:
    deployment = api.add_deployment()
    worker = make_worker(recorder, runtime)  # type: ignore[arg-type]
    api.add_run(deployment=deployment)
    worker.poll()
    settle(worker)
    recorder.clear()
    for i in range(2):
        run = api.add_run(f"r{i}", deployment=deployment)
        worker.poll()
        settle(worker)
        assert api.state_of(run.id).type == StateType.COMPLETED
    assert recorder.requests() == [POLL, CLAIM, PID, STATE] * 2


def test_a_replica_that_loses_the_claim_reads_nothing_more(api, runtime, recorder,
                                                           monkeypatch) -> None:
    """Replicas woken by one Scheduled event all see the run; the claim comes first, so each
    loser pays its poll and its refused claim, not a read of the deployment."""
    deployment = api.add_deployment()
    worker = make_worker(recorder, runtime)  # type: ignore[arg-type]
    recorder.clear()
    run = api.add_run(deployment=deployment)
    real = api.get_scheduled_flow_runs

    def another_replica_claims_first(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        api.set_state(run.id, StateType.PENDING, "claimed by dockerworker other")
        return found

    monkeypatch.setattr(api, "get_scheduled_flow_runs", another_replica_claims_first)
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).message == "claimed by dockerworker other"
    assert recorder.requests() == [POLL, CLAIM]
    assert runtime.containers == {}


def test_a_refusal_without_the_run_s_state_is_read_to_tell_whose_claim_it_is(
        api, runtime, recorder, monkeypatch) -> None:
    """Should a server answer a refused claim without the run's state, one read tells
    whether the claim is ours (an earlier attempt's lost answer): here it is."""
    api.lose_answers = {StateType.PENDING}
    worker = make_worker(recorder, runtime)  # type: ignore[arg-type]
    recorder.clear()
    real = api.set_state

    def stateless_refusals(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        return result if result.status == "ACCEPT" else result.model_copy(
            update={"state": None})

    monkeypatch.setattr(api, "set_state", stateless_refusals)
    run = api.add_run()
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert recorder.requests()[:3] == [POLL, CLAIM, STATE]


def test_a_lost_claim_answer_costs_no_read(api, runtime, recorder) -> None:
    """The server applied the claim but its answer was lost; the retry is refused, and the
    refusal's state (the run's, as it is) tells the claim is ours."""
    api.lose_answers = {StateType.PENDING}
    worker = make_worker(recorder, runtime)  # type: ignore[arg-type]
    recorder.clear()
    run = api.add_run()
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert recorder.requests() == [POLL, CLAIM, ENDPOINTS["read_work_pool"],
                                   ENDPOINTS["read_flow"], PID, STATE]


def test_one_check_for_all_runs_in_flight(api, runtime, recorder) -> None:
    """Cancelling and Running of every run in flight: one request, whatever their number."""
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, reports_running=False)
    runs = [api.add_run(f"r{i}") for i in range(3)]
    worker = make_worker(recorder, runtime, max_starting=2)  # type: ignore[arg-type]
    worker.poll()
    wait_until(lambda: all(s.container for s in worker.active_runs()))  # recorded, started
    api.set_state(runs[0].id, StateType.RUNNING)
    api.set_state(runs[1].id, StateType.CANCELLING, force=True)
    recorder.clear()
    worker.check_cancellations()
    wait_until(lambda: api.state_of(runs[1].id).type == StateType.CANCELLED)
    assert runs[0].id not in worker.admission.booting()  # RUNNING: no longer starting
    gate.set()
    settle(worker)
    checks = [r for r in recorder.requests() if r == ENDPOINTS["filter_flow_runs"]]
    assert recorder.requests()[0] == ENDPOINTS["filter_flow_runs"] and len(checks) == 1


def test_a_running_event_polls_only_when_runs_were_left_behind(api, runtime) -> None:
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, reports_running=False)
    first = api.add_run("first")
    worker = make_worker(api, runtime, max_starting=2)
    worker.poll()  # one run due, two slots: nothing left behind
    wait_until(lambda: len(runtime.containers) == 1)
    worker._on_event("prefect.flow-run.Running", f"prefect.flow-run.{first.id}")
    assert not worker._nudged.is_set()
    second, third, fourth = (api.add_run(name) for name in ("second", "third", "fourth"))
    worker.poll()  # two slots, three runs due
    wait_until(lambda: len(runtime.containers) == 3)
    assert worker.held_back
    worker._on_event("prefect.flow-run.Running", f"prefect.flow-run.{second.id}")
    assert worker._wanted == {"poll"}
    assert third.id in worker.admission and fourth.id not in worker.admission
    gate.set()
    settle(worker)


def test_each_event_asks_for_its_own_round(api, runtime) -> None:
    worker = make_worker(api, runtime)
    worker._on_event("prefect.flow-run.Scheduled", "prefect.flow-run.x")
    assert worker._wanted == {"poll"}
    worker._wanted.clear()
    worker._on_event("prefect.flow-run.Cancelling", "prefect.flow-run.x")
    assert worker._wanted == {"cancellations"}


# --- the short-lived copies ---------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_lives_its_ttl_and_is_read_again_after() -> None:
    clock, loads = Clock(), []
    cache: ShortLived[str, int] = ShortLived(10.0, clock=clock)

    def load() -> int:
        loads.append(1)
        return len(loads)

    assert cache.get("a", load) == 1
    clock.now = 9.99
    assert cache.get("a", load) == 1
    clock.now = 10.0
    assert cache.get("a", load) == 2
    assert len(loads) == 2


def test_errors_are_not_kept() -> None:
    cache: ShortLived[str, int] = ShortLived(10.0, clock=Clock())

    def gone() -> int:
        raise NotFound("gone")

    for _ in range(2):
        with pytest.raises(NotFound):
            cache.get("a", gone)
    assert len(cache) == 0


def test_the_size_is_bounded_oldest_out_first() -> None:
    cache: ShortLived[int, int] = ShortLived(10.0, max_entries=3, clock=Clock())
    for key in range(5):
        cache.put(key, key)
    assert len(cache) == 3
    assert cache.get(0, lambda: -1) == -1  # pushed out: read again
    assert cache.get(4, lambda: -1) == 4


def test_an_edited_deployment_counts_once_its_copy_expired(api: FakeAPI) -> None:
    clock = Clock()
    reads = CachedReads(api, clock=clock)  # type: ignore[arg-type]
    deployment = api.add_deployment(job_variables={"image": "a:1"})
    assert reads.deployment(deployment.id).job_variables == {"image": "a:1"}
    api.deployments[deployment.id] = deployment.model_copy(
        update={"job_variables": {"image": "b:2"}})
    assert reads.deployment(deployment.id).job_variables == {"image": "a:1"}
    clock.now = reads.deployments.ttl
    assert reads.deployment(deployment.id).job_variables == {"image": "b:2"}


def test_a_pool_edited_after_the_heartbeat_counts_at_the_next_run(api, runtime) -> None:
    """Only runs keep a copy of the pool: an edit made between the heartbeat's read and the
    first run (a deployment tool setting the pool's defaults) is not missed."""
    images: list[str] = []
    runtime.script_for = lambda spec: (images.append(spec.create_kwargs["image"]), Script())[1]
    worker = make_worker(api, runtime)
    worker._heartbeat()
    api.pool = api.pool.model_copy(update={"base_job_template": with_default_image(
        api.pool.base_job_template, "edited/image:2")})
    api.add_run()
    worker.poll()
    settle(worker)
    assert images == ["edited/image:2"]


def test_a_deleted_deployment_still_cancels_its_runs(api, runtime: FakeRuntime) -> None:
    """Not kept, a NotFound is seen by every run (runs.py cancels them)."""
    worker = make_worker(api, runtime)
    deployment = api.add_deployment()
    runs = [api.add_run(f"r{i}", deployment=deployment) for i in range(2)]
    del api.deployments[deployment.id]
    worker.poll()
    settle(worker)
    assert {api.state_of(r.id).type for r in runs} == {StateType.CANCELLED}


# --- the run's final state, from the event stream ----------------------------------------
def requests_after_the_exit(api, runtime, recorder, event: str,
                            final: StateType) -> list:
    """A run whose container ends once `event` came for it: the requests from the event on."""
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, final_state=final)
    worker = make_worker(recorder, runtime)  # type: ignore[arg-type]
    run = api.add_run()
    worker.poll()
    wait_until(lambda: all(s.container for s in worker.active_runs()))
    recorder.clear()
    worker._on_event(f"prefect.flow-run.{event}", f"prefect.flow-run.{run.id}")
    gate.set()
    settle(worker)
    assert api.state_of(run.id).type == final
    return recorder.requests()


def test_a_final_event_spares_the_read_after_the_exit(api, runtime, recorder) -> None:
    assert requests_after_the_exit(api, runtime, recorder, "Completed",
                                   StateType.COMPLETED) == []


def test_a_crashed_event_does_not_spare_it(api, runtime, recorder) -> None:
    """A Crashed state's message is part of the verdict (why it crashed): read."""
    requests = requests_after_the_exit(api, runtime, recorder, "Crashed", StateType.CRASHED)
    assert requests[0] == STATE


def test_a_final_event_before_the_container_started_is_not_believed(api, runtime) -> None:
    """An event of the run's earlier life (rescheduled after it ended) arriving late: the
    exit is judged by the state read, not by it."""
    gate = threading.Event()
    runtime.image_gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, final_state=None, exit_code=1)
    worker = make_worker(api, runtime)
    run = api.add_run()
    worker.poll()
    wait_until(lambda: runtime.calls.count(("ensure_image", "")) == 1)
    worker._on_event("prefect.flow-run.Completed", f"prefect.flow-run.{run.id}")
    runtime.image_gate.set()
    gate.set()
    settle(worker)
    assert api.state_of(run.id).type == StateType.CRASHED


def test_a_final_event_does_not_cover_a_container_that_crashed(api, runtime) -> None:
    """Anyone holding an API key (every flow does) may post a Completed event for another
    run: its container exiting non-zero without a final state is still CRASHED, not left
    RUNNING (and later rescheduled as vanished: run twice). Found by an audit."""
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate, final_state=None, exit_code=137)
    worker = make_worker(api, runtime)
    run = api.add_run()
    worker.poll()
    wait_until(lambda: all(s.container for s in worker.active_runs()))
    worker._on_event("prefect.flow-run.Completed", f"prefect.flow-run.{run.id}")  # forged
    gate.set()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "137" in state.message, state
