"""Never lose a run (issue 14): workers sharing one engine. A killed worker's runs are adopted
by another (exactly one), followed, judged and cancellable; replicas never remove each other's
containers while they read them."""

from __future__ import annotations

import signal
import time

import httpx
from testrig.gate import GATED_CRASH, open_gate
from testrig.prefect_rig import PrefectRig, free_port

BEAT = "2"  # heartbeat seconds: a killed worker is OFFLINE after 3 of them
RUN_LABEL = "io.prefect.flow-run-id"


def run_containers(docker_client, run_id: str) -> list:
    return docker_client.containers.list(  # sparse: no inspect that races with a removal
        all=True, sparse=True, filters={"label": f"{RUN_LABEL}={run_id}"})


def wait_for_container(docker_client, run_id: str, status: str = "running", timeout=60):
    found: list = []
    wait_for(lambda: found.extend(c for c in run_containers(docker_client, run_id)
                                  if c.status == status) or found,
             f"a {status} container for {run_id}", timeout)
    return found[0]


def container_lines(rig: PrefectRig, run_id: str) -> list[str]:
    return [log["message"] for log in rig.read_logs(run_id)
            if log["name"] == "dockerworker.container"]


def cancel(rig: PrefectRig, run_id: str) -> float:
    rig.set_state(run_id, "CANCELLING", force=True)
    return time.monotonic()


def wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.3)


def test_a_killed_worker_s_runs_are_adopted_followed_judged_and_cancellable(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    owner = start_worker(unique_pool, "--heartbeat-interval", BEAT, name=f"{unique_pool}-x")
    ticker = rig.create_deployment(unique_pool, "flows.py:ticker", {"image": flow_image})
    sleepy = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    crasher = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "command": GATED_CRASH})
    ticking = rig.create_flow_run(ticker, parameters={"seconds": 30})
    waiting = rig.create_flow_run(sleepy, parameters={"seconds": 300})
    crashing = rig.create_flow_run(crasher)
    rig.wait_for_state(ticking, "RUNNING", timeout=90)
    rig.wait_for_state(waiting, "RUNNING", timeout=90)
    wait_for_container(docker_client, crashing)
    wait_for(lambda: "tick 3" in container_lines(rig, ticking), "tick 3", 30)

    adopter = start_worker(unique_pool, "--heartbeat-interval", BEAT, name=f"{unique_pool}-y")
    owner.process.send_signal(signal.SIGKILL)
    owner.process.wait(10)
    wait_for(lambda: adopter.output().count("is gone; took over its container") == 3,
             "the three containers taken over", 60)
    open_gate(wait_for_container(docker_client, crashing))  # it ends under its adopter

    assert rig.wait_for_final(ticking, timeout=90)["state"]["type"] == "COMPLETED"
    expected = [f"tick {i}" for i in range(1, 31)]
    wait_for(lambda: container_lines(rig, ticking) == expected, "every tick once", 20)

    crashed = rig.wait_for_final(crashing, timeout=60)["state"]
    assert crashed["type"] == "CRASHED", crashed
    assert "exited with code 3" in crashed["message"] and "giving up" in crashed["message"]

    asked = cancel(rig, waiting)
    cancelled = rig.wait_for_final(waiting, timeout=60)["state"]
    assert cancelled["type"] == "CANCELLED", cancelled
    assert time.monotonic() - asked < 30 + 20
    wait_for(lambda: run_containers(docker_client, waiting) == [], "cancelled container gone", 20)
    assert adopter.alive()


def test_replicas_never_remove_a_container_its_owner_still_reads(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    """Before issue 14 a replica's reconciliation removed another replica's exited container
    (auto_remove, run COMPLETED) before its owner had read it: 'container vanished' on a
    COMPLETED run. The owner is frozen from before its container exits until the other
    replica has done its recovery rounds, so the window is held open, not hit by luck."""
    owner = start_worker(unique_pool, name=f"{unique_pool}-b")
    job = {"image": flow_image, "auto_remove": True}
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", job)
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 6})
    rig.wait_for_state(run_id, "RUNNING", timeout=90)
    owner.process.send_signal(signal.SIGSTOP)
    try:
        assert rig.wait_for_final(run_id, timeout=60)["state"]["type"] == "COMPLETED"
        wait_for_container(docker_client, run_id, status="exited", timeout=30)
        port = free_port()
        start_worker(unique_pool, "--health-port", str(port), name=f"{unique_pool}-a")

        def recovered() -> bool:
            rounds = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            done = rounds.get("rounds", {})
            return all(done.get(name, 0) >= 1 for name in ("orphans", "removal",
                                                            "reconciliation"))

        wait_for(recovered, "the other replica's recovery rounds", 30)
        assert len(run_containers(docker_client, run_id)) == 1  # left to its owner
    finally:
        owner.process.send_signal(signal.SIGCONT)
    wait_for(lambda: run_containers(docker_client, run_id) == [], "removed by its owner", 30)
    messages = [log["message"] for log in rig.read_logs(run_id)]
    assert not [m for m in messages if "vanished" in m], messages
    assert rig.read_flow_run(run_id)["state"]["type"] == "COMPLETED"
    assert owner.alive()


def test_a_warm_container_whose_run_ended_while_its_worker_was_down_is_removed(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    name = f"{unique_pool}-warm"
    worker = start_worker(unique_pool, "--warm", "1", name=name)
    job = {"image": flow_image, "auto_remove": True}
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", job)
    first = rig.create_flow_run(deployment, parameters={"seconds": 0})
    assert rig.wait_for_final(first, timeout=90)["state"]["type"] == "COMPLETED"
    waiting: list = []
    wait_for(lambda: waiting.extend(docker_client.containers.list(sparse=True, filters={
        "label": [f"io.prefect.work-pool-name={unique_pool}", "io.dockerworker.warm"],
        "name": "dockerworker-warm-"})) or waiting, "a waiting warm container", 90)
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 8})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    pid = rig.read_flow_run(run_id)["infrastructure_pid"]
    assert pid.endswith(":" + waiting[0].id)  # the run took the warm container
    worker.stop()  # graceful: the container runs on without its worker
    assert rig.wait_for_final(run_id, timeout=60)["state"]["type"] == "COMPLETED"

    def status() -> str:
        found = docker_client.containers.list(all=True, sparse=True,
                                              filters={"id": waiting[0].id})
        return found[0].status if found else "gone"

    wait_for(lambda: status() == "exited", "the warm container exited", 30)
    start_worker(unique_pool, "--warm", "1", name=name)
    wait_for(lambda: status() == "gone", "the exited warm container removed", 30)
