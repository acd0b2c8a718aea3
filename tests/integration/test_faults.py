"""Issue 14, "never lose a run": the worker under a faulty network and under a Docker engine
restart, end to end (real Prefect server, real Docker, the worker as operators run it).

- A fault-injecting proxy (testrig.faultproxy) sits between the worker and the server; the
  flows in their containers talk to the server directly (job env PREFECT_API_URL).
- The engine restart uses a second dockerd of the test's own (testrig.engine): the worker's
  DOCKER_HOST points at it, the server stays on loopback and the flow containers on that
  engine reach it through host networking.

Each test waits, with a deadline, for what it asserts, and reports every broken promise at
once (states, containers, the proxy's counts) rather than only the first.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import docker
import pytest
from testrig.engine import Engine
from testrig.faultproxy import (
    BLACKOUT,
    DELAY,
    DROP_AFTER,
    DROP_BEFORE,
    REFUSE_503,
    WS_CUT,
    FaultProxy,
    Plan,
    faults_by_endpoint,
)
from testrig.gate import GATED_CRASH, open_gate
from testrig.gitserve import GIT_CLONE, GIT_IMAGE, GitHttpServer
from testrig.prefect_rig import FINAL_STATE_TYPES, POOL_LABEL, PrefectRig, PrefectServer
from testrig.workers import WorkerProcess

from dockerworker.report import RETRY_MESSAGE

RUN_LABEL = "io.prefect.flow-run-id"
SET_STATE = r"^POST /api/flow_runs/\{id\}/set_state$"
RECORD_PID = r"^PATCH /api/flow_runs/\{id\}$"
POLL_OR_LOGS = r"^POST /api/(work_pools/[^/]+/get_scheduled_flow_runs|logs/)$"
RUNS = 20  # each imports Prefect (2-4 s of CPU here): the faults, not the CPU, are tested
SPREAD = 60.0  # the runs are created over a minute
FINISH_WITHIN = 90.0  # ... and all end within 90 s of the last one's creation
BLACKOUT_SECONDS = 15.0
ENGINE_DOWN = 15.0  # seconds the test's engine stays down in the restart test
FAULT_PLAN = Plan(
    seed=14,
    rates={REFUSE_503: 0.06, DROP_BEFORE: 0.04, DROP_AFTER: 0.04, DELAY: 0.04},
    max_faults={REFUSE_503: 30, DROP_BEFORE: 15, DROP_AFTER: 15, DELAY: 15},
    duration=SPREAD,
    delay_seconds=3.0,
    blackouts=[(10.0, BLACKOUT_SECONDS), (36.0, BLACKOUT_SECONDS)],
    ws_cuts=[(28.0, 5.0)],
)


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.25)


def _read_runs(rig: PrefectRig, ids: list[str]) -> dict[str, dict[str, Any]]:
    runs = rig._call("POST", "/flow_runs/filter",
                     {"flow_runs": {"id": {"any_": ids}}, "limit": 200})
    return {run["id"]: run for run in runs}


def _state(run: dict[str, Any]) -> str:
    state = run.get("state") or {}
    return f"{state.get('type')}/{state.get('name')}: {(state.get('message') or '')[:160]!r}"


def _history(rig: PrefectRig, run_id: str) -> list[tuple[str, str]]:
    """(type, name) of each state of a run, oldest first."""
    return [(s["type"], s["name"]) for s in _states(rig, run_id)]


def _messages(rig: PrefectRig, run_id: str) -> list[tuple[str, str]]:
    """(type, message) of each state of a run, oldest first."""
    return [(s["type"], s["message"] or "") for s in _states(rig, run_id)]


def _states(rig: PrefectRig, run_id: str) -> list[dict[str, Any]]:
    states = rig._call("GET", f"/flow_run_states/?flow_run_id={run_id}")
    return sorted(states, key=lambda s: s["timestamp"])


class ContainerCreations:
    """Counts the containers created per flow run from Docker's event stream, followed live
    (the engine replays only its last 256 events, too few on a busy machine), so that a
    duplicate container that was removed again still counts."""

    def __init__(self, client: docker.DockerClient, pool: str) -> None:
        self.created: Counter[str] = Counter()
        self._events = client.events(decode=True, since=datetime.now(UTC), filters={
            "type": "container", "event": "create", "label": f"{POOL_LABEL}={pool}"})
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with contextlib.suppress(Exception):  # ends when the stream is closed
            for event in self._events:
                self.created[event["Actor"]["Attributes"].get(RUN_LABEL, "?")] += 1

    def close(self) -> Counter[str]:
        """Stop following; the counts so far."""
        self._events.close()
        self._thread.join(10)
        return self.created


def _running_containers(client: docker.DockerClient, pool: str) -> list[str]:
    return [",".join(c.attrs.get("Names") or [c.id]) for c in client.containers.list(
        sparse=True, filters={"label": f"{POOL_LABEL}={pool}", "status": "running"})]


def _settled(client: docker.DockerClient, pool: str, timeout: float = 30.0) -> list[str]:
    """The pool's running containers once none runs or `timeout` passed (a run is final on the
    server a moment before its container's process has exited)."""
    deadline = time.monotonic() + timeout
    while (running := _running_containers(client, pool)) and time.monotonic() < deadline:
        time.sleep(1.0)
    return running


def _sigterm_exit_code(worker: WorkerProcess, timeout: float = 60.0) -> int | None:
    worker.process.send_signal(signal.SIGTERM)
    try:
        return worker.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_twenty_runs_through_a_faulty_network_all_complete(
    fault_proxy: FaultProxy, rig: PrefectRig, prefect_server: PrefectServer, flow_image: str,
    docker_client: docker.DockerClient, unique_pool: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """20 runs created over a minute while the worker's link to the server answers 503s,
    drops requests before and after the server applied them (claims first of all), delays
    answers, cuts the event stream and blacks out twice for 15 s: every run ends COMPLETED
    within 90 s of the last one's creation, with exactly one container each and claimed once
    (a claim whose answer was lost is still ours: issue 14 item 7); the worker is alive at
    the end and exits 0 on SIGTERM; no container is left running."""
    creations = ContainerCreations(docker_client, unique_pool)
    worker = start_worker(unique_pool, api_url=fault_proxy.url)
    hello = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "env": {"PREFECT_API_URL": prefect_server.url}})
    _until(lambda: fault_proxy.websocket_count() >= 1, 60, "the worker's event stream opens")

    fault_proxy.arm(FAULT_PLAN)
    fault_proxy.inject(DROP_AFTER, SET_STATE, times=3)  # the first claims: applied, answer lost
    # 503s for sure, however few requests the worker makes (the plan's seeded draws reach
    # their first 503 only after ~50 requests in its minute)
    fault_proxy.inject(REFUSE_503, POLL_OR_LOGS, times=4)
    fault_proxy.cut_websockets(refuse_for=8.0)
    t0 = time.monotonic()
    ids: list[str] = []
    for i in range(RUNS):
        time.sleep(max(0.0, t0 + i * SPREAD / RUNS - time.monotonic()))
        if i == RUNS - 4:  # and late claims too, after the second blackout
            fault_proxy.inject(DROP_AFTER, SET_STATE, times=2)
        ids.append(rig.create_flow_run(hello))
    last_created = time.monotonic()

    finished: dict[str, float] = {}

    def all_final() -> bool:
        for run_id, run in _read_runs(rig, ids).items():
            if (run.get("state") or {}).get("type") in FINAL_STATE_TYPES:
                finished.setdefault(run_id, time.monotonic() - last_created)
        return len(finished) == RUNS

    deadline = last_created + FINISH_WITHIN
    while not all_final() and time.monotonic() < deadline:
        time.sleep(1.0)
    runs = _read_runs(rig, ids)

    problems: list[str] = []
    not_completed = {i: r for i, r in runs.items() if r["state"]["type"] != "COMPLETED"}
    for run_id, run in not_completed.items():
        problems.append(f"run {run_id} not COMPLETED {FINISH_WITHIN:g} s after the last "
                        f"creation: {_state(run)}; history {_history(rig, run_id)}")
    for run_id in ids:  # a lost claim answer costs nothing when claims are idempotent
        history = _history(rig, run_id)
        if sum(kind == "PENDING" for kind, _ in history) != 1:
            problems.append(f"run {run_id} was claimed more than once (handed back between): "
                            f"history {history}")
    slow = sorted(finished.items(), key=lambda item: -item[1])[:5]
    print(f"slowest runs (s after the last creation): {slow}")

    if left := _settled(docker_client, unique_pool):
        problems.append(f"containers still running: {left}")
    created = creations.close()  # every run ended long after its container's create event
    for run_id in ids:
        if created.get(run_id, 0) != 1:
            problems.append(f"run {run_id} had {created.get(run_id, 0)} containers, not 1")

    if not worker.alive():
        problems.append(f"the worker died with {worker.process.returncode}")
    elif (code := _sigterm_exit_code(worker)) != 0:
        problems.append(f"the worker's exit code on SIGTERM: {code}")

    summary = fault_proxy.summary()
    print(f"faults: {summary}\nby endpoint: {faults_by_endpoint(fault_proxy)}")
    for kind in FAULT_PLAN.rates:
        if not summary.get(kind):
            problems.append(f"the proxy never injected {kind}")
    if summary.get(BLACKOUT) != 2:
        problems.append(f"blackouts: {summary.get(BLACKOUT)}, not 2")
    if not fault_proxy.count(DROP_AFTER, SET_STATE):
        problems.append("no claim's answer was lost after the server applied it")
    if not summary.get(WS_CUT):
        problems.append("the event stream was never cut")
    assert not problems, "\n".join(problems)


BLOCK_READ = r"^GET /api/block_types/slug/secret/block_documents/name/"
SILENT_AFTER_CLAIM = {  # what the worker reads between the claim and the container
    "deployment": r"^GET /api/deployments/\{id\}$",
    "block in the job's env": BLOCK_READ,
    "block in a pull step": BLOCK_READ,  # read to mask its value in the run's output
}
API_PATIENCE = 3.0  # --api-patience of the worker: seconds each call is retried
GIT_FLOW = """
from prefect import flow


@flow
def hello() -> str:
    print("code from git")
    return "git"
"""


def _silent_case_deployment(silent: str, rig: PrefectRig, stack: contextlib.ExitStack,
                            pool: str, flow_image: str, api_url: str, token: str) -> str:
    """The deployment of one case of the test below; `token` is the Secret block's value."""
    block = f"silent-{secrets.token_hex(3)}"
    rig.create_secret_block(block, token)
    reference = f"{{{{ prefect.blocks.secret.{block} }}}}"
    env = {"PREFECT_API_URL": api_url}
    if silent != "block in a pull step":
        return rig.create_deployment(pool, "flows.py:hello", {
            "image": flow_image, "env": {**env, "GREETING": reference}})
    # a public repository over plain HTTP, where Prefect sends no token: what is tested is
    # the worker's read of the block that names it (to mask it), not git's authentication
    git = stack.enter_context(GitHttpServer())
    git.add_repo("flows.git", {"flow.py": GIT_FLOW})
    return rig.create_deployment(pool, "flow.py:hello", {"image": GIT_IMAGE, "env": env},
                                 path=None, pull_steps=[{GIT_CLONE: {
                                     "repository": git.url("flows.git"),
                                     "access_token": reference}}])


@pytest.mark.parametrize("silent", sorted(SILENT_AFTER_CLAIM))
def test_a_server_that_stops_answering_after_the_claim_gets_the_run_rescheduled(
    silent: str, fault_proxy: FaultProxy, rig: PrefectRig, prefect_server: PrefectServer,
    flow_image: str, docker_client: docker.DockerClient, unique_pool: str,
    start_worker: Callable[..., WorkerProcess], policy_file: Callable[..., str],
) -> None:
    """The server applies the claim, then answers 503 to every read the run still needs (its
    deployment, the Secret block its job's env names, or the one its pull step's token comes
    from, which the worker reads to mask it) for longer than the worker's `--api-patience`:
    the run goes back to SCHEDULED as an infrastructure retry whose message says the server
    did not answer, no container is made for it (none runs with a secret the worker could
    not mask), the worker carries on, and once the server answers again the run is claimed
    anew and COMPLETED in one container, the token nowhere in its logs.
    (The policy allows two retries so that the test does not depend on how fast it lifts the
    fault: a second attempt that still meets it is rescheduled too.)"""
    token = f"tok-{secrets.token_hex(10)}"
    creations = ContainerCreations(docker_client, unique_pool)
    worker = start_worker(unique_pool, "--api-patience", str(API_PATIENCE),
                          "--policy", policy_file(infra_retries=2), api_url=fault_proxy.url)
    with contextlib.ExitStack() as stack:  # the git server of the pull step's case
        deployment = _silent_case_deployment(silent, rig, stack, unique_pool, flow_image,
                                             prefect_server.url, token)
        _rescheduled_then_completed(silent, rig, fault_proxy, deployment, creations, worker,
                                    token)


def _rescheduled_then_completed(silent: str, rig: PrefectRig, fault_proxy: FaultProxy,
                                deployment: str, creations: ContainerCreations,
                                worker: WorkerProcess, token: str) -> None:
    fault_proxy.inject(REFUSE_503, SILENT_AFTER_CLAIM[silent], times=1000)
    run_id = rig.create_flow_run(deployment)

    def rescheduled() -> bool:
        return any(state["type"] == "SCHEDULED" and RETRY_MESSAGE in (state["message"] or "")
                   for state in rig.read_state_history(run_id))

    _until(rescheduled, 60, "the run is rescheduled after the server went silent")
    fault_proxy.clear()
    run = rig.wait_for_final(run_id, timeout=90)
    history = rig.read_state_history(run_id)
    retries = [s["message"] for s in history if s["type"] == "SCHEDULED"
               and RETRY_MESSAGE in (s["message"] or "")]

    problems: list[str] = []
    if run["state"]["type"] != "COMPLETED":
        problems.append(f"the run ended {_state(run)}; history {_history(rig, run_id)}")
    if not retries or not all("the Prefect server did not answer while the run was prepared"
                              in message for message in retries):
        problems.append(f"the reschedules do not say why: {retries}")
    if [s["type"] for s in history].count("PENDING") != len(retries) + 1:
        problems.append(f"claims and reschedules do not match: {_history(rig, run_id)}")
    refused = fault_proxy.count(REFUSE_503, SILENT_AFTER_CLAIM[silent])
    if refused < 2:
        problems.append(f"the silent read was refused {refused} times: no retries were made")
    rig.wait_for_log(run_id, "the Prefect server did not answer")
    if silent == "block in a pull step":  # the pull step ran once the block was read
        rig.wait_for_log(run_id, "code from git")
    if (made := creations.close().get(run_id, 0)) != 1:
        problems.append(f"{made} containers were made for the run, not 1")
    if not worker.alive():
        problems.append(f"the worker died with {worker.process.returncode}")
    logs = "\n".join(log["message"] for log in rig.read_logs(run_id))
    if token in logs or token in json.dumps(history):
        problems.append("the secret's value is in the run's logs or states")
    assert not problems, "\n".join(problems)


OWED_VERDICT_WITHIN = 20.0  # s after the server answers again: reconciliation every 5 s


def _owed_then_given(worker: WorkerProcess, unjudged: str) -> None:
    """The worker said the run ended unjudged, and then tried reconciliation at once (it
    failed: the server is still away); from then on it tries every few seconds, not once a
    minute, so the verdict comes within OWED_VERDICT_WITHIN of the server's return."""
    worker.wait_for_output(unjudged, 60)
    _until(lambda: "reconciliation failed" in worker.output().split(unjudged, 1)[-1], 20,
           "a reconciliation round tried while the server is away, right after")


def test_a_verdict_the_server_did_not_take_is_given_once_it_answers(
    fault_proxy: FaultProxy, rig: PrefectRig, docker_client: docker.DockerClient,
    flow_image: str, unique_pool: str, start_worker: Callable[..., WorkerProcess],
) -> None:
    """A container ends without a final state (exit code 3, nothing reported by Prefect)
    while the worker's link to the server answers 503 to everything for longer than its
    `--api-patience`: the run is left as it was, its auto_remove container is kept (it holds
    the verdict), the worker carries on, and within seconds of the server answering,
    reconciliation reports the crash with the exit code and the last output, once; then the
    container goes."""
    creations = ContainerCreations(docker_client, unique_pool)
    worker = start_worker(unique_pool, "--api-patience", str(API_PATIENCE),
                          api_url=fault_proxy.url)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "command": GATED_CRASH, "auto_remove": True})
    run_id = rig.create_flow_run(deployment)
    _until(lambda: bool(_running_containers(docker_client, unique_pool)), 60,
           "the run's container runs")
    fault_proxy.inject(REFUSE_503, r".*", times=100_000)  # the server away for the worker
    (running,) = docker_client.containers.list(filters={"label": f"{RUN_LABEL}={run_id}"})
    open_gate(running)  # it ends only now, with the server away
    _owed_then_given(worker, "is kept and the run judged again once the server answers")
    kept = docker_client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"})
    left_as_it_was = rig.read_flow_run(run_id)["state"]["type"]
    fault_proxy.clear()
    run = rig.wait_for_final(run_id, timeout=OWED_VERDICT_WITHIN)

    problems: list[str] = []
    if [c.status for c in kept] != ["exited"]:
        problems.append(f"the ended container was not kept: {[c.status for c in kept]}")
    if left_as_it_was != "PENDING":  # a custom command: Prefect's engine never ran
        problems.append(f"while the server was away the run went {left_as_it_was}")
    message = run["state"]["message"] or ""
    if run["state"]["type"] != "CRASHED" or "exited with code 3" not in message \
            or "giving up" not in message:
        problems.append(f"the run ended {_state(run)}")
    if (crashes := [k for k, _ in _history(rig, run_id)].count("CRASHED")) != 1:
        problems.append(f"{crashes} CRASHED states: {_history(rig, run_id)}")
    _until(lambda: not docker_client.containers.list(
        all=True, filters={"label": f"{RUN_LABEL}={run_id}"}), 30,
        "the container is removed once the verdict is reported")
    if (made := creations.close().get(run_id, 0)) != 1:
        problems.append(f"{made} containers were made for the run, not 1")
    if not worker.alive():
        problems.append(f"the worker died with {worker.process.returncode}")
    if not fault_proxy.count(REFUSE_503, SET_STATE + "|" + r"^GET /api/flow_runs/\{id\}$"):
        problems.append("the worker's verdict never met the refusing server")
    assert not problems, "\n".join(problems)


def test_a_cancellation_the_server_did_not_take_is_finished_once_it_answers(
    fault_proxy: FaultProxy, rig: PrefectRig, docker_client: docker.DockerClient,
    flow_image: str, unique_pool: str, start_worker: Callable[..., WorkerProcess],
) -> None:
    """A run is cancelled; the worker stops its container (SIGTERM: a command, so Prefect's
    engine reports nothing) but its CANCELLED state meets a server that answers 503 for
    longer than `--api-patience`: the run stays CANCELLING (nothing else is said for it),
    and within seconds of the server answering, reconciliation sets it CANCELLED, once."""
    worker = start_worker(unique_pool, "--api-patience", str(API_PATIENCE),
                          api_url=fault_proxy.url)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "command": "sleep 120", "auto_remove": True})
    run_id = rig.create_flow_run(deployment)
    _until(lambda: bool(_running_containers(docker_client, unique_pool)), 60,
           "the run's container runs")
    fault_proxy.inject(REFUSE_503, SET_STATE, times=100_000)
    rig.set_state(run_id, "CANCELLING", force=True)
    _owed_then_given(worker, "could not report how the run ended")
    while_away = rig.read_flow_run(run_id)["state"]["type"]
    stopped = _settled(docker_client, unique_pool, timeout=15)
    fault_proxy.clear()
    run = rig.wait_for_final(run_id, timeout=OWED_VERDICT_WITHIN)

    problems: list[str] = []
    if while_away != "CANCELLING":
        problems.append(f"while the server was away the run went {while_away}")
    if stopped:
        problems.append(f"the container was not stopped: {stopped}")
    if run["state"]["type"] != "CANCELLED":
        problems.append(f"the run ended {_state(run)}; history {_history(rig, run_id)}")
    if (n := [k for k, _ in _history(rig, run_id)].count("CANCELLED")) != 1:
        problems.append(f"{n} CANCELLED states: {_history(rig, run_id)}")
    if not fault_proxy.count(REFUSE_503, SET_STATE):
        problems.append("the worker's CANCELLED never met the refusing server")
    if not worker.alive():
        problems.append(f"the worker died with {worker.process.returncode}")
    assert not problems, "\n".join(problems)


def test_a_docker_engine_restart_gives_runs_in_flight_a_verdict_and_new_runs_start(
    own_engine: Engine, docker_client: docker.DockerClient, rig: PrefectRig, flow_image: str,
    unique_pool: str, start_worker: Callable[..., WorkerProcess],
) -> None:
    """The worker's engine (an engine of the test's own) restarts under two running flows and
    stays down for a while, during which a run is created: the runs in flight are each
    rescheduled once as an infrastructure failure (dockerd stopped them with SIGTERM, which
    Prefect's engine reports as CRASHED itself) and then complete, the worker carries on, and
    both the run created while the engine was down and one created once it is back start on
    it and complete."""
    own_engine.load_images(docker_client, flow_image)
    engine = own_engine.client
    worker = start_worker(unique_pool, env={"DOCKER_HOST": own_engine.host})
    sleepy = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    hello = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})

    in_flight = [rig.create_flow_run(sleepy, parameters={"seconds": 40}) for _ in range(2)]
    for run_id in in_flight:
        rig.wait_for_state(run_id, "RUNNING", timeout=180)
    _until(lambda: len(_running_containers(engine, unique_pool)) == 2, 30,
           "both flow containers run on the test's engine")
    assert not docker_client.containers.list(
        all=True, sparse=True, filters={"label": f"{POOL_LABEL}={unique_pool}"})

    own_engine.stop_daemon()  # SIGTERM: dockerd stops the flow containers, then itself
    while_down = rig.create_flow_run(hello)
    down_until = time.monotonic() + ENGINE_DOWN
    while time.monotonic() < down_until:
        assert worker.alive(), f"the worker died while the engine was down:\n{worker.output()}"
        time.sleep(1.0)
    own_engine.start_daemon()
    engine = own_engine.client
    restarted = time.monotonic()

    def verdict(run_id: str) -> bool:
        """Final, or handed back for another try after it ran."""
        history = _history(rig, run_id)
        ran = [i for i, (kind, _) in enumerate(history) if kind == "RUNNING"]
        return history[-1][0] in FINAL_STATE_TYPES or (
            bool(ran) and any(kind == "SCHEDULED" for kind, _ in history[ran[0]:]))

    problems: list[str] = []
    deadline = restarted + 150
    while not all(verdict(r) for r in in_flight) and time.monotonic() < deadline:
        time.sleep(1.0)
    for run_id in in_flight:
        if not verdict(run_id):
            problems.append(f"run in flight {run_id} has no verdict 150 s after the restart: "
                            f"{_state(rig.read_flow_run(run_id))}; "
                            f"history {_history(rig, run_id)}")
    if not worker.alive():
        problems.append(f"the worker died with {worker.process.returncode}")
    else:
        fresh = rig.create_flow_run(hello)
        try:
            run = rig.wait_for_final(fresh, timeout=150)
            if run["state"]["type"] != "COMPLETED":
                problems.append(f"the run after the restart ended {_state(run)}")
            elif not engine.containers.list(all=True, filters={"label": f"{RUN_LABEL}={fresh}"}):
                problems.append("the run after the restart has no container on the engine")
        except AssertionError as exc:
            problems.append(f"the run after the restart: {exc}; history {_history(rig, fresh)}")
    try:
        run = rig.wait_for_final(while_down, timeout=150)
        if run["state"]["type"] != "COMPLETED":
            problems.append(f"the run created while the engine was down ended {_state(run)}; "
                            f"history {_history(rig, while_down)}")
    except AssertionError as exc:
        problems.append(f"the run created while the engine was down: {exc}; "
                        f"history {_history(rig, while_down)}")
    for run_id in in_flight:  # the restart is the infrastructure's doing: retried, completed
        retries = [message for kind, message in _messages(rig, run_id)
                   if kind == "SCHEDULED" and RETRY_MESSAGE in message]
        if len(retries) != 1:
            problems.append(f"run in flight {run_id} was not rescheduled once as an "
                            f"infrastructure failure: {_history(rig, run_id)}")
        try:
            run = rig.wait_for_final(run_id, timeout=150)
            if run["state"]["type"] != "COMPLETED":
                problems.append(f"retried run {run_id} ended {_state(run)}")
        except AssertionError as exc:
            problems.append(f"retried run {run_id}: {exc}")
    for run_id in in_flight:
        print(f"in flight {run_id}: {_state(rig.read_flow_run(run_id))}; "
              f"history {_history(rig, run_id)}")
    if worker.alive():
        if (code := _sigterm_exit_code(worker)) != 0:
            problems.append(f"the worker's exit code on SIGTERM: {code}")
    elif not any(p.startswith("the worker died") for p in problems):
        problems.append(f"the worker died with {worker.process.returncode}")
    if left := _settled(engine, unique_pool):
        problems.append(f"containers still running on the test's engine: {left}")
    assert not problems, "\n".join(problems)


def test_an_infrastructure_pid_the_server_did_not_take_is_recorded_once_it_answers(
    fault_proxy: FaultProxy, rig: PrefectRig, docker_client: docker.DockerClient,
    flow_image: str, unique_pool: str, start_worker: Callable[..., WorkerProcess],
) -> None:
    """A warm container takes a run while the server answers 503 to the worker's
    infrastructure_pid write for longer than `--api-patience` (the flow talks to the server
    directly and goes on): within seconds of the server answering, the worker records the
    container as the run's infrastructure (a restarted worker finds a warm container's run
    only by it), and the run completes in that one container."""
    worker = start_worker(unique_pool, "--warm", "1", "--api-patience", str(API_PATIENCE),
                          api_url=fault_proxy.url)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    first = rig.wait_for_final(rig.create_flow_run(deployment, parameters={"seconds": 0}), 90)
    worker.wait_for_output("is ready (Prefect imported)", 90)
    fault_proxy.inject(REFUSE_503, RECORD_PID, times=100_000)
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 30})
    worker.wait_for_output("could not record infrastructure_pid", 60)
    while_away = rig.read_flow_run(run_id)["infrastructure_pid"]
    fault_proxy.clear()
    _until(lambda: bool(rig.read_flow_run(run_id)["infrastructure_pid"]), OWED_VERDICT_WITHIN,
           "infrastructure_pid recorded once the server answers")
    recorded = rig.read_flow_run(run_id)["infrastructure_pid"]
    run = rig.wait_for_final(run_id, timeout=90)

    problems: list[str] = []
    if first["state"]["type"] != "COMPLETED":
        problems.append(f"the first run ended {_state(first)}")
    if while_away:
        problems.append(f"infrastructure_pid was recorded while refused: {while_away}")
    served = docker_client.containers.list(all=True, filters={"id": recorded.split(":")[-1]})
    if not any("io.dockerworker.warm" in c.labels for c in served):
        problems.append(f"infrastructure_pid {recorded} names no warm container of the run")
    if run["state"]["type"] != "COMPLETED":
        problems.append(f"the run ended {_state(run)}; history {_history(rig, run_id)}")
    if not any("took over the run" in log["message"] for log in rig.read_logs(run_id)):
        problems.append("the run did not start in the warm container")
    if not fault_proxy.count(REFUSE_503, RECORD_PID):
        problems.append("the worker's infrastructure_pid never met the refusing server")
    if not worker.alive():
        problems.append(f"the worker died with {worker.process.returncode}")
    assert not problems, "\n".join(problems)
