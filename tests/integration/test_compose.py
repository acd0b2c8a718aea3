"""The compose stack from compose/: PostgreSQL, the Prefect server, 3 worker replicas."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections import Counter

import pytest
from prefect_rig import REPO_DIR, PrefectRig, build_worker_image, free_port

COMPOSE_FILE = REPO_DIR / "compose" / "docker-compose.yml"
LOCAL_POSTGRES = "dockerworker/postgres:15-local"
LOCAL_PREFECT = "dockerworker/prefect:3.9.1-local"


def compose_command() -> list[str]:
    """`docker compose` (v2) when present, else Debian's docker-compose (v1, --compatibility
    so that deploy.replicas is honoured)."""
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose", "--compatibility"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


@pytest.fixture
def stack(docker_client, unique_pool: str, flow_image: str):
    for image in (LOCAL_POSTGRES, LOCAL_PREFECT):
        docker_client.images.get(image)  # built by images/build-local.sh; missing = failure
    project = f"dwtest{secrets.token_hex(3)}"
    port = free_port()
    env = {
        **os.environ,
        "POSTGRES_IMAGE": LOCAL_POSTGRES,
        "PREFECT_IMAGE": LOCAL_PREFECT,
        "DOCKERWORKER_IMAGE": build_worker_image(docker_client),
        "PREFECT_PORT": str(port),
        "PREFECT_NETWORK": project,
        "DOCKERWORKER_POOL": unique_pool,
        "DOCKERWORKER_POLL_INTERVAL": "1",
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
    }
    base = [*compose_command(), "-p", project, "-f", str(COMPOSE_FILE)]
    up = subprocess.run([*base, "up", "-d", "--no-build"], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield f"http://127.0.0.1:{port}/api", project
    finally:
        logs = subprocess.run([*base, "logs", "--no-color", "--tail", "40"], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        print(logs.stdout[-6000:])
        subprocess.run([*base, "down", "-v", "--remove-orphans", "-t", "5"], env=env,
                       capture_output=True, timeout=300, check=False)


def test_compose_stack_runs_flows_over_three_replicas(
    stack: tuple[str, str], unique_pool: str, flow_image: str, docker_client
) -> None:
    api_url, network = stack
    rig = PrefectRig(api_url)
    deadline = time.monotonic() + 240
    online: list[dict] = []
    while len(online) < 3:
        assert time.monotonic() < deadline, f"workers online: {online}"
        time.sleep(2)
        try:
            workers = rig._call("POST", f"/work_pools/{unique_pool}/workers/filter", {})
        except (AssertionError, OSError):
            continue
        online = [w for w in workers if w["status"] == "ONLINE"]
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "networks": [network]}
    )
    runs = [rig.create_flow_run(deployment) for _ in range(9)]
    states = [rig.wait_for_final(run, timeout=300)["state"] for run in runs]
    assert [s["type"] for s in states] == ["COMPLETED"] * 9, states
    containers = docker_client.containers.list(
        all=True, filters={"label": f"io.prefect.work-pool-name={unique_pool}"}
    )
    by_worker = Counter(c.labels["io.prefect.worker-name"] for c in containers)
    assert len(by_worker) > 1, by_worker
    assert sum(by_worker.values()) == 9
    rig.close()
