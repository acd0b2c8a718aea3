"""Retries for infrastructure, not for flows; suspended runs left as the engine left them
(issue 14, items 8 and 9). Real server, real containers."""

from __future__ import annotations

import time

import docker.errors
from testrig.prefect_rig import PrefectRig

RUN_LABEL = "io.prefect.flow-run-id"
RETRIED = "Rescheduled by dockerworker after an infrastructure failure (retry 1 of 1)"


def run_containers(docker_client, run_id: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"})


def wait_for_container(docker_client, run_id: str, exclude: set[str] = frozenset(),
                       timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in run_containers(docker_client, run_id) if c.id not in exclude]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no container for run {run_id}"
        time.sleep(0.3)


def states(rig: PrefectRig, run_id: str) -> list[dict]:
    return rig.read_state_history(run_id)


def test_a_vanished_container_is_retried_once_and_then_completes(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    worker = start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:ticker", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 8})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    first = wait_for_container(docker_client, run_id)
    first.remove(force=True)
    run = rig.wait_for_final(run_id, timeout=120)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    history = states(rig, run_id)
    retries = [s for s in history if (s.get("message") or "").startswith(RETRIED)]
    assert len(retries) == 1 and "container vanished" in retries[0]["message"]
    assert [s["type"] for s in history].count("RUNNING") == 2
    second = wait_for_container(docker_client, run_id)
    assert second.id != first.id
    assert worker.alive()


def test_a_second_vanishing_is_crashed_with_no_retries_left(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 120})
    seen: set[str] = set()
    for _ in range(2):
        rig.wait_for_state(run_id, "RUNNING", timeout=90)
        container = wait_for_container(docker_client, run_id, exclude=seen)
        seen.add(container.id)
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        if len(seen) == 1:  # wait for the retry before the second blow
            deadline = time.monotonic() + 60
            while not any((s.get("message") or "").startswith(RETRIED)
                          for s in states(rig, run_id)):
                assert time.monotonic() < deadline
                time.sleep(0.3)
    run = rig.wait_for_final(run_id, timeout=60)
    assert run["state"]["type"] == "CRASHED"
    assert "no infrastructure retries left (1 of 1 used)" in run["state"]["message"]


def test_a_flow_error_and_a_failing_command_are_not_retried(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    failing = rig.create_deployment(unique_pool, "flows.py:fails", {"image": flow_image})
    exiting = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "command": "sh -c 'exit 3'"})
    runs = {"failed": rig.create_flow_run(failing), "crashed": rig.create_flow_run(exiting)}
    for expected, run_id in runs.items():
        run = rig.wait_for_final(run_id, timeout=120)
        assert run["state"]["type"] == expected.upper(), run["state"]
        kinds = [s["type"] for s in states(rig, run_id)]
        assert kinds.count("PENDING") == 1 and "SCHEDULED" not in kinds[1:], kinds


def test_a_suspended_run_is_left_suspended_and_completes_after_resume(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    worker = start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:suspends", {"image": flow_image})
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_state(run_id, "PAUSED", timeout=120)
    first = wait_for_container(docker_client, run_id)
    deadline = time.monotonic() + 60
    while first.reload() or first.status != "exited":
        assert time.monotonic() < deadline, "the suspended run's container never exited"
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while "left as it is" not in worker.output():
        assert time.monotonic() < deadline, worker.output()[-3000:]
        time.sleep(0.3)
    run = rig.read_flow_run(run_id)
    assert run["state"]["type"] == "PAUSED" and run["state"]["name"] == "Suspended", run["state"]

    rig.resume_flow_run(run_id)
    run = rig.wait_for_final(run_id, timeout=180)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert "CRASHED" not in [s["type"] for s in states(rig, run_id)]
    rig.wait_for_log(run_id, "before the suspension")
    rig.wait_for_log(run_id, "after the resumption")
