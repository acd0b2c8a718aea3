"""Cancellation, restarts, adoption, reconciliation, replicas, health (issue 5)."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from testrig.gate import GATED_CRASH, open_gate
from testrig.prefect_rig import POOL_LABEL, PrefectRig, free_port, start_prefect_server

from dockerworker.builds import BUILD_LABEL

RUN_LABEL = "io.prefect.flow-run-id"


def run_containers(docker_client, run_id: str) -> list:
    return docker_client.containers.list(  # sparse: no inspect that races with a removal
        all=True, sparse=True, filters={"label": f"{RUN_LABEL}={run_id}"}
    )


def wait_for_container(docker_client, run_id: str, status: str = "running", timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in run_containers(docker_client, run_id) if c.status == status]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {status} container for {run_id}"
        time.sleep(0.3)


def container_lines(rig: PrefectRig, run_id: str) -> list[str]:
    return [log["message"] for log in rig.read_logs(run_id)
            if log["name"] == "dockerworker.container"]


def cancel(rig: PrefectRig, run_id: str) -> float:
    rig.set_state(run_id, "CANCELLING", force=True)
    return time.monotonic()


def test_cancel_a_running_flow(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 60})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    asked = cancel(rig, run_id)
    run = rig.wait_for_final(run_id, timeout=40)
    took = time.monotonic() - asked
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert took < 30 + 5, took  # within the grace period plus a cancellation check
    # Prefect's engine got the cancellation as one (not as a bare SIGTERM, which it reports
    # as Crashed) and ran the flow's on_cancellation hook.
    assert "CRASHED" not in rig.read_states(run_id), rig.read_states(run_id)
    rig.wait_for_log(run_id, "on_cancellation hook ran")
    time.sleep(1)
    assert run_containers(docker_client, run_id) == []


def test_cancel_a_flow_that_ignores_sigterm(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    command = "sh -c 'trap \"\" TERM; echo ready; while true; do sleep 1; done'"
    job = {"image": flow_image, "command": command, "stop_timeout": 3}
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", job)
    run_id = rig.create_flow_run(deployment)
    wait_for_container(docker_client, run_id)
    asked = cancel(rig, run_id)
    run = rig.wait_for_final(run_id, timeout=30)
    took = time.monotonic() - asked
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert 3 <= took < 3 + 8, took  # SIGTERM ignored, SIGKILL after stop_timeout
    assert "137" in run["state"]["message"] or "SIGKILL" in run["state"]["message"]
    assert run_containers(docker_client, run_id) == []


def test_cancel_a_default_command_flow_that_ignores_sigterm(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    """Prefect's engine behind the entry script is asked to cancel; a flow that ignores the
    SIGTERM that follows is killed after stop_timeout, and the run is CANCELLED saying so."""
    start_worker(unique_pool)
    job = {"image": flow_image, "stop_timeout": 3}
    deployment = rig.create_deployment(unique_pool, "flows.py:deaf", job)
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_log(run_id, "deaf in the MainThread thread")
    asked = cancel(rig, run_id)
    run = rig.wait_for_final(run_id, timeout=30)
    took = time.monotonic() - asked
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert 3 <= took < 3 + 8, took  # the engine could not stop it: SIGKILL after stop_timeout
    assert "137" in run["state"]["message"] or "SIGKILL" in run["state"]["message"], run
    assert run_containers(docker_client, run_id) == []


def test_cancel_during_a_slow_build(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, policy_file
) -> None:
    worker = start_worker(unique_pool, "--policy", policy_file(allow_dockerfile_lines=True))
    marker = uuid.uuid4().hex
    job = {"image": flow_image, "dockerfile_lines": [f"RUN sleep 20 # {marker}"]}
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", job)
    run_id = rig.create_flow_run(deployment)
    deadline = time.monotonic() + 30
    while not any("dependencies" in log["message"] for log in rig.read_logs(run_id)):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    asked = cancel(rig, run_id)
    run = rig.wait_for_final(run_id, timeout=20)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert time.monotonic() - asked < 8
    assert "no container" in run["state"]["message"]
    time.sleep(2)
    assert run_containers(docker_client, run_id) == []

    def cached() -> bool:  # the build finished on its own: the next run of it starts at once
        return any(marker in json.dumps(image.history()) for image in docker_client.images.list(
            filters={"label": f"{BUILD_LABEL}=true"}))

    deadline = time.monotonic() + 60
    while not cached():
        assert time.monotonic() < deadline, "the cancelled run's build was not kept"
        time.sleep(1)
    assert run_containers(docker_client, run_id) == []
    worker.stop()  # its build lock must not outlive the worker
    locks = docker_client.containers.list(all=True, sparse=True, filters={"label": [
        "io.dockerworker.build-lock", f"io.dockerworker.holder={unique_pool}-w0"]})
    assert locks == []


def test_sigkilled_worker_is_replaced_and_no_line_is_lost_or_doubled(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    worker = start_worker(unique_pool, name=f"{unique_pool}-keep")
    deployment = rig.create_deployment(unique_pool, "flows.py:ticker", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 15})
    deadline = time.monotonic() + 60
    while "tick 4" not in container_lines(rig, run_id):
        assert time.monotonic() < deadline, rig.read_logs(run_id)
        time.sleep(0.3)
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait(10)
    time.sleep(3)
    start_worker(unique_pool, name=f"{unique_pool}-keep")
    assert rig.wait_for_final(run_id, timeout=90)["state"]["type"] == "COMPLETED"
    deadline = time.monotonic() + 15
    expected = [f"tick {i}" for i in range(1, 16)]
    while (lines := container_lines(rig, run_id)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lines == expected


def test_container_that_exits_while_the_worker_is_away_gets_its_verdict(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    name = f"{unique_pool}-keep"
    worker = start_worker(unique_pool, name=name)
    job = {"image": flow_image, "command": GATED_CRASH, "auto_remove": True}
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", job)
    run_id = rig.create_flow_run(deployment)
    running = wait_for_container(docker_client, run_id)
    worker.stop()  # graceful: the container keeps running
    assert worker.process.returncode == 0
    open_gate(running)  # it ends only now, with nobody watching
    container = wait_for_container(docker_client, run_id, status="exited", timeout=30)
    assert rig.read_flow_run(run_id)["state"]["type"] == "PENDING"
    start_worker(unique_pool, name=name)
    run = rig.wait_for_final(run_id, timeout=30)
    assert run["state"]["type"] == "CRASHED"
    assert "exited with code 3" in run["state"]["message"]
    assert "giving up" in run["state"]["message"]
    deadline = time.monotonic() + 10
    while run_containers(docker_client, run_id) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert run_containers(docker_client, run_id) == [], container.name


def test_container_removed_behind_the_workers_back_is_crashed(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy",
                                       {"image": flow_image, "infra_retries": 0})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 60})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    wait_for_container(docker_client, run_id).remove(force=True)
    run = rig.wait_for_final(run_id, timeout=30)
    assert run["state"]["type"] == "CRASHED"
    assert "container vanished" in run["state"]["message"]


def test_three_workers_sixty_runs_one_restarted_midway(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    rig.create_work_pool(unique_pool)
    names = [f"{unique_pool}-r{i}" for i in range(3)]
    # the containers only echo and sleep: no reason to take their starts two at a time
    # (--max-starting is shared by the workers of one engine: the CPU count in all)
    workers = [start_worker(unique_pool, "--limit", "4", "--max-starting", "0", name=n)
               for n in names]
    command = "sh -c 'echo serving $PREFECT__FLOW_RUN_ID; sleep 1'"
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "command": command}
    )
    runs = [rig.create_flow_run(deployment) for _ in range(60)]
    deadline = time.monotonic() + 60
    while sum(1 for r in runs if rig.read_flow_run(r)["state"]["type"] == "CRASHED") < 15:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    workers[1].process.send_signal(signal.SIGKILL)
    workers[1].process.wait(10)
    time.sleep(1)
    start_worker(unique_pool, "--limit", "4", "--max-starting", "0", name=names[1])
    finals = [rig.wait_for_final(r, timeout=240)["state"] for r in runs]
    assert all(s["type"] == "CRASHED" and "exited with code 0" in s["message"] for s in finals)
    containers = docker_client.containers.list(
        all=True, filters={"label": f"{POOL_LABEL}={unique_pool}"}
    )
    assert Counter(c.labels[RUN_LABEL] for c in containers) == Counter(runs)


def test_server_restart_during_a_run(
    start_worker, unique_pool: str, flow_image: str, tmp_path: Path
) -> None:
    """The Prefect server stops for 5 s under a running flow and starts again on the same
    database: the run completes, its output of the outage is shipped, the worker subscribes
    to the server's events again and takes new runs."""
    port, home = free_port(), tmp_path / "home"
    server = start_prefect_server(port=port, home=home)
    try:
        worker = start_worker(unique_pool, api_url=server.url)
        rig = PrefectRig(server.url)
        deployment = rig.create_deployment(unique_pool, "flows.py:ticker", {"image": flow_image})
        run_id = rig.create_flow_run(deployment, parameters={"seconds": 25})
        rig.wait_for_state(run_id, "RUNNING", timeout=60)
        rig.close()
        server.stop()
        time.sleep(5)
        server = start_prefect_server(port=port, home=home)
        rig = PrefectRig(server.url)
        assert rig.wait_for_final(run_id, timeout=120)["state"]["type"] == "COMPLETED"
        assert worker.alive()
        # what the flow printed while the server was down was kept and shipped after: no gap
        # (a batch applied just before the stop may be sent again: no promise of no duplicate)
        rig.wait_for_log(run_id, "tick 25", timeout=30)
        shipped = {log["message"] for log in rig.read_logs(run_id)}
        assert not [i for i in range(1, 26) if f"tick {i}" not in shipped], sorted(shipped)
        # the worker came back to the restarted server: its event stream, and a new run
        fresh = rig.create_flow_run(deployment, parameters={"seconds": 1})
        assert rig.wait_for_final(fresh, timeout=60)["state"]["type"] == "COMPLETED"
        assert worker.output().count("subscribed to the server's flow-run events") >= 2
        rig.close()
        worker.stop()  # while the server can still take its last log lines
    finally:
        server.stop()


def test_a_worker_at_its_limit_stays_healthy(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    port = free_port()
    # polls every second with the stream too: stuck after 30 s without one (health.py)
    start_worker(unique_pool, "--health-port", str(port), "--limit", "1",
                 "--poll-interval-with-events", "1")
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 50})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    time.sleep(35)  # longer than the 30 s without a poll that count as stuck
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert health.status_code == 200, health.text


def wait_for_health(port: int, timeout: float = 30.0) -> httpx.Response:
    """The first healthy answer of /health (the last answer when the deadline passes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        except httpx.TransportError:  # the endpoint is not listening yet
            health = None
        if health is not None and (health.status_code == 200 or time.monotonic() > deadline):
            return health
        assert time.monotonic() < deadline, "the health endpoint never answered"
        time.sleep(0.2)


def test_health_endpoint_and_drain(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    port = free_port()
    worker = start_worker(unique_pool, "--health-port", str(port), "--drain")
    health = wait_for_health(port)  # "starting" (503) until the first poll
    assert health.status_code == 200 and health.json()["status"] == "ok"
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 5})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(60) == 0
    assert rig.read_flow_run(run_id)["state"]["type"] == "COMPLETED"


def test_a_second_signal_exits_at_once_and_leaves_the_container_running(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    """`--drain` waits for the runs; an operator who will not wait signals again: the worker
    exits at once (128 + SIGTERM), its flow container runs on (a restarted worker adopts it)."""
    worker = start_worker(unique_pool, "--drain")
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 60})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    worker.process.send_signal(signal.SIGTERM)
    worker.wait_for_output("SIGTERM received: no new claims; waiting for this worker's runs")
    time.sleep(2)
    assert worker.process.poll() is None, worker.output()  # draining: the run has 58 s left
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(10) == 128 + signal.SIGTERM
    assert "SIGTERM received again: exiting now" in worker.output()
    (container,) = run_containers(docker_client, run_id)
    assert container.status == "running"
    assert rig.read_flow_run(run_id)["state"]["type"] == "RUNNING"
