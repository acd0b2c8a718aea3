"""The core set against a Prefect 2.20.27 server and a 2.20.27 flow image (issue 15).

The module overrides `prefect_server` and `flow_image`, so the shared fixtures (`rig`,
`unique_pool`, `start_worker`) serve this module from the 2.x server. Which behaviours run on
both majors and why: docs/compatibility.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import docker
import pytest
from testrig.prefect_rig import (
    FLOWS2_IMAGE,
    POOL_LABEL,
    PREFECT2_IMAGE,
    PREFECT2_VERSION,
    REPO_DIR,
    PrefectRig,
    PrefectServer,
    build_flow_image,
    start_prefect_server,
)
from testrig.workers import worker_env

RUN_LABEL = "io.prefect.flow-run-id"


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[PrefectServer]:
    """A Prefect 2.20.27 server (its own venv, made on first use) on a free loopback port."""
    try:
        server = start_prefect_server(version=PREFECT2_VERSION, timeout=120)
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"could not start the Prefect {PREFECT2_VERSION} server: {exc}",
                    pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def flow_image(docker_client: docker.DockerClient) -> str:
    """tests/flows on the Prefect 2.20.27 image (images/build-local.sh builds that one)."""
    try:
        docker_client.images.get(PREFECT2_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {PREFECT2_IMAGE} is missing: run {REPO_DIR / 'images/build-local.sh'}"
                    " first", pytrace=False)
    return build_flow_image(docker_client, FLOWS2_IMAGE, PREFECT2_IMAGE)


def containers_of_run(client: docker.DockerClient, flow_run_id: str) -> list:
    return client.containers.list(
        all=True, sparse=True, filters={"label": f"{RUN_LABEL}={flow_run_id}"}
    )


def waiting_containers(client: docker.DockerClient, pool: str, timeout: float) -> list:
    """The pool's warm containers waiting for a run, once there is one."""
    deadline = time.monotonic() + timeout
    while not (waiting := [c for c in client.containers.list(
            sparse=True, filters={"label": [f"{POOL_LABEL}={pool}", "io.dockerworker.warm"]})
            if c.attrs["Names"][0].lstrip("/").startswith("dockerworker-warm-")]):
        assert time.monotonic() < deadline, "no warm container was started"
        time.sleep(0.3)
    return waiting


def wait_logged(rig: PrefectRig, run_id: str, text: str, timeout: float = 20) -> list[str]:
    """The run's log messages once one contains `text` (the shipper batches briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [log["message"] for log in rig.read_logs(run_id)]
        if any(text in m for m in found):
            return found
        assert time.monotonic() < deadline, (text, found)
        time.sleep(0.5)


def test_a_flow_completes_with_its_output_in_the_servers_logs(
    rig: PrefectRig, prefect_server: PrefectServer, start_worker, unique_pool: str,
    flow_image: str,
) -> None:
    worker = start_worker(unique_pool)
    worker.wait_for_output("Prefect server 2.20.27 (Prefect 2 API, no event stream)")
    template = rig.read_work_pool(unique_pool)["base_job_template"]
    assert template["variables"]["properties"]["image"]["default"] == (
        f"prefecthq/prefect:{PREFECT2_VERSION}-python3.11")
    deployment = rig.create_deployment(unique_pool, "flows.py:prints_three", {"image": flow_image})
    run_id = rig.create_flow_run(deployment)
    assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"
    for text in ("line one", "line two", "line three"):
        messages = wait_logged(rig, run_id, text)
        assert sum(text in m for m in messages) == 1, (text, messages)
    # No event stream on this server: the worker never tried one (no errors on its side, and
    # none in the server's log about a websocket or the events endpoint).
    assert "event stream" not in worker.output().replace("no event stream", "")
    server_log = prefect_server.output()
    assert "events/out" not in server_log
    about_events = [r for r in error_records(server_log)
                    if "websocket" in r.lower() or "/events" in r]
    assert about_events == [], server_log


_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| (\w+) +\| ")


def error_records(log: str) -> list[str]:
    """The server's ERROR records, each with its traceback. Not all of them are about the
    worker: on SQLite under a busy machine the server logs "database is locked" for the
    test's own requests and its background services too."""
    records: list[list[str]] = []
    for line in log.splitlines():
        if match := _RECORD.match(line):
            records.append([line] if match.group(1) == "ERROR" else [])
        elif records and records[-1]:
            records[-1].append(line)
    return ["\n".join(r) for r in records if r]


def test_a_failing_flow_is_failed(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:fails", {"image": flow_image})
    run = rig.wait_for_final(rig.create_flow_run(deployment))
    assert run["state"]["type"] == "FAILED", run["state"]


def test_an_import_error_is_reported(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "broken_import.py:broken",
                                       {"image": flow_image})
    run_id = rig.create_flow_run(deployment)
    run = rig.wait_for_final(run_id)
    deadline = time.monotonic() + 30  # the worker adds the cause once the container ends
    while "nonexistent_pkg_xyz" not in (run["state"]["message"] or ""):
        assert time.monotonic() < deadline, run["state"]
        time.sleep(0.5)
        run = rig.read_flow_run(run_id)
    assert run["state"]["type"] in ("CRASHED", "FAILED")
    messages = wait_logged(rig, run_id, "ModuleNotFoundError")
    assert any("nonexistent_pkg_xyz" in m for m in messages if "ModuleNotFoundError" in m)


def test_cancellation_ends_cancelled_with_the_container_gone(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 120})
    rig.wait_for_state(run_id, "RUNNING", timeout=90)
    rig.set_state(run_id, "CANCELLING", force=True)
    run = rig.wait_for_final(run_id, timeout=45)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    # A 2.x engine gets SIGTERM (no control channel); its Crashed proposal is refused while
    # the run is Cancelling, and it runs the flow's on_cancellation hook.
    rig.wait_for_log(run_id, "on_cancellation hook ran")
    deadline = time.monotonic() + 15
    while containers_of_run(docker_client, run_id):
        assert time.monotonic() < deadline, "the cancelled run's container is still there"
        time.sleep(0.3)


def test_out_of_memory_is_crashed_with_the_reason(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(
        unique_pool, "flows.py:allocate", {"image": flow_image, "mem_limit": "256m"}
    )
    run = rig.wait_for_final(rig.create_flow_run(deployment, parameters={"mb": 768}))
    assert run["state"]["type"] == "CRASHED", run["state"]
    assert "out of memory (mem_limit 256m)" in run["state"]["message"]


def test_a_deployments_own_image_and_env_are_used(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    # The pool's default image (prefecthq/prefect:2.20.27-python3.11) is absent here and
    # cannot be pulled: only the deployment's image, read from `infra_overrides`, can run.
    start_worker(unique_pool)
    deployment = rig.create_deployment(
        unique_pool, "flows.py:env_value",
        {"image": flow_image, "env": {"GREETING": "from-the-deployment"}},
    )
    run_id = rig.create_flow_run(deployment)
    assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"
    wait_logged(rig, run_id, "GREETING=from-the-deployment")
    (container,) = containers_of_run(docker_client, run_id)
    assert container.attrs["Image"] == flow_image  # a sparse listing names the image


def test_a_dependency_image_is_built_once_and_reused(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    job = {"image": flow_image, "pip_packages": ["six==1.16.0"]}
    deployment = rig.create_deployment(unique_pool, "flows.py:six_version", job)
    first = rig.create_flow_run(deployment)
    assert rig.wait_for_final(first, timeout=300)["state"]["type"] == "COMPLETED"
    assert any("built image" in m or "cached, no build" in m
               for m in wait_logged(rig, first, "six version 1.16.0"))
    second = rig.create_flow_run(deployment)
    assert rig.wait_for_final(second, timeout=120)["state"]["type"] == "COMPLETED"
    logged = wait_logged(rig, second, "six version 1.16.0")
    assert any("cached, no build" in m for m in logged), logged
    assert not any("built image" in m for m in logged)


def test_replicas_run_each_run_once(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    rig.create_work_pool(unique_pool)
    start_worker(unique_pool, "--limit", "3")
    start_worker(unique_pool, "--limit", "3")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    runs = [rig.create_flow_run(deployment) for _ in range(8)]
    states = [rig.wait_for_final(run, timeout=300)["state"]["type"] for run in runs]
    assert states == ["COMPLETED"] * 8
    containers = docker_client.containers.list(
        all=True, filters={"label": f"{POOL_LABEL}={unique_pool}"}
    )
    assert Counter(c.labels[RUN_LABEL] for c in containers) == Counter({run: 1 for run in runs})


def test_doctor_names_the_major_and_what_differs(
    rig: PrefectRig, prefect_server: PrefectServer, unique_pool: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "pool", "create", unique_pool],
        env=worker_env(prefect_server.url), capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    image = f"prefecthq/prefect:{PREFECT2_VERSION}-python3.11"
    template = rig.read_work_pool(unique_pool)["base_job_template"]
    assert template["variables"]["properties"]["image"]["default"] == image
    result = subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "doctor", "--pool", unique_pool],
        env=worker_env(prefect_server.url, PREFECT_API_AUTH_STRING="admin:pass"),
        capture_output=True, text=True, timeout=60, check=False,
    )
    for expected in (f"Prefect server {PREFECT2_VERSION} (Prefect 2)",
                     "not on Prefect 2: cancellation stops the engine with SIGTERM",
                     "no event stream", "a Prefect 2 server has no basic auth",
                     f"runs without an image get {image}", "✓ credentials accepted"):
        assert expected in result.stdout, (expected, result.stdout)


def test_with_experimental_events_the_stream_is_used(
    start_worker, unique_pool: str, flow_image: str, tmp_path
) -> None:
    env = {"PREFECT_EXPERIMENTAL_EVENTS": "true"}
    with start_prefect_server(version=PREFECT2_VERSION, env=env, timeout=120,
                              home=tmp_path / "events-home") as server:
        rig = PrefectRig(server.url)
        worker = start_worker(unique_pool, "--poll-interval", "120", api_url=server.url)
        try:
            worker.wait_for_output("subscribed to the server's flow-run events", timeout=30)
            deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                               {"image": flow_image})
            time.sleep(3)  # past the first poll after start-up
            created = time.monotonic()
            run_id = rig.create_flow_run(deployment)
            rig.wait_for_state(run_id, {"PENDING", "RUNNING", "COMPLETED"}, timeout=15)
            assert time.monotonic() - created < 10  # the poll interval is 120 s
            assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"
        finally:
            worker.stop()  # while its server is still there to take its last logs
            rig.close()


def test_a_warm_container_serves_a_run(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    # The entry script waits with Prefect 2's engine imported, then runs it for the run.
    start_worker(unique_pool, "--warm", "1")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    first = rig.wait_for_final(rig.create_flow_run(deployment), timeout=90)
    assert first["state"]["type"] == "COMPLETED", first["state"]
    waiting = waiting_containers(docker_client, unique_pool, timeout=60)
    run_id = rig.create_flow_run(deployment, parameters={"name": "warm"})
    run = rig.wait_for_final(run_id, timeout=60)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["infrastructure_pid"].endswith(":" + waiting[0].id)
    rig.wait_for_log(run_id, "took over the run")
    rig.wait_for_log(run_id, "hello, warm")  # the run's own parameters reached the engine


def test_a_run_scheduled_ahead_starts_warm_on_a_prefect_2_server(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    """Warming ahead asks a 2.x server for the runs due after the poll's horizon
    (`scheduled_after`, which its get_scheduled_flow_runs takes too): the first run of a
    configuration, seen before it is due, is handed a container warmed for it, and is claimed
    at its prefetch time, not when warmed."""
    start_worker(unique_pool, "--warm", "1", "--poll-interval", "2")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    due = datetime.now(UTC) + timedelta(seconds=20)  # claimed 10 s ahead (--prefetch-seconds)
    run_id = rig.create_flow_run_due(deployment, due, parameters={"name": "ahead"})
    waiting = waiting_containers(docker_client, unique_pool, timeout=15)
    assert rig.read_flow_run(run_id)["state"]["type"] == "SCHEDULED"  # warmed, not claimed

    run = rig.wait_for_final(run_id, timeout=90)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["infrastructure_pid"].endswith(":" + waiting[0].id)
    rig.wait_for_log(run_id, "took over the run")
    rig.wait_for_log(run_id, "hello, ahead")
    assert (due - rig.claimed_at(run_id)).total_seconds() < 12
