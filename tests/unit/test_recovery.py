"""Never lose a run (issue 14): a loop whose rounds fail alone; ownership on a shared engine;
orphans adopted by exactly one worker; leftovers of warm containers removed."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from types import SimpleNamespace

from dockerworker import ownership
from dockerworker import worker as worker_module
from dockerworker.api import NotFound, ServerUnreachable, State, StateType
from dockerworker.containers import LABEL_FLOW_RUN_ID, LABEL_WORKER
from dockerworker.ownership import Claim, Owner
from dockerworker.policy import Policy
from dockerworker.warm import LABEL_WARM, WARM_NAME_PREFIX, handed_name

from .fakes import FAKE_HOST, FakeAPI, FakeRuntime, Script, make_worker, settle, wait_until

AUTO_REMOVE = {"io.dockerworker.auto-remove": "true"}


NO_RETRIES = Policy(infra_retries=0)  # vanished containers: CRASHED at once


def of(worker: str, run_id=None, **labels: str) -> dict[str, str]:
    found = {LABEL_WORKER: worker, **labels}
    if run_id is not None:
        found[LABEL_FLOW_RUN_ID] = str(run_id)
    return found


def online(api: FakeAPI, *names: str) -> None:
    for name in names:
        api.workers[name] = {"name": name, "status": "ONLINE", "heartbeat_interval_seconds": 30}


def offline(api: FakeAPI, *names: str) -> None:
    for name in names:
        api.workers[name] = {"name": name, "status": "OFFLINE", "heartbeat_interval_seconds": 30}


def test_a_claim_names_its_worker_and_engine_and_is_read_back_whatever_the_name() -> None:
    for claim in [Claim("w7", FAKE_HOST), Claim("a (engine b)", "x:y"), Claim("w 1", "")]:
        assert Claim.of(State(type=StateType.PENDING, message=claim.message)) == claim
    assert Claim("w7", "E1").message == "claimed by dockerworker w7 (engine E1)"
    # an earlier dockerworker's claim names no engine: any worker of the pool may judge it
    assert Claim.of(State(type=StateType.PENDING, message="claimed by dockerworker w7")) == (
        Claim("w7", ""))
    assert Claim("w7").seen_from("E2") and not Claim("w7", "E1").seen_from("E2")
    assert Claim.of(State(type=StateType.RUNNING, message=Claim("w7").message)) is None
    assert Claim.of(State(type=StateType.PENDING, message="claimed by someone")) is None


# --- item 1: a loop that cannot die --------------------------------------------------------
def test_a_prefect_error_in_reconciliation_fails_that_round_alone(api, runtime) -> None:
    first = api.add_run(state=StateType.RUNNING, infrastructure_pid=f"{FAKE_HOST}:aaaa")
    second = api.add_run(state=StateType.RUNNING, infrastructure_pid=f"{FAKE_HOST}:bbbb")
    worker = make_worker(api, runtime, policy=NO_RETRIES)
    api.fail["set_state"] = ServerUnreachable("503")
    worker.reconcile()  # raises nothing
    states = {api.state_of(first.id).type, api.state_of(second.id).type}
    assert states == {StateType.RUNNING, StateType.CRASHED}  # the other run was judged
    assert worker.failures["reconciliation"] == 1
    worker.reconcile()  # the next turn finishes the job
    assert api.state_of(first.id).type == api.state_of(second.id).type == StateType.CRASHED


def test_a_read_error_in_removal_skips_nothing_else(api, runtime) -> None:
    done = [api.add_run(state=StateType.COMPLETED) for _ in range(2)]
    worker = make_worker(api, runtime)
    for run in done:
        runtime.add("x", of("w1", run.id, **AUTO_REMOVE), status="exited")
    api.fail["read_flow_run"] = ServerUnreachable("503")
    worker.reconcile()
    assert len(runtime.containers) == 1 and worker.failures["removal"] == 1
    worker.reconcile()
    assert runtime.containers == {}


def test_every_round_fails_alone_and_is_counted(api, runtime, monkeypatch) -> None:
    run = api.add_run()
    worker = make_worker(api, runtime)
    api.fail["heartbeat"] = ServerUnreachable("heartbeat 503")
    api.fail["read_workers"] = ServerUnreachable("workers 503")
    runtime.fail["list_workloads"] = RuntimeError("engine said something odd")
    monkeypatch.setattr(worker.recovery, "reconcile", lambda ours: 1 / 0)
    for name, (_, action) in worker._rounds().items():
        worker._step(name, action)
    assert worker.failures["heartbeat"] == 1
    assert sum(worker.failures.values()) >= 3
    settle(worker)
    assert api.state_of(run.id).type == StateType.COMPLETED  # the poll still ran


def test_a_failed_poll_or_cancellation_check_is_a_failed_round_like_any_other(
        api, runtime, caplog) -> None:
    """Counted (health, the metric), said as every round's failure, not counted as done."""
    from dockerworker import metrics

    def failed_rounds(name: str) -> float:
        return metrics.ROUND_FAILURES.labels(name)._value.get()

    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate)
    api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: worker.active_runs() and worker.active_runs()[0].container)
    before = {name: failed_rounds(name) for name in ("poll", "cancellations")}
    api.fail["get_scheduled_flow_runs"] = ServerUnreachable("poll 503")
    api.fail["filter_flow_runs"] = ServerUnreachable("filter 503")
    for name, action in (("poll", worker.poll), ("cancellations", worker.check_cancellations)):
        assert not worker._step(name, action)
        assert worker.failures[name] == 1 and worker.rounds[name] == 0
        assert failed_rounds(name) == before[name] + 1
        assert f"{name} failed (1 times so far; tried again at its next turn)" in caplog.text
    gate.set()
    settle(worker)


def test_the_heartbeat_s_pool_re_creation_fails_alone(api, runtime, monkeypatch) -> None:
    worker = make_worker(api, runtime)
    api.fail["heartbeat"] = NotFound("pool")  # the server's 404: the pool is gone

    def refused() -> None:
        raise ServerUnreachable("503 while creating the pool")

    monkeypatch.setattr(worker, "ensure_pool", refused)
    assert worker._step("heartbeat", worker._heartbeat)  # the heartbeat round went through
    assert worker.failures["pool re-creation"] == 1


def test_the_loop_outlives_failing_rounds(api, runtime) -> None:
    """The real loop: the server errs in reconciliation and in the heartbeat; it goes on."""
    worker = make_worker(api, runtime, start=False, heartbeat_interval=1, poll_interval=0.1)
    worker.wait_for_server = lambda: None  # type: ignore[method-assign]
    api.fail["set_state"] = ServerUnreachable("503")
    api.add_run(state=StateType.RUNNING, infrastructure_pid=f"{FAKE_HOST}:gone")
    api.fail["heartbeat"] = ServerUnreachable("503")
    thread = threading.Thread(target=worker._loop, daemon=True)
    thread.start()
    run = api.add_run()
    wait_until(lambda: api.state_of(run.id).type == StateType.COMPLETED)
    assert thread.is_alive()
    worker.stop()
    thread.join(5)
    assert not thread.is_alive()


# --- item 3: ownership on a shared engine ----------------------------------------------------
def test_another_live_worker_s_exited_container_is_not_removed(api, runtime) -> None:
    """The 'container vanished' on a COMPLETED run: w2 still reads its container's exit."""
    online(api, "w2")
    run = api.add_run(state=StateType.COMPLETED)
    runtime.add("theirs", of("w2", run.id, **AUTO_REMOVE), status="exited")
    worker = make_worker(api, runtime)
    worker.reconcile()
    worker.adopt_orphans()
    assert [c.workload.name for c in runtime.containers.values()] == ["theirs"]
    assert len(worker.admission) == 0


def test_a_live_worker_s_vanished_container_is_left_to_it(api, runtime) -> None:
    online(api, "w2")
    run = api.add_run(state=StateType.SCHEDULED)
    api.set_state(run.id, StateType.PENDING, Claim("w2", FAKE_HOST).message)
    api.set_state(run.id, StateType.RUNNING)
    api.runs[run.id].infrastructure_pid = f"{FAKE_HOST}:feedbeef"
    worker = make_worker(api, runtime, policy=NO_RETRIES)
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.RUNNING
    offline(api, "w2")
    worker.reconcile()
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "container vanished" in state.message


def test_a_claim_of_a_gone_worker_without_a_container_is_rescheduled(api, runtime) -> None:
    online(api, "w2")
    run = api.add_run(state=StateType.PENDING, message=Claim("w2", FAKE_HOST).message)
    worker = make_worker(api, runtime)
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.PENDING
    offline(api, "w2")
    worker.reconcile()
    state = api.state_of(run.id)
    assert state.type == StateType.SCHEDULED and "w2 is gone" in state.message


def test_a_gone_worker_s_claim_on_another_engine_is_left_to_that_engine_s_workers(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """w2 claimed runs on engine E2, started their containers there and died before the
    server took their infrastructure_pid. From this engine no container of theirs can be
    seen: rescheduling one (or setting one CANCELLED) here would run it twice, or end it
    while it runs. A claim on this engine, and an earlier dockerworker's claim that names
    no engine, are still given back."""
    offline(api, "w2")
    elsewhere = api.add_run("elsewhere", state=StateType.PENDING,
                            message=Claim("w2", "E2").message)
    cancelling = api.add_run("cancelling")
    api.set_state(cancelling.id, StateType.PENDING, Claim("w2", "E2").message)
    api.set_state(cancelling.id, StateType.CANCELLING, force=True)
    here = api.add_run("here", state=StateType.PENDING,
                       message=Claim("w2", FAKE_HOST).message)
    legacy = api.add_run("legacy", state=StateType.PENDING, message="claimed by dockerworker w2")
    worker = make_worker(api, runtime)
    for _ in range(2):
        worker.reconcile()
    assert api.state_of(elsewhere.id).type == StateType.PENDING
    assert api.state_of(cancelling.id).type == StateType.CANCELLING
    assert api.state_of(here.id).type == api.state_of(legacy.id).type == StateType.SCHEDULED
    on_e2 = make_worker(api, FakeRuntime(api, host="E2"), name="w3")  # a worker that sees E2
    on_e2.reconcile()
    assert api.state_of(elsewhere.id).type == StateType.SCHEDULED
    assert api.state_of(cancelling.id).type == StateType.CANCELLED


# --- item 4: orphans are adopted ---------------------------------------------------------------
def orphan(api: FakeAPI, runtime: FakeRuntime, hold: threading.Event, **script):
    run = api.add_run(state=StateType.RUNNING)
    container = runtime.add("etl-orphan", of("w2", run.id), Script(
        lines=[("stdout", "still working")], hold=hold, **script), run_id=run.id)
    return run, container


def test_an_orphan_is_adopted_followed_and_judged(api, runtime) -> None:
    hold = threading.Event()
    run, container = orphan(api, runtime, hold, exit_code=3, final_state=None)
    online(api, "w2")
    worker = make_worker(api, runtime)
    worker.adopt_orphans()
    assert len(worker.admission) == 0  # its worker is alive
    offline(api, "w2")
    worker.adopt_orphans()
    assert run.id in worker.admission
    assert runtime.owners(api.pool.name)[container.workload.id] == Owner("w1", 1)
    hold.set()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED and "exited with code 3" in state.message
    worker.shipper.flush(1)
    assert "still working" in api.messages(run.id)


def test_an_adopted_orphan_can_be_cancelled(api, runtime) -> None:
    hold = threading.Event()
    run, _ = orphan(api, runtime, hold)
    offline(api, "w2")
    worker = make_worker(api, runtime)
    worker.adopt_orphans()
    wait_until(lambda: worker.active_runs() and worker.active_runs()[0].output is not None)
    api.set_state(run.id, StateType.CANCELLING, force=True)
    worker.check_cancellations()
    settle(worker)
    hold.set()
    assert api.state_of(run.id).type == StateType.CANCELLED


def test_exactly_one_worker_adopts_an_orphan(api, runtime) -> None:
    hold = threading.Event()
    run, _ = orphan(api, runtime, hold)
    offline(api, "w2")
    workers = [make_worker(api, runtime, name=f"w{i}") for i in (1, 3, 4)]
    threads = [threading.Thread(target=w.adopt_orphans) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sum(run.id in w.admission for w in workers) == 1
    hold.set()


def test_the_gone_worker_back_under_its_name_leaves_the_adopted_container(api, runtime):
    hold = threading.Event()
    run, _ = orphan(api, runtime, hold)
    offline(api, "w2")
    adopter = make_worker(api, runtime, name="w1")
    adopter.adopt_orphans()
    back = make_worker(api, runtime, name="w2")  # start-up adoption of its own containers
    assert run.id in adopter.admission and len(back.admission) == 0
    hold.set()


def test_an_orphan_of_an_adopter_that_died_too_is_adopted_again(api, runtime) -> None:
    hold = threading.Event()
    run, container = orphan(api, runtime, hold)
    runtime.take_over(container.workload, api.pool.name, Owner("w3", 1))
    offline(api, "w2")
    online(api, "w3")
    worker = make_worker(api, runtime)
    worker.adopt_orphans()
    assert len(worker.admission) == 0  # w3 holds it and is alive
    offline(api, "w3")
    worker.adopt_orphans()
    assert run.id in worker.admission
    assert runtime.owners(api.pool.name)[container.workload.id] == Owner("w1", 2)
    hold.set()


def test_a_worker_absent_from_the_pool_is_gone_after_a_while(api, runtime,
                                                             monkeypatch) -> None:
    monkeypatch.setattr(ownership, "GONE_AFTER_BEATS", 0)
    hold = threading.Event()
    run, _ = orphan(api, runtime, hold)
    worker = make_worker(api, runtime)
    worker.adopt_orphans()  # first seen absent now
    assert len(worker.admission) == 0
    wait_until(lambda: (worker.adopt_orphans(), run.id in worker.admission)[1])
    hold.set()


def test_finished_orphans_are_removed_if_they_asked(api, runtime) -> None:
    done = api.add_run(state=StateType.COMPLETED)
    kept = api.add_run(state=StateType.COMPLETED)
    runtime.add("gone-a", of("w2", done.id, **AUTO_REMOVE), status="exited")
    runtime.add("keep-b", of("w2", kept.id), status="exited")
    offline(api, "w2")
    worker = make_worker(api, runtime)
    worker.adopt_orphans()
    assert [c.workload.name for c in runtime.containers.values()] == ["keep-b"]
    worker.reconcile()  # its takeover record goes with the container
    assert [wid for wid, _ in runtime.records.values()] == list(runtime.containers)


def test_a_failed_orphan_start_is_finished_by_adoption(api, runtime, monkeypatch) -> None:
    hold = threading.Event()
    run, _ = orphan(api, runtime, hold)
    offline(api, "w2")
    worker = make_worker(api, runtime)
    runtime.fail["inspect"] = RuntimeError("inspect exploded")
    worker._step("orphans", worker.adopt_orphans)
    assert worker.failures["orphans"] == 1 and len(worker.admission) == 0
    worker._step("adoption", worker._adopt_pending)  # the container is ours now
    assert run.id in worker.admission
    hold.set()


# --- the leftover warm container -----------------------------------------------------------------
def test_an_exited_warm_container_whose_run_ended_meanwhile_is_removed(api, runtime) -> None:
    container = runtime.add("etl-renamed", of("w1", **{LABEL_WARM: "k"}, **AUTO_REMOVE),
                            status="exited")
    kept = runtime.add("etl-kept", of("w1", **{LABEL_WARM: "k"}), status="exited")
    api.add_run(state=StateType.COMPLETED,
                infrastructure_pid=f"{FAKE_HOST}:{container.workload.id}")
    make_worker(api, runtime)
    assert list(runtime.containers) == [kept.workload.id]


def test_removal_takes_exited_warm_leftovers_too(api, runtime) -> None:
    worker = make_worker(api, runtime)
    runtime.add("etl-renamed", of("w1", **{LABEL_WARM: "k"}, **AUTO_REMOVE), status="exited")
    worker.reconcile()
    assert runtime.containers == {}


def test_a_forged_infrastructure_pid_never_gets_another_run_s_warm_container(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """A warm container has no run label: only its infrastructure_pid leads to its run, and
    anyone who may write to the API may write one. A tenant's runs naming another run's warm
    containers (one running, one ended and kept) get neither followed, judged, stopped nor
    removed for them, after a restart or at reconciliation; the real runs do (found by an
    audit: the attacker's run was adopted with the victim's output, and its cancellation
    stopped the victim's container)."""
    hold = threading.Event()
    running, ended = api.add_run("victim", state=StateType.RUNNING), api.add_run("done")
    victim = runtime.add(handed_name("victim-run-1234abcd", running.id),
                         of("w1", **{LABEL_WARM: "k", "io.dockerworker.control": "stdin"}),
                         Script(lines=[("stdout", "victim output")], hold=hold),
                         run_id=running.id)
    kept = runtime.add(handed_name("done-run-1234abcd", ended.id), of("w1", **{LABEL_WARM: "k"}),
                       Script(lines=[("stdout", "kept output")]), status="exited")
    api.set_state(ended.id, StateType.COMPLETED, force=True)
    forged = []
    for container in (victim, kept):
        if container is victim:
            api.runs[running.id].infrastructure_pid = _pid(container)
        forged.append(api.add_run("attacker", state=StateType.RUNNING,
                                  infrastructure_pid=_pid(container)))
    worker = make_worker(api, runtime)  # a restart: adoption at start-up (synchronous)
    worker.reconcile()
    assert running.id in worker.admission
    assert not any(run.id in worker.admission for run in forged)
    for run in forged:
        api.set_state(run.id, StateType.CANCELLING, force=True)
    worker.check_cancellations()
    worker.reconcile()
    assert not any(run.id in worker.admission for run in forged)
    hold.set()
    settle(worker)
    assert api.state_of(running.id).type == StateType.COMPLETED
    assert ("stop", victim.workload.name) not in runtime.calls
    assert not victim.removed and not kept.removed
    assert worker.shipper.flush(5)
    assert not any("output" in m for run in forged for m in api.messages(run.id))
    assert "victim output" in api.messages(running.id)


def test_a_gone_worker_s_waiting_warm_containers_are_removed_by_the_taker(api, runtime
                                                                         ) -> None:
    """Nobody will hand them a run: the worker that takes the gone one's containers over
    removes those still waiting (a live worker's are left to it)."""
    online(api, "w3")
    offline(api, "w2")
    gone = runtime.add(f"{WARM_NAME_PREFIX}gone", of("w2", **{LABEL_WARM: "k"}))
    live = runtime.add(f"{WARM_NAME_PREFIX}live", of("w3", **{LABEL_WARM: "k"}))
    worker = make_worker(api, runtime)
    worker.adopt_orphans()
    assert gone.removed and not live.removed


def test_a_worker_back_from_a_freeze_leaves_what_was_taken_over(api, runtime) -> None:
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold)
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: worker.active_runs() and worker.active_runs()[0].output is not None)
    container = runtime.of_run(run.id)
    runtime.take_over(container.workload, api.pool.name, Owner("w9", 1))
    assert worker._step("ownership", worker._leave_taken_over)
    settle(worker)
    assert api.state_of(run.id).type == StateType.RUNNING  # no verdict: w9 gives it
    assert container.workload.id in runtime.containers
    hold.set()


def test_a_blip_at_start_up_is_tried_again(api, runtime, monkeypatch) -> None:
    monkeypatch.setattr(worker_module, "START_UP_RETRY", 0.01)
    worker = make_worker(api, runtime, start=False, poll_interval=0.1)
    worker.wait_for_server = lambda: None  # type: ignore[method-assign]
    api.fail["read_work_pool"] = ServerUnreachable("503 just after the server answered")
    thread = threading.Thread(target=worker._loop, daemon=True)
    thread.start()
    run = api.add_run()
    wait_until(lambda: api.state_of(run.id).type == StateType.COMPLETED)
    assert worker.failures["start-up"] == 1
    worker.stop()
    thread.join(5)


def test_health_says_rounds_done_and_failed(api, runtime) -> None:
    import json
    import urllib.request

    from dockerworker.health import serve_health

    worker = make_worker(api, runtime)
    worker._step("poll", worker.poll)
    worker._step("removal", lambda: 1 / 0)
    server = serve_health(worker, 0, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/health",
                                    timeout=5) as answer:
            body = json.loads(answer.read())
    finally:
        server.shutdown()
    assert body["rounds"]["poll"] == 1 and body["failures"] == {"removal": 1}


def test_health_is_503_before_the_first_poll_and_once_polls_are_stale(api, runtime) -> None:
    """An orchestrator restarts a worker whose loop stopped polling: 503 with why, not 200."""
    import urllib.error
    import urllib.request

    from dockerworker.health import serve_health, staleness_limit

    worker = make_worker(api, runtime, poll_interval=5)
    server = serve_health(worker, 0, host="127.0.0.1")

    def health() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/health",
                                        timeout=5) as answer:
                return answer.status, json.loads(answer.read())["status"]
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())["status"]

    try:
        assert health() == (503, "starting")
        worker.poll()
        assert health() == (200, "ok")
        limit = staleness_limit(worker.slowest_poll_interval())
        assert limit == max(3 * worker.slowest_poll_interval(), 30.0)
        worker.last_poll -= limit - 1  # just within
        assert health() == (200, "ok")
        worker.last_poll -= 2  # past it
        assert health() == (503, "stale")
    finally:
        server.shutdown()


def test_an_adopted_run_masks_the_credentials_its_pull_steps_name(api, runtime) -> None:
    """After a restart the masker is rebuilt from the run's deployment, its blocks too: the
    container's output keeps the token hidden."""
    api.blocks[("secret", "git-token")] = {"value": "tok-adopted-123"}
    deployment = api.add_deployment(pull_steps=[{"prefect.deployments.steps.git_clone": {
        "repository": "https://h/r.git", "access_token": "{{ prefect.blocks.secret.git-token }}"}}])
    run = api.add_run(state=StateType.RUNNING, deployment=deployment)
    hold = threading.Event()
    runtime.add("etl-orphan", of("w2", run.id), Script(
        lines=[("stdout", "token tok-adopted-123 in the output")], hold=hold, exit_code=2,
        final_state=None), run_id=run.id)
    offline(api, "w2")
    worker = make_worker(api, runtime)
    worker.adopt_orphans()
    hold.set()
    settle(worker)
    worker.shipper.flush(1)
    shipped = "\n".join(api.messages(run.id)) + api.state_of(run.id).message
    assert "token *** in the output" in shipped and "tok-adopted-123" not in shipped


def test_an_adopted_run_masks_its_env_s_secrets_and_its_secret_files_too(
        api, runtime, tmp_path) -> None:
    """The masker rebuilt after a restart also hides the container's secret-named env values
    and the files of the worker's secrets directory the run was given (read again)."""
    from dockerworker.entry import SECRETS_ENV

    (tmp_path / "db_token").write_bytes(b"file-secret-789\n")
    run = api.add_run(state=StateType.RUNNING)
    hold = threading.Event()
    runtime.add("etl-orphan", of("w2", run.id), Script(
        lines=[("stdout", "env pw-in-env-456 file file-secret-789")], hold=hold, exit_code=2,
        final_state=None), run_id=run.id,
        env={"DB_PASSWORD": "pw-in-env-456", SECRETS_ENV: "db_token"})
    offline(api, "w2")
    worker = make_worker(api, runtime, secrets_dir=tmp_path)
    worker.adopt_orphans()
    hold.set()
    settle(worker)
    worker.shipper.flush(1)
    shipped = "\n".join(api.messages(run.id)) + api.state_of(run.id).message
    assert "env *** file ***" in shipped, shipped
    assert "pw-in-env-456" not in shipped and "file-secret-789" not in shipped


# --- verdicts the server did not take, and containers of earlier attempts -------------------


def _pid(container) -> str:
    return f"{FAKE_HOST}:{container.workload.id}"


def test_an_earlier_attempt_s_container_is_never_judged_for_the_attempt_under_way(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """Attempt 1 of a run ended in a container this worker kept (auto_remove off) and the run
    was rescheduled; another live worker claimed it and prepares attempt 2 (infrastructure_pid
    still names the old container), or runs it in a container of its own. Neither adoption at
    start-up nor reconciliation may judge the old container: that would end attempt 2."""
    online(api, "w2")
    preparing, running = api.add_run("preparing"), api.add_run("running")
    old = {}
    for run in (preparing, running):
        old[run.id] = runtime.add(f"old-{run.name}", of("w1", run.id), status="exited",
                                  run_id=run.id, script=Script(exit_code=137))
    api.set_state(preparing.id, StateType.PENDING, Claim("w2", FAKE_HOST).message)
    api.runs[preparing.id].infrastructure_pid = _pid(old[preparing.id])
    api.set_state(running.id, StateType.PENDING, Claim("w2", FAKE_HOST).message)
    new = runtime.add("new-running", of("w2", running.id), run_id=running.id,
                      script=Script(hold=threading.Event()))
    api.set_state(running.id, StateType.RUNNING)
    api.runs[running.id].infrastructure_pid = _pid(new)
    worker = make_worker(api, runtime)  # adoption at start-up
    worker.reconcile()
    settle(worker)
    assert api.state_of(preparing.id).type == StateType.PENDING
    assert api.state_of(running.id).type == StateType.RUNNING
    assert StateType.CRASHED not in api.history[preparing.id] + api.history[running.id]


def test_an_ended_container_is_judged_though_the_worker_is_at_its_limit(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """At --limit with a run in flight, a container of this worker ended while the server
    was away for its verdict: reconciliation still has it judged (adopted runs are never
    refused for the limit), taking it over once."""
    gate = threading.Event()
    runtime.script_for = lambda spec: Script(hold=gate)
    busy = api.add_run("busy")
    worker = make_worker(api, runtime, limit=1)
    worker.poll()
    wait_until(lambda: api.state_of(busy.id).type == StateType.RUNNING)
    waiting = api.add_run("waiting")
    api.set_state(waiting.id, StateType.PENDING, Claim("w1", FAKE_HOST).message)
    api.set_state(waiting.id, StateType.RUNNING)
    ended = runtime.add("ended", of("w1", waiting.id), status="exited", run_id=waiting.id,
                        script=Script(exit_code=3, final_state=None))
    api.runs[waiting.id].infrastructure_pid = _pid(ended)
    for _ in range(3):
        worker.reconcile()
        wait_until(lambda: waiting.id not in worker.admission)
    state = api.state_of(waiting.id)
    assert state.type == StateType.CRASHED and "exited with code 3" in state.message, state
    assert api.history[waiting.id].count(StateType.CRASHED) == 1
    assert api.state_of(busy.id).type == StateType.RUNNING
    gate.set()
    settle(worker)


def test_a_cancelling_run_whose_container_still_runs_is_left_to_stop(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """A CANCELLING run of this worker whose container still runs (being stopped): not
    CANCELLED by reconciliation before it has stopped."""
    worker = make_worker(api, runtime)
    run = api.add_run()
    api.set_state(run.id, StateType.PENDING, Claim("w1", FAKE_HOST).message)
    container = runtime.add("stopping", of("w1", run.id), run_id=run.id,
                            script=Script(hold=threading.Event()))
    api.runs[run.id].infrastructure_pid = _pid(container)
    api.set_state(run.id, StateType.CANCELLING, force=True)
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.CANCELLING
    runtime.finish(container, exit_code=143, state=None)
    worker.reconcile()
    assert api.state_of(run.id).type == StateType.CANCELLED


def test_a_cancellation_its_supervisor_reports_during_the_round_is_not_reported_twice(
        api: FakeAPI, runtime: FakeRuntime, monkeypatch) -> None:
    """Reconciliation read the run CANCELLING, and before it acts the run's own supervisor
    (its report retried and got through) sets CANCELLED: reconciliation reads it again and
    leaves it, one CANCELLED in the history, with the supervisor's message."""
    worker = make_worker(api, runtime)
    run = api.add_run()
    api.set_state(run.id, StateType.PENDING, Claim("w1", FAKE_HOST).message)
    container = runtime.add("stopped", of("w1", run.id), status="exited", run_id=run.id)
    api.runs[run.id].infrastructure_pid = _pid(container)
    api.set_state(run.id, StateType.CANCELLING, force=True)
    listed = api.filter_flow_runs

    def listed_then_reported(*args, **kwargs):
        found = listed(*args, **kwargs)  # the round's snapshot: CANCELLING
        api.set_state(run.id, StateType.CANCELLED, "its supervisor's", force=True)
        return found

    monkeypatch.setattr(api, "filter_flow_runs", listed_then_reported)
    worker.reconcile()
    assert api.history[run.id].count(StateType.CANCELLED) == 1
    assert api.state_of(run.id).message == "its supervisor's"


def test_a_run_naming_another_pool_s_container_never_gets_it_touched(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """infrastructure_pid is anyone's to write who may write to the API: a run of this pool
    naming an ended container of another pool (same worker name there), or one dockerworker
    did not make, must not have it judged, removed or taken for its stopped container."""
    worker = make_worker(api, runtime)
    other_pool = runtime.add("pool-b-run", {**of("w1", "00000000-0000-0000-0000-000000000001"),
                                            "io.prefect.work-pool-name": "pool-b",
                                            **AUTO_REMOVE},
                             status="exited", script=Script(exit_code=3))
    unmanaged = runtime.add("db", {"io.dockerworker.managed": "false", **of("w1")},
                            status="exited")
    running, cancelling = api.add_run("running"), api.add_run("cancelling")
    for run, target in ((running, other_pool), (cancelling, unmanaged)):
        api.set_state(run.id, StateType.PENDING, Claim("w1", FAKE_HOST).message)
        api.set_state(run.id, StateType.RUNNING)
        api.runs[run.id].infrastructure_pid = _pid(target)
    api.set_state(cancelling.id, StateType.CANCELLING, force=True)
    for _ in range(2):
        worker.reconcile()
        settle(worker)
    assert api.state_of(running.id).type == StateType.RUNNING
    assert api.state_of(cancelling.id).type == StateType.CANCELLING
    assert not other_pool.removed and not unmanaged.removed
    assert ("take_over", "pool-b-run") not in runtime.calls


def test_a_vanished_container_is_judged_only_on_the_run_as_it_is_now(
        api: FakeAPI, runtime: FakeRuntime, monkeypatch) -> None:
    """Reconciliation listed a run RUNNING whose container is gone; before it acts, the run
    completed, or was claimed again and names a new container: it reads the run again and
    leaves it (no 'container vanished', no reschedule: that would run it twice)."""
    offline(api, "w2")
    done, moved = api.add_run("done"), api.add_run("moved")
    for run in (done, moved):
        api.set_state(run.id, StateType.PENDING, Claim("w2", FAKE_HOST).message)
        api.set_state(run.id, StateType.RUNNING)
        api.runs[run.id].infrastructure_pid = f"{FAKE_HOST}:gone-{run.name}"
    worker = make_worker(api, runtime)
    listed = api.filter_flow_runs

    def listed_then_changed(*args, **kwargs):
        found = listed(*args, **kwargs)  # the round's snapshot
        api.set_state(done.id, StateType.COMPLETED)
        api.runs[moved.id].infrastructure_pid = f"{FAKE_HOST}:its-new-container"
        return found

    monkeypatch.setattr(api, "filter_flow_runs", listed_then_changed)
    worker.reconcile()
    assert api.state_of(done.id).type == StateType.COMPLETED
    assert api.state_of(moved.id).type == StateType.RUNNING
    assert StateType.SCHEDULED not in api.history[moved.id][1:]


def test_a_cancelling_run_is_not_finished_while_a_container_may_still_run_it(
        api: FakeAPI, runtime: FakeRuntime) -> None:
    """Reconciliation sets CANCELLED only when it sees the run's container stopped: not for
    a run whose infrastructure_pid names another engine's container (that engine's workers
    see it), nor for a run without one whose labelled container still runs here."""
    offline(api, "w2")
    elsewhere, unrecorded = api.add_run("elsewhere"), api.add_run("unrecorded")
    for run in (elsewhere, unrecorded):
        api.set_state(run.id, StateType.PENDING, Claim("w2", FAKE_HOST).message)
        api.set_state(run.id, StateType.RUNNING)
    api.runs[elsewhere.id].infrastructure_pid = "another-engine:0123456789ab"
    runtime.add("still-running", of("w2", unrecorded.id), run_id=unrecorded.id,
                script=Script(hold=threading.Event()))
    for run in (elsewhere, unrecorded):
        api.set_state(run.id, StateType.CANCELLING, force=True)
    worker = make_worker(api, runtime)
    worker.reconcile()
    assert api.state_of(elsewhere.id).type == StateType.CANCELLING
    assert api.state_of(unrecorded.id).type == StateType.CANCELLING


def test_a_restarted_worker_never_takes_back_what_another_took_over_meanwhile(
        api: FakeAPI, runtime: FakeRuntime, monkeypatch) -> None:
    """w1 restarts after a freeze long enough for w2 to find it gone: w2 takes its container
    over between w1's listing and w1's take-back. The take-back is itself a takeover (the
    next generation, atomic): w1 loses it and leaves the run to w2, which follows it."""
    online(api, "w2")
    run = api.add_run(state=StateType.RUNNING)
    container = runtime.add("etl", of("w1", run.id), run_id=run.id,
                            script=Script(hold=threading.Event()))
    take_over = runtime.take_over

    def w2_first(workload, pool, owner):
        if owner.name == "w1":
            take_over(workload, pool, Owner("w2", owner.generation))
        return take_over(workload, pool, owner)

    monkeypatch.setattr(runtime, "take_over", w2_first)
    worker = make_worker(api, runtime)  # adoption at start-up
    assert run.id not in worker.admission
    assert runtime.owners(api.pool.name)[container.workload.id].name == "w2"


def test_a_worker_is_gone_after_three_missed_heartbeats_not_before(
        api: FakeAPI, monkeypatch) -> None:
    """The documented numbers: OFFLINE from the server at once; from a server without a
    status, no heartbeat for 3 of the worker's own intervals; absent from the pool's workers,
    3 of our intervals from when we first looked."""
    now = [1000.0]
    monkeypatch.setattr(ownership, "time", SimpleNamespace(monotonic=lambda: now[0],
                                                          time=lambda: now[0]))

    def beat(name: str, seconds_ago: float, interval: float = 10) -> dict:
        stamp = datetime.fromtimestamp(now[0] - seconds_ago, UTC).isoformat()
        return {"name": name, "last_heartbeat_time": stamp,
                "heartbeat_interval_seconds": interval}

    liveness = ownership.Liveness(api, api.pool.name, interval=30)
    api.workers.clear()
    api.workers.update({"off": {"name": "off", "status": "OFFLINE"},
                        "late": beat("late", 31), "later": beat("later", 29),
                        "slow": beat("slow", 89, interval=30)})
    assert liveness.gone({"off", "late", "later", "slow", "absent"}) == {"off", "late"}
    now[0] += 3 * 30  # absent for exactly three of our intervals: not yet
    api.workers.clear()
    assert liveness.gone({"absent"}) == set()
    now[0] += 1
    assert liveness.gone({"absent"}) == {"absent"}
