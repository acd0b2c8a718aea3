"""The core worker against a real Prefect server and real containers (issue 2)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
from testrig.faultproxy import HOLD, FaultProxy
from testrig.prefect_rig import (
    POOL_LABEL,
    PrefectRig,
    free_port,
    prefect_executable,
    start_prefect_server,
)
from testrig.workers import WorkerProcess, worker_env

RUN_LABEL = "io.prefect.flow-run-id"
CHECKS = r"^POST /api/flow_runs/filter$"  # the check for cancellations (and reconciliation)


def containers_of_run(client: docker.DockerClient, flow_run_id: str) -> list:
    return client.containers.list(  # sparse: no inspect that races with a removal
        all=True, sparse=True, filters={"label": f"{RUN_LABEL}={flow_run_id}"}
    )


def test_flow_completes_in_a_labelled_container(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    kept = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    removed = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "auto_remove": True}
    )
    kept_run = rig.create_flow_run(kept, parameters={"name": "kept"})
    removed_run = rig.create_flow_run(removed, parameters={"name": "removed"})

    for run_id in (kept_run, removed_run):
        run = rig.wait_for_final(run_id, timeout=120)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        host_id, _, container_id = run["infrastructure_pid"].rpartition(":")
        assert host_id == docker_client.info()["ID"] and container_id

    workers = rig._call("POST", f"/work_pools/{unique_pool}/workers/filter", {})
    assert [w["status"] for w in workers] == ["ONLINE"]

    (container,) = containers_of_run(docker_client, kept_run)
    labels = container.attrs["Labels"]  # a sparse listing
    assert labels[POOL_LABEL] == unique_pool
    assert labels["io.prefect.flow-run-name"] == rig.read_flow_run(kept_run)["name"]
    assert labels["io.prefect.deployment-id"] == kept
    assert labels["io.prefect.worker-name"] == f"{unique_pool}-w0"
    assert container.id == rig.read_flow_run(kept_run)["infrastructure_pid"].rpartition(":")[2]

    deadline = time.monotonic() + 15
    while containers_of_run(docker_client, removed_run) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert containers_of_run(docker_client, removed_run) == []


def test_failing_flow_is_failed_and_the_worker_goes_on(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    failing = rig.create_deployment(unique_pool, "flows.py:fails", {"image": flow_image})
    fine = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    failed_run = rig.create_flow_run(failing)
    assert rig.wait_for_final(failed_run)["state"]["type"] == "FAILED"
    next_run = rig.create_flow_run(fine)
    assert rig.wait_for_final(next_run)["state"]["type"] == "COMPLETED"


def test_container_exiting_without_a_state_is_crashed_with_code_and_output(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    command = "sh -c 'echo starting up; echo last words before exit; exit 3'"
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "command": command}
    )
    run = rig.wait_for_final(rig.create_flow_run(deployment))
    assert run["state"]["type"] == "CRASHED"
    message = run["state"]["message"]
    assert "exited with code 3" in message
    assert "last words before exit" in message


def test_out_of_memory_is_named(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    # The limit fits the engine (~120 MiB for `python -m prefect.engine`) but not the flow's
    # 768 MiB of written pages: the kernel OOM-kills the allocation. A limit below what the
    # engine itself needs makes it thrash on page cache (no swap here) instead of dying.
    start_worker(unique_pool)
    deployment = rig.create_deployment(
        unique_pool, "flows.py:allocate", {"image": flow_image, "mem_limit": "256m"}
    )
    run = rig.wait_for_final(rig.create_flow_run(deployment, parameters={"mb": 768}))
    assert run["state"]["type"] == "CRASHED"
    assert "out of memory (mem_limit 256m)" in run["state"]["message"]


def test_absent_image_under_never_is_crashed_and_creates_nothing(
    rig: PrefectRig, start_worker, unique_pool: str, docker_client
) -> None:
    start_worker(unique_pool)
    image = "dockerworker-test/absent:nope"
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": image, "image_pull_policy": "Never"}
    )
    run_id = rig.create_flow_run(deployment)
    run = rig.wait_for_final(run_id)
    assert run["state"]["type"] == "CRASHED"
    assert image in run["state"]["message"] and "Never" in run["state"]["message"]
    assert containers_of_run(docker_client, run_id) == []


def test_invalid_job_variable_is_named_and_the_worker_goes_on(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    worker = start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    bad_run = rig.create_flow_run(deployment, job_variables={"mem_limit": "lots"})
    run = rig.wait_for_final(bad_run)
    assert run["state"]["type"] == "CRASHED"
    assert "mem_limit" in run["state"]["message"] and "lots" in run["state"]["message"]
    assert containers_of_run(docker_client, bad_run) == []
    assert rig.wait_for_final(rig.create_flow_run(deployment))["state"]["type"] == "COMPLETED"
    assert worker.alive()


def test_limit_bounds_containers_at_once(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool, "--limit", "2")
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "auto_remove": True}
    )
    runs = [rig.create_flow_run(deployment) for _ in range(6)]
    most = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            live = docker_client.containers.list(
                sparse=True, filters={"label": f"{POOL_LABEL}={unique_pool}", "status": "running"}
            )
            most = max(most, len(live))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        states = [rig.wait_for_final(run, timeout=240)["state"]["type"] for run in runs]
    finally:
        stop.set()
        sampler.join()
    assert states == ["COMPLETED"] * 6
    assert most == 2, f"at most {most} containers ran at once"


def test_two_workers_run_each_flow_run_exactly_once(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    rig.create_work_pool(unique_pool)
    start_worker(unique_pool, "--limit", "3")
    start_worker(unique_pool, "--limit", "3")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    runs = [rig.create_flow_run(deployment) for _ in range(12)]
    states = [rig.wait_for_final(run, timeout=300)["state"]["type"] for run in runs]
    assert states == ["COMPLETED"] * 12
    containers = docker_client.containers.list(
        all=True, filters={"label": f"{POOL_LABEL}={unique_pool}"}
    )
    per_run = Counter(c.labels[RUN_LABEL] for c in containers)
    assert per_run == Counter({run: 1 for run in runs})


def test_pool_created_by_the_prefect_cli_works_unchanged(
    rig: PrefectRig, prefect_server, start_worker, unique_pool: str, flow_image: str
) -> None:
    created = subprocess.run(
        [prefect_executable(), "work-pool", "create", unique_pool, "--type", "docker"],
        env=worker_env(prefect_server.url, PREFECT_HOME=str(prefect_server.home)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    pool = rig.read_work_pool(unique_pool)
    assert pool["type"] == "docker"
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    assert rig.wait_for_final(rig.create_flow_run(deployment))["state"]["type"] == "COMPLETED"


def test_run_whose_deployment_is_gone_is_cancelled(
    rig: PrefectRig, start_worker, unique_pool: str
) -> None:
    rig.create_work_pool(unique_pool)
    run_id = rig.create_orphan_flow_run(unique_pool)
    start_worker(unique_pool)
    run = rig.wait_for_final(run_id, timeout=60)
    assert run["state"]["type"] == "CANCELLED"
    assert "no longer exists" in run["state"]["message"]


def test_server_appearing_late_is_waited_for(
    start_worker, unique_pool: str, flow_image: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    worker = start_worker(unique_pool, api_url=url, ready=False)
    worker.wait_for_output(f"127.0.0.1:{port}", timeout=20)
    time.sleep(5)
    assert worker.alive(), worker.output()
    with start_prefect_server(port=port, home=tmp_path / "late-home") as server:
        worker.wait_for_output("polling pool", timeout=30)
        late = PrefectRig(server.url)
        try:
            deployment = late.create_deployment(
                unique_pool, "flows.py:hello", {"image": flow_image}
            )
            run = late.wait_for_final(late.create_flow_run(deployment), timeout=120)
            assert run["state"]["type"] == "COMPLETED", run["state"]
            worker.stop()  # while the server can still take its last log lines
        finally:
            late.close()


def test_no_docker_engine_exits_1_naming_the_socket(prefect_server, tmp_path: Path) -> None:
    env = worker_env(prefect_server.url, DOCKER_HOST="unix:///tmp/dockerworker-no-such.sock")
    worker = WorkerProcess(["--pool", "nowhere"], env, tmp_path / "worker.log")
    try:
        assert worker.wait(timeout=30) == 1
    finally:
        worker.stop()
    output = worker.output()
    assert "unix:///tmp/dockerworker-no-such.sock" in output
    assert "/var/run/docker.sock" in output


def test_event_stream_picks_up_runs_without_waiting_for_the_poll(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    worker = start_worker(unique_pool, "--poll-interval", "120")
    worker.wait_for_output("subscribed to the server's flow-run events", timeout=30)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    time.sleep(1)
    for _ in range(2):  # not just the first poll after start-up
        created = time.monotonic()
        run_id = rig.create_flow_run(deployment)
        # the poll interval is 120 s: the event (usually within a second) or nothing; the
        # bound leaves room for a server slowed by the other test process's containers
        rig.wait_for_state(run_id, {"PENDING", "RUNNING", "COMPLETED"}, timeout=60)
        picked_up = time.monotonic() - created
        print(f"picked up {picked_up:.1f} s after its creation")
        assert picked_up < 60, picked_up
        assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"


def test_with_the_stream_a_run_scheduled_ahead_is_claimed_at_its_prefetch_time(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    """While the stream is connected the worker polls every 30 s (--poll-interval-with-events)
    but looks that far ahead: a run due 25 s after its creation (its Scheduled event came at
    creation) is claimed 10 s (--prefetch-seconds) before it is due, as with frequent polls."""
    worker = start_worker(unique_pool)
    worker.wait_for_output("subscribed to the server's flow-run events", timeout=30)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    time.sleep(2)  # past the poll that follows the subscription
    due = datetime.now(UTC) + timedelta(seconds=25)
    run_id = rig.create_flow_run_due(deployment, due)
    run = rig.wait_for_final(run_id, timeout=90)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    early = (due - rig.claimed_at(run_id)).total_seconds()
    assert 8 < early < 12, early  # claimed 10 s ahead: not at creation, not at a later poll


def test_event_stream_reports_cancellation_at_once(
    fault_proxy: FaultProxy, rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    """While the event stream is connected the check for cancellations runs every 15 s only
    (a net): the run is set CANCELLING right after one of those checks (their rhythm read off
    the proxy), so only the Cancelling event can end it within 8 s."""
    worker = start_worker(unique_pool, api_url=fault_proxy.url)
    worker.wait_for_output("subscribed to the server's flow-run events", timeout=30)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 120})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    fault_proxy.inject(HOLD, CHECKS, times=100_000, delay=0)  # records each, holds none

    def checks() -> list[float]:
        return [t for t, kind, ep in list(fault_proxy.events)
                if kind == HOLD and re.search(CHECKS, ep)]

    deadline = time.monotonic() + 90
    while True:  # three filter requests 15 s apart: the check's own rhythm, not another's
        seen = checks()
        gaps = [b - a for a, b in zip(seen[-3:], seen[-2:], strict=False)]
        if len(gaps) == 2 and all(13 < gap < 17 for gap in gaps) \
                and time.monotonic() - seen[-1] < 1:
            break
        assert time.monotonic() < deadline, f"no 15 s rhythm of checks: {seen}"
        time.sleep(0.05)
    asked = time.monotonic()
    rig.set_state(run_id, "CANCELLING", force=True)
    run = rig.wait_for_final(run_id, timeout=30)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert time.monotonic() - asked < 8  # the next check is ~14 s away: the event did it
