"""One flow run through its steps, on the fakes: claim, prepare, start, watch, verdict."""

from __future__ import annotations

import json
import logging
import random
import threading

import pytest
from testrig.junk import junk_job_variables

from dockerworker.api import PrefectAPIError, ServerUnreachable, StateType
from dockerworker.containers import LABEL_FLOW_RUN_ID, LABEL_WORKER
from dockerworker.flowcode import NEEDS_ENV
from dockerworker.jobs import default_base_job_template
from dockerworker.runs import Phase
from dockerworker.runtime import EngineError, EngineUnavailable, WorkloadGone

from .fakes import FakeAPI, FakeRuntime, Script, make_worker, settle, wait_until

ABSENT_IMAGE = "dockerworker-test/absent:fuzz"


def run_one(api: FakeAPI, runtime: FakeRuntime, script: Script | None = None, **run_kw):
    """A scheduled run, polled by a fresh worker and seen to its end."""
    if script is not None:
        runtime.script_for = lambda spec: script
    run = api.add_run(**run_kw)
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    return run, worker


def test_a_run_completes_in_a_labelled_container(api, runtime) -> None:
    run, _ = run_one(api, runtime, Script(lines=[("stdout", "hello from the flow")]))
    assert api.history[run.id] == [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING,
                                   StateType.COMPLETED]
    container = runtime.of_run(run.id)
    assert container is not None
    assert container.workload.labels[LABEL_FLOW_RUN_ID] == str(run.id)
    assert api.runs[run.id].infrastructure_pid == f"fake-engine:{container.workload.id}"


def test_the_run_s_log_tells_its_steps_and_its_output(api, runtime) -> None:
    run, worker = run_one(api, runtime, Script(lines=[("stdout", "hello from the flow")]))
    assert worker.shipper.flush(5)
    messages = api.messages(run.id)
    assert "claimed by worker w1" in messages
    assert any(m.startswith("container run-") and m.endswith("started") for m in messages)
    assert "hello from the flow" in messages
    assert any("exited with code 0; 1 output lines" in m for m in messages)


def test_a_claim_another_worker_won_starts_nothing(api, runtime) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime)
    supervisor = worker.admission.admit(run.id, lambda: _supervisor(worker, run))
    api.set_state(run.id, StateType.PENDING, "claimed by dockerworker other")
    supervisor.run()
    assert runtime.containers == {}
    assert api.state_of(run.id).message == "claimed by dockerworker other"
    assert run.id not in worker.admission


def _supervisor(worker, run):
    from dockerworker.runs import RunSupervisor

    return RunSupervisor(worker.api, worker.runtime, worker.settings, worker.pool, run,
                         worker.shipper, worker.builder, on_done=worker._done)


def test_claim_race_between_workers_starts_each_run_once(api, runtime) -> None:
    runs = [api.add_run(f"run-{i}") for i in range(12)]
    workers = [make_worker(api, runtime, name=f"w{i}", max_starting=0) for i in range(3)]
    api.poll_barrier = threading.Barrier(3)  # all three see all twelve before anyone claims
    polls = [threading.Thread(target=w.poll) for w in workers]
    for t in polls:
        t.start()
    for t in polls:
        t.join()
    for worker in workers:
        settle(worker)
    for run in runs:
        assert api.history[run.id].count(StateType.PENDING) == 1
        assert api.state_of(run.id).type == StateType.COMPLETED
    assert len(runtime.containers) == 12
    aborted = [p for p in api.proposals if p[1] == StateType.PENDING and p[2] == "ABORT"]
    assert len(aborted) == 24  # every loser was told no


def test_a_container_ending_without_a_state_is_crashed_with_code_and_output(api, runtime):
    run, _ = run_one(api, runtime, Script(lines=[("stderr", "last words before exit")],
                                          exit_code=3, final_state=None))
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED
    assert "exited with code 3 while the flow run was RUNNING" in state.message
    assert "last words before exit" in state.message
    assert state.message.endswith("(reported by dockerworker)")


def test_out_of_memory_is_named(api, runtime) -> None:
    run, _ = run_one(api, runtime, Script(exit_code=137, oom=True, final_state=None),
                     job_variables={"mem_limit": "256m"})
    assert "out of memory (mem_limit 256m)" in api.state_of(run.id).message


def test_a_crash_prefect_saw_gets_docker_s_reason(api, runtime) -> None:
    run, _ = run_one(api, runtime, Script(exit_code=137, oom=True,
                                          final_state=StateType.CRASHED))
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "out of memory" in state.message
    assert api.proposals[-1][2] == "ACCEPT"  # forced over the engine's CRASHED


def test_a_suspended_run_is_left_paused(api, runtime) -> None:
    run, _ = run_one(api, runtime, Script(final_state=StateType.PAUSED))
    assert api.state_of(run.id).type == StateType.PAUSED


def test_a_run_whose_deployment_is_gone_is_cancelled(api, runtime) -> None:
    deployment = api.add_deployment()
    del api.deployments[deployment.id]
    run, _ = run_one(api, runtime, deployment=deployment)
    state = api.state_of(run.id)
    assert state.type == StateType.CANCELLED and "no longer exists" in state.message
    assert runtime.containers == {}


def test_deployment_job_variables_reach_the_container(api, runtime) -> None:
    deployment = api.add_deployment(job_variables={"env": {"FROM_DEPLOYMENT": "1"}})
    run, _ = run_one(api, runtime, deployment=deployment, job_variables={"env": {"RUN": "2"}})
    env = runtime.of_run(run.id).workload.env
    assert env["FROM_DEPLOYMENT"] == "1" and env["RUN"] == "2"
    assert env["PREFECT__DEPLOYMENT_NAME"] == "nightly"


def test_an_invalid_job_variable_is_named(api, runtime) -> None:
    run, _ = run_one(api, runtime, job_variables={"mem_limit": "lots"})
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "mem_limit" in state.message
    assert runtime.containers == {}


@pytest.mark.parametrize("key", ["io.dockerworker.owner-of", "dockerworker.io/warm",
                                 "io.dockerworker.managed"])
def test_a_job_may_not_set_the_worker_s_own_labels(api, runtime, key: str) -> None:
    """They are how workers find, own and judge containers: a run's container posing as an
    ownership record of another run's container could make its owner leave it (unfollowed,
    its cancellation lost). Other labels, prefect-docker's way, are the job's to set."""
    run, _ = run_one(api, runtime, job_variables={"labels": {key: "x", "team": "a"}})
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED, state
    assert state.message.startswith(f"invalid job variables: labels: {key}: labels under "
                                     "io.dockerworker. (or dockerworker.io/) are the worker's own")
    assert runtime.containers == {}
    run, _ = run_one(api, runtime, job_variables={"labels": {"team": "a",
                                                             "example.com/tier": "b"}})
    labels = runtime.of_run(run.id).workload.labels
    assert (labels["team"], labels["com.example.tier"]) == ("a", "b")


class EveryImage(set):
    """A `missing_images` that holds every name."""

    def __contains__(self, name: object) -> bool:
        return True


def test_a_thousand_malformed_job_variable_documents_each_end_with_a_clear_message(
    api, runtime
) -> None:
    """A pool whose template accepts anything (as a hand-written one may): the worker judges
    each document itself, crashes its run with a short message and no traceback, starts no
    container and never dies."""
    template = default_base_job_template()
    template["variables"] = {  # every variable declared, none typed
        "type": "object", "properties": {name: {} for name in template["job_configuration"]}}
    api.pool = api.pool.model_copy(update={"base_job_template": template})
    runtime.missing_images = EveryImage()  # as the integration test's "Never" pull policy
    deployment = api.add_deployment(job_variables={"image": ABSENT_IMAGE})
    rng = random.Random(20261201)
    runs = [(api.add_run(deployment=deployment, job_variables=junk_job_variables(rng)))
            for _ in range(1000)]
    worker = make_worker(api, runtime, limit=50, max_starting=50)
    while any(api.state_of(run.id).type == StateType.SCHEDULED for run in runs):
        worker.poll()
        settle(worker, timeout=30)
    # a document that passes ends on its image, absent in the fake's way
    clear = ("invalid job variables: ", "refused by the worker's policy: ", "pulling image ")
    for run in runs:
        state = api.state_of(run.id)
        assert state.type == StateType.CRASHED, (run.job_variables, state)
        assert state.message.startswith(clear), (run.job_variables, state.message[:300])
        assert "Traceback" not in state.message and len(state.message) < 3000
    assert runtime.containers == {}
    assert not worker.stop_event.is_set()


def test_the_policy_refuses_a_job_before_anything_is_read_pulled_or_built(api, runtime
                                                                         ) -> None:
    run = api.add_run(job_variables={"privileged": True, "pip_packages": ["six"],
                                     "secrets": ["db_password"]})
    worker = make_worker(api, runtime, policy={"allow_privileged": False})
    worker.poll()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED
    assert state.message.startswith("refused by the worker's policy"), state.message
    assert runtime.containers == {}
    assert "ensure_image" not in [method for method, _ in runtime.calls]
    assert worker.builder.builds == []


def test_an_image_that_cannot_be_had_is_crashed(api, runtime) -> None:
    runtime.missing_images.add("nowhere/nothing:1")
    run, _ = run_one(api, runtime, job_variables={"image": "nowhere/nothing:1"})
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "nowhere/nothing:1" in state.message


def test_a_container_the_engine_refuses_to_start_is_crashed(api, runtime) -> None:
    runtime.fail["start"] = EngineError("unable to apply caps: operation not permitted")
    run, _ = run_one(api, runtime)
    message = api.state_of(run.id).message
    assert "could not start the flow run's container from" in message
    assert "unable to apply caps" in message


def test_a_failed_build_is_crashed_with_its_reason(api, runtime) -> None:
    run = api.add_run(job_variables={"pip_packages": ["nonexistent-package-xyz"]})
    worker = make_worker(api, runtime)
    worker.builder.fail = "pip install failed: No matching distribution"
    worker.poll()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "No matching distribution" in state.message


def test_a_build_runs_from_the_built_image_without_extra_pip_packages(api, runtime) -> None:
    run = api.add_run(job_variables={"env": {"EXTRA_PIP_PACKAGES": "six"}})
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    assert worker.builder.builds == ["etl"]
    container = runtime.of_run(run.id)
    assert "EXTRA_PIP_PACKAGES" not in container.workload.env
    assert api.state_of(run.id).type == StateType.COMPLETED


def test_a_container_removed_behind_the_worker_s_back_is_crashed(api, runtime) -> None:
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold)
    run = api.add_run(job_variables={"infra_retries": 0})
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: runtime.of_run(run.id) is not None)
    runtime.vanish(run.id)
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "container vanished" in state.message
    assert "no infrastructure retries left (0 of 0 used)" in state.message


def test_auto_remove_removes_the_container_after_the_verdict(api, runtime) -> None:
    run, _ = run_one(api, runtime, Script(exit_code=1, final_state=None),
                     job_variables={"auto_remove": True})
    assert runtime.of_run(run.id) is None
    assert "exited with code 1" in api.state_of(run.id).message  # its output was read first


def test_without_auto_remove_the_container_stays(api, runtime) -> None:
    run, _ = run_one(api, runtime)
    assert runtime.of_run(run.id) is not None


def test_a_worker_leaving_detaches_and_reports_nothing(api, runtime) -> None:
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold)
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: any(s.phase == Phase.RUNNING and s.output is not None
                           for s in worker.active_runs()))
    for supervisor in worker.active_runs():
        supervisor.stop_following()
    settle(worker)
    assert api.state_of(run.id).type == StateType.RUNNING
    assert runtime.of_run(run.id).workload.status == "running"  # left for the next worker
    hold.set()


def test_the_engine_away_for_a_moment_is_waited_for(api, runtime, monkeypatch) -> None:
    from dockerworker import follow

    monkeypatch.setattr(follow, "wait_exponential_jitter", lambda **kw: lambda state: 0)
    runtime.fail["read_exit"] = EngineUnavailable("connection refused")
    run, _ = run_one(api, runtime, Script(lines=[("stdout", "x")]))
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert [method for method, _ in runtime.calls].count("read_exit") == 2  # retried once


# --- every supervisor frees its slot, whatever raises ------------------------------------
API_FAILURES = ["read_work_pool", "read_flow", "read_flow_run", "set_state"]
RUNTIME_FAILURES = ["ensure_image", "start", "follow", "wait", "read_exit"]


@pytest.mark.parametrize("method", API_FAILURES)
def test_an_api_failure_at_any_step_frees_the_slot(api, runtime, method) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime)
    api.fail[method] = PrefectAPIError(f"{method} failed")
    worker.poll()
    settle(worker)
    assert run.id not in worker.admission


@pytest.mark.parametrize("method", RUNTIME_FAILURES)
def test_a_runtime_failure_at_any_step_frees_the_slot_and_crashes_the_run(
    api, runtime, method
) -> None:
    runtime.script_for = lambda spec: Script(final_state=None)  # the engine says nothing
    run = api.add_run(job_variables={"infra_retries": 0})
    worker = make_worker(api, runtime)
    runtime.fail[method] = RuntimeError(f"{method} exploded") if method != "follow" else (
        WorkloadGone("gone"))
    worker.poll()
    settle(worker)
    assert run.id not in worker.admission
    assert api.state_of(run.id).type == StateType.CRASHED


def test_an_engine_whose_id_cannot_be_read_claims_nothing(api, runtime) -> None:
    """The claim names the engine (ownership.Claim): without it the run is left as it is."""
    run = api.add_run()
    worker = make_worker(api, runtime)
    runtime.fail["host_id"] = RuntimeError("host_id exploded")
    worker.poll()
    settle(worker)
    assert run.id not in worker.admission and runtime.containers == {}
    assert api.state_of(run.id).type == StateType.SCHEDULED
    worker.poll()  # the engine answers again: the next poll runs it
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED


def test_an_unexpected_error_in_the_claim_leaves_the_run_untouched(api, runtime) -> None:
    run = api.add_run()
    api.fail["set_state"] = RuntimeError("boom")
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    assert api.history[run.id] == [StateType.SCHEDULED]


@pytest.mark.parametrize("failing", ["read_deployment", "read_work_pool"])
def test_a_server_gone_silent_after_the_claim_is_an_infrastructure_failure(
        api, runtime, failing: str) -> None:
    """The claim comes first: a read the client gave up on after it (past its patience)
    reschedules the run per infra_retries, with the reason in its state; no container."""
    deployment = api.add_deployment()
    worker = make_worker(api, runtime)
    api.fail[failing] = ServerUnreachable("cannot reach the Prefect server at …: ConnectError")
    run = api.add_run(deployment=deployment)
    worker.poll()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and state.message.startswith(RETRIED), state
    assert "the Prefect server did not answer while the run was prepared" in state.message
    assert runtime.containers == {}
    worker.poll()  # and the next claim runs it
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED


def test_a_run_cancelled_while_its_preparation_failed_ends_cancelled(api, runtime) -> None:
    """The run was CANCELLING when the server stopped answering: a reschedule (forced) would
    undo the user's cancellation, a crash (not forced) would be refused and leave it
    CANCELLING; it ends CANCELLED."""
    deployment = api.add_deployment()
    worker = make_worker(api, runtime)
    gate, reading = threading.Event(), threading.Event()
    real = api.read_deployment

    def silent_server(deployment_id):
        reading.set()
        gate.wait(5)
        raise ServerUnreachable("cannot reach the Prefect server")

    api.read_deployment = silent_server
    run = api.add_run(deployment=deployment)
    worker.poll()
    wait_until(reading.is_set)
    api.set_state(run.id, StateType.CANCELLING, force=True)
    worker.check_cancellations()
    wait_until(lambda: worker.active_runs()[0].cancel_requested.is_set())
    gate.set()
    settle(worker)
    api.read_deployment = real
    state = api.state_of(run.id)
    assert state.type == StateType.CANCELLED, state
    assert StateType.SCHEDULED not in api.history[run.id][1:]
    assert runtime.containers == {}


def test_a_run_whose_end_could_not_be_reported_is_rescheduled_by_reconciliation(
        api, runtime) -> None:
    """The server stayed away for the report too: the run is left PENDING with this
    worker's claim and no container; the next reconciliation gives it back to the pool."""
    deployment = api.add_deployment()
    worker = make_worker(api, runtime)
    api.fail["read_deployment"] = ServerUnreachable("cannot reach the Prefect server")
    api.fail["read_flow_run_states"] = ServerUnreachable("cannot reach the Prefect server")
    run = api.add_run(deployment=deployment)
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.PENDING  # nothing could be said
    worker.reconcile()
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED, state
    assert "could not report why" in state.message
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED


def _server_away_for(api: FakeAPI, method: str, when=lambda *a, **kw: True) -> list:
    """`api.<method>` answers ServerUnreachable while `when(...)` says so, until the test
    calls the returned list's restore (its first item)."""
    real = getattr(api, method)

    def away(*args, **kwargs):
        if when(*args, **kwargs):
            raise ServerUnreachable("cannot reach the Prefect server")
        return real(*args, **kwargs)

    setattr(api, method, away)
    return [lambda: setattr(api, method, real)]


@pytest.mark.parametrize("silent", ["the crash report", "the state after the exit"])
def test_a_verdict_the_server_did_not_hear_is_given_again_from_the_kept_container(
        api, runtime, silent: str) -> None:
    """The container ended without a final state (exit code 3) while the server was away,
    for the crash report or for the read of the run's state before it: the run is left as
    it was, its auto_remove container is kept (its exit code and output are the verdict),
    the slot is freed, and the next reconciliation once the server answers adopts the
    container and reports the crash; then it is removed."""
    deployment = api.add_deployment(job_variables={"auto_remove": True})
    runtime.script_for = lambda spec: Script(exit_code=3, final_state=None,
                                             lines=[("stdout", "giving up")])
    if silent == "the crash report":
        restore, = _server_away_for(api, "set_state",
                                    lambda run_id, type_, *a, **kw: type_ == StateType.CRASHED)
    else:  # from the container's end on (the runs reads its state then)
        def ended(*args, **kwargs) -> bool:
            container = runtime.of_run(run.id)
            return container is not None and container.ended.is_set()

        restore, = _server_away_for(api, "read_flow_run", ended)
    run = api.add_run(deployment=deployment)
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    container = runtime.of_run(run.id)
    assert container is not None and not container.removed, "the verdict's container is gone"
    assert container.workload.id in runtime.containers
    assert api.state_of(run.id).type == StateType.RUNNING
    assert worker.shipper.flush(5)
    assert any("is kept and the run judged again once the server answers" in m
               for m in api.messages(run.id)), api.messages(run.id)

    worker.reconcile()  # still away: nothing judged, nothing lost
    settle(worker)
    assert api.state_of(run.id).type == StateType.RUNNING
    assert container.workload.id in runtime.containers
    restore()
    worker.reconcile()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED, state
    assert "exited with code 3" in state.message and "giving up" in state.message
    assert container.workload.id not in runtime.containers  # auto_remove, once reported
    assert api.history[run.id].count(StateType.CRASHED) == 1


def test_reconciliation_leaves_an_ended_container_of_another_live_worker(
        api, runtime, caplog) -> None:
    """Another replica's container ended and its run has no verdict yet (that replica is
    judging it, or will once the server answers): not this worker's to judge."""
    caplog.set_level(logging.INFO, logger="dockerworker")
    run = api.add_run(state=StateType.RUNNING)
    container = runtime.add("other-run", {LABEL_FLOW_RUN_ID: str(run.id),
                                          LABEL_WORKER: "w2"}, status="exited", run_id=run.id)
    api.runs[run.id].infrastructure_pid = f"fake-engine:{container.workload.id}"
    api.heartbeat(api.pool.name, "w2", 30)
    worker = make_worker(api, runtime)
    worker.reconcile()
    settle(worker)
    assert api.state_of(run.id).type == StateType.RUNNING
    assert container.workload.id in runtime.containers
    assert not [r for r in caplog.records if "judging them" in r.getMessage()]


def test_the_operator_s_retries_count_before_the_job_is_known(api, runtime) -> None:
    """The deployment could not be read, so the job's infra_retries are unknown: the
    policy's default decides (here none)."""
    deployment = api.add_deployment()
    worker = make_worker(api, runtime, policy={"infra_retries": 0})
    api.fail["read_deployment"] = ServerUnreachable("cannot reach the Prefect server")
    run = api.add_run(deployment=deployment)
    worker.poll()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED, state
    assert "the Prefect server did not answer while the run was prepared" in state.message
    assert "no infrastructure retries left (0 of 0 used)" in state.message


def test_a_report_that_fails_still_frees_the_slot(api, runtime) -> None:
    runtime.script_for = lambda spec: Script(exit_code=1, final_state=None)
    run = api.add_run()
    worker = make_worker(api, runtime)
    original = api.set_state
    calls = []

    def flaky(run_id, type_, *a, **kw):
        calls.append(type_)
        if type_ == StateType.CRASHED:
            raise RuntimeError("the server fell over")
        return original(run_id, type_, *a, **kw)

    api.set_state = flaky
    worker.poll()
    settle(worker)
    assert StateType.CRASHED in calls and run.id not in worker.admission


def test_secrets_in_the_job_env_are_masked_in_the_crash_message(api, runtime) -> None:
    runtime.script_for = lambda spec: Script(lines=[("stdout", "token is s3cr3t-value")],
                                             exit_code=1, final_state=None)
    run = api.add_run(job_variables={"env": {"API_TOKEN": "s3cr3t-value"}})
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    message = api.state_of(run.id).message
    assert "s3cr3t-value" not in message and "token is" in message


# --- idempotent claims -----------------------------------------------------------------
def test_a_claim_whose_answer_was_lost_is_ours_and_goes_on(api, runtime) -> None:
    """The server applied PENDING, the answer was lost, the retry heard "already PENDING":
    the PENDING state carries this worker's claim, so the run starts at once."""
    api.lose_answers = {StateType.PENDING}
    run, worker = run_one(api, runtime)
    assert ("ABORT" in [status for run_id, kind, status in api.proposals
                        if run_id == run.id and kind == StateType.PENDING])
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert run.id not in worker.admission


def test_a_pending_state_of_another_worker_is_not_taken_for_ours(api, runtime) -> None:
    run = api.add_run(state=StateType.PENDING, message="claimed by dockerworker w2")
    worker = make_worker(api, runtime)
    supervisor = worker.admission.admit(run.id, lambda: _supervisor(worker, run))
    supervisor.run()
    assert runtime.containers == {}
    assert api.state_of(run.id).message == "claimed by dockerworker w2"


# --- retries for infrastructure, not for flows ------------------------------------------
RETRIED = "Rescheduled by dockerworker after an infrastructure failure (retry 1 of 1)"


def _vanish_first_attempt(api, runtime, run_kw=None):
    """The first container of the run vanishes; later ones complete."""
    hold = threading.Event()
    attempts = []

    def script(spec):
        attempts.append(spec)
        return Script(hold=hold) if len(attempts) == 1 else Script()

    runtime.script_for = script
    run = api.add_run(**(run_kw or {}))
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: runtime.of_run(run.id) is not None)
    runtime.vanish(run.id)
    settle(worker)
    return run, worker, attempts


def test_a_vanished_container_is_retried_once_then_completes(api, runtime) -> None:
    run, worker, attempts = _vanish_first_attempt(api, runtime)
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and state.message.startswith(RETRIED)
    assert "container vanished" in state.message
    worker.poll()  # rescheduled: claimed and run again like any scheduled run
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED
    assert len(attempts) == 2


def test_retries_are_counted_from_the_run_s_history(api, runtime) -> None:
    run, worker, _ = _vanish_first_attempt(api, runtime)
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold)
    worker.poll()
    wait_until(lambda: runtime.of_run(run.id) is not None
               and not runtime.of_run(run.id).removed and api.state_of(run.id).type
               == StateType.RUNNING)
    runtime.vanish(run.id)
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED
    assert "no infrastructure retries left (1 of 1 used)" in state.message


def test_a_pool_or_job_may_ask_for_more_retries_or_none(api, runtime) -> None:
    run, _, _ = _vanish_first_attempt(api, runtime, {"job_variables": {"infra_retries": 3}})
    assert "(retry 1 of 3)" in api.state_of(run.id).message


@pytest.mark.parametrize(
    ("script", "why"),
    [
        (Script(exit_code=1, final_state=None), "exited with code 1"),
        (Script(exit_code=137, oom=True, final_state=None), "out of memory"),
        (Script(exit_code=0, final_state=StateType.FAILED), None),
    ],
    ids=["non-zero exit", "oom", "flow failed"],
)
def test_flow_errors_are_never_retried(api, runtime, script, why) -> None:
    run, _ = run_one(api, runtime, script)
    state = api.state_of(run.id)
    assert state.type in (StateType.CRASHED, StateType.FAILED)
    assert StateType.SCHEDULED not in api.history[run.id][1:]
    if why:
        assert why in state.message


def test_a_transient_pull_failure_is_retried_and_a_missing_image_is_not(api, runtime) -> None:
    from dockerworker.images import ImageUnavailable

    runtime.fail["ensure_image"] = ImageUnavailable("pulling image 'x' failed: i/o timeout",
                                                    transient=True)
    run, worker = run_one(api, runtime)
    assert api.state_of(run.id).message.startswith(RETRIED)
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED

    runtime.fail["ensure_image"] = ImageUnavailable("pulling image 'x' failed: not found")
    missing, _ = run_one(api, runtime)
    assert api.state_of(missing.id).type == StateType.CRASHED


def test_an_engine_restart_under_a_running_container_is_retried(api, runtime) -> None:
    from dockerworker.containers import ExitReport
    from dockerworker.verdict import Outcome, judge

    class Box:
        name, short_id = "c", "c"

    killed = ExitReport(exit_code=137, oom_killed=False, error="")
    running = api.add_run(state=StateType.RUNNING).state
    verdict = judge(killed, running, cancelled=False, removed=False, workload=Box(),
                    engine_restarted=True)
    assert verdict.outcome is Outcome.CRASHED and verdict.infrastructure
    assert verdict.message.startswith("The Docker engine restarted under the run")
    plain = judge(killed, running, cancelled=False, removed=False, workload=Box())
    assert not plain.infrastructure
    oom = judge(ExitReport(137, True, ""), running, cancelled=False, removed=False,
                workload=Box(), engine_restarted=True)
    assert not oom.infrastructure


def test_an_engine_that_does_not_answer_before_the_container_runs_is_retried(api, runtime
                                                                              ) -> None:
    runtime.fail["ensure_image"] = EngineUnavailable("connection refused")
    run, worker = run_one(api, runtime)
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and state.message.startswith(RETRIED)
    assert "the Docker engine did not answer" in state.message
    assert run.id not in worker.admission


def test_a_start_the_engine_refuses_is_not_retried(api, runtime) -> None:
    """The engine answered (privileges it cannot give, a missing GPU driver): retrying would
    only make a second container that fails the same way."""
    runtime.fail["start"] = EngineError("unable to apply caps: operation not permitted")
    run, _ = run_one(api, runtime)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "unable to apply caps" in state.message
    assert StateType.SCHEDULED not in api.history[run.id][1:]


# --- pull steps (flowcode.py) ----------------------------------------------------------
GIT_STEP = "prefect.deployments.steps.git_clone"


def test_a_failed_pull_leads_the_crash_message_and_its_token_is_masked(api, runtime) -> None:
    """The token comes from a Secret block the worker never had to hold: it reads the block,
    so the output the container printed (with the token in it) is masked everywhere."""
    api.blocks[("secret", "git-token")] = {"value": "glpat-from-the-block"}
    deployment = api.add_deployment(pull_steps=[{GIT_STEP: {
        "repository": "https://git.example.com/org/private.git",
        "access_token": "{{ prefect.blocks.secret.git-token }}"}}])
    runtime.script_for = lambda spec: Script(lines=[
        ("stderr", "cloning https://glpat-from-the-block@git.example.com/org/private.git"),
        ("stderr", ("RuntimeError: Failed to clone repository 'https://git.example.com/org/"
                   "private.git' with exit code 128. git stderr: fatal: Authentication failed")),
        ("stderr", ("prefect.deployments.steps.core.StepExecutionError: Encountered error while "
                   "running prefect.deployments.steps.git_clone"))],
        exit_code=1, final_state=None)
    run, worker = run_one(api, runtime, deployment=deployment)
    message = api.state_of(run.id).message
    assert message.startswith("The flow's code could not be pulled (git_clone): the git server "
                              "refused the credentials"), message
    assert "exited with code 1" in message
    assert worker.shipper.flush(5)
    shipped = "\n".join(api.messages(run.id))
    assert "cloning https://***@git.example.com" in shipped
    assert "glpat-from-the-block" not in message + shipped


def test_the_container_is_told_what_the_pull_steps_need(api, runtime) -> None:
    deployment = api.add_deployment(pull_steps=[{GIT_STEP: {"repository": "git@h:o/r.git"}}])
    run, _ = run_one(api, runtime, deployment=deployment)
    container = runtime.of_run(run.id)
    assert container is not None
    checks = json.loads(container.workload.env[NEEDS_ENV])
    assert [c["command"] for c in checks] == ["git", "ssh"]
    plain, _ = run_one(api, runtime, deployment=api.add_deployment())
    assert NEEDS_ENV not in runtime.of_run(plain.id).workload.env


def test_a_block_the_server_did_not_answer_for_holds_the_run_back(api, runtime) -> None:
    """The engine in the container might read it a moment later, and print its value
    unmasked: no container; an infrastructure failure, rescheduled."""
    api.blocks[("secret", "git-token")] = {"value": "glpat-from-the-block"}
    deployment = api.add_deployment(pull_steps=[{GIT_STEP: {
        "repository": "https://h/r.git", "access_token": "{{ prefect.blocks.secret.git-token }}"}}])
    api.fail["read_block_data"] = ServerUnreachable("cannot reach the Prefect server")
    run, worker = run_one(api, runtime, deployment=deployment)
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and state.message.startswith(RETRIED), state
    assert runtime.containers == {}
    worker.poll()
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED


def test_a_block_that_cannot_be_read_does_not_stop_the_run(api, runtime) -> None:
    deployment = api.add_deployment(pull_steps=[{GIT_STEP: {
        "repository": "https://h/r.git", "access_token": "{{ prefect.blocks.secret.gone }}"}}])
    run, _ = run_one(api, runtime, deployment=deployment)
    assert api.state_of(run.id).type == StateType.COMPLETED
