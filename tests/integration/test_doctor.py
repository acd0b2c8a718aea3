"""`dockerworker doctor`: each problem named with a fix, exit code 1; a healthy setup exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from testrig.prefect_rig import PrefectRig, free_port, start_prefect_server
from testrig.workers import worker_env

from dockerworker.jobs import default_base_job_template

KEY = "pnu_doctor_test_key_9876543210"


def doctor(api_url: str, pool: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "doctor", "--pool", pool],
        env=worker_env(api_url, PREFECT_API_KEY=KEY),
        capture_output=True, text=True, timeout=60, check=False,
    )


def pool_with_image(rig: PrefectRig, pool: str, image: str) -> None:
    template = default_base_job_template()
    template["variables"]["properties"]["image"]["default"] = image
    rig.create_work_pool(pool, base_job_template=template)


def wait_for_online_worker(rig: PrefectRig, pool: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(w["status"] == "ONLINE"
                  for w in rig._call("POST", f"/work_pools/{pool}/workers/filter", {})):
        assert time.monotonic() < deadline, "no worker came online"
        time.sleep(0.3)


def test_healthy_setup(rig: PrefectRig, prefect_server, start_worker, unique_pool: str,
                       flow_image: str) -> None:
    pool_with_image(rig, unique_pool, flow_image)
    start_worker(unique_pool)
    wait_for_online_worker(rig, unique_pool)  # its first heartbeat follows "polling pool"
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in ("✓ the API at", "Prefect server 3.", "✓ credentials accepted",
                     f"✓ work pool '{unique_pool}' exists", "✓ 1 worker(s) online",
                     "✓ Docker engine", f"✓ default image {flow_image} is present"):
        assert expected in result.stdout, (expected, result.stdout)
    assert "✗" not in result.stdout
    assert KEY not in result.stdout + result.stderr


def test_wrong_api_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    result = doctor(url, "anything")
    assert result.returncode == 1
    assert f"✗ the API at {url} does not answer" in result.stdout
    assert "fix: start the Prefect server, or set PREFECT_API_URL" in result.stdout


def test_missing_pool(prefect_server, unique_pool: str) -> None:
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 1
    assert f"✗ work pool '{unique_pool}' does not exist" in result.stdout
    assert f"fix: dockerworker pool create {unique_pool}" in result.stdout


def test_pool_with_no_online_worker(rig: PrefectRig, prefect_server, unique_pool: str,
                                    flow_image: str) -> None:
    pool_with_image(rig, unique_pool, flow_image)
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 1
    assert f"✗ no worker online in pool '{unique_pool}'" in result.stdout
    assert f"fix: start one: dockerworker start --pool {unique_pool}" in result.stdout


def test_a_paused_pool_and_a_paused_queue_are_named_with_their_fix(
        rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str) -> None:
    pool_with_image(rig, unique_pool, flow_image)
    rig.create_work_queue(unique_pool, "nightly", priority=2)
    rig._call("PATCH", f"/work_pools/{unique_pool}/queues/nightly", {"is_paused": True})
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 1
    assert "✗ paused queues: nightly" in result.stdout, result.stdout
    assert f"fix: resume them: prefect work-queue resume NAME --pool {unique_pool}" \
        in result.stdout
    rig._call("PATCH", f"/work_pools/{unique_pool}", {"is_paused": True})
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 1
    assert f"✗ work pool '{unique_pool}': the pool is paused: no run is handed out" \
        in result.stdout, result.stdout
    assert f"fix: prefect work-pool resume {unique_pool}" in result.stdout


def cli(api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", *args], env=worker_env(api_url),
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_pool_create_and_inspect_a_deployment(
    rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str
) -> None:
    created = cli(prefect_server.url, "pool", "create", unique_pool, "--image", flow_image)
    assert created.returncode == 0, created.stderr
    assert rig.read_work_pool(unique_pool)["type"] == "docker"
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello",
        {"mem_limit": "256m", "env": {"DB_PASSWORD": "hunter22", "MODE": "test"}},
        name="inspected",
    )
    for ref in (deployment, "hello/inspected"):
        shown = cli(prefect_server.url, "pool", "inspect", unique_pool, "--deployment", ref)
        assert shown.returncode == 0, shown.stderr
        job = json.loads(shown.stdout)["job_variables"]
        assert job["image"] == flow_image and job["mem_limit"] == "256m"
        assert job["env"] == {"DB_PASSWORD": "***", "MODE": "test"}
    again = cli(prefect_server.url, "pool", "create", unique_pool)
    assert again.returncode == 1 and "could not create work pool" in again.stderr


def test_rejected_credentials_are_named_with_their_fix(unique_pool: str) -> None:
    with start_prefect_server(env={"PREFECT_SERVER_API_AUTH_STRING": "admin:right"}) as server:
        result = subprocess.run(
            [sys.executable, "-m", "dockerworker.cli", "doctor", "--pool", unique_pool],
            env=worker_env(server.url, PREFECT_API_AUTH_STRING="admin:wrong-password"),
            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "✗ credentials rejected" in result.stdout, result.stdout
    assert "fix: set PREFECT_API_KEY (bearer) or PREFECT_API_AUTH_STRING" in result.stdout
    assert "wrong-password" not in result.stdout + result.stderr


def test_a_default_image_that_is_absent_and_cannot_be_pulled_is_named(
        rig: PrefectRig, prefect_server, unique_pool: str) -> None:
    image = f"127.0.0.1:{free_port()}/nowhere/flows:absent"  # a registry nobody serves
    pool_with_image(rig, unique_pool, image)
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 1
    assert f"✗ default image {image} is absent and cannot be pulled" in result.stdout, (
        result.stdout)
    assert "fix: load or build it on this host" in result.stdout


def test_late_runs_are_named_with_the_reasons_that_hold_them(
        rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str) -> None:
    """No worker online, the pool's and the deployment's concurrency limits, a paused
    deployment: each reason the server would hold a Late run back, in one line."""
    pool_with_image(rig, unique_pool, flow_image)
    rig._call("PATCH", f"/work_pools/{unique_pool}", {"concurrency_limit": 2})
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", name="held",
                                       concurrency_limit=1)
    run_id = rig.create_flow_run(deployment)
    rig.set_state(run_id, "SCHEDULED", name="Late", force=True)  # what Prefect's service sets
    rig._call("PATCH", f"/deployments/{deployment}", {"paused": True})
    result = doctor(prefect_server.url, unique_pool)
    assert result.returncode == 1
    line = next((x for x in result.stdout.splitlines() if "Late or stuck" in x), "")
    assert line.startswith("✗ 1 run(s) Late or stuck in Pending: "), result.stdout
    for reason in ("no worker is online for the pool", "the pool's concurrency limit is 2",
                   "deployment 'held' is paused", "deployment 'held' has concurrency limit 1"):
        assert reason in line, (reason, line)
