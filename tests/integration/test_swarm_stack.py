"""compose/stack.yml on a single-node Swarm of the tests' own (issue 17, part A): server,
PostgreSQL and the global worker come up from `docker stack deploy`; a flow runs in a container
on the attachable overlay network; the worker's name is the per-node one and survives
`docker service update --force`, the new worker adopting the run the old one started. The
server's auth string and PostgreSQL's password are Swarm secrets made from files: in no
service's spec and no task container's inspect."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from testrig.prefect_rig import (
    LOCAL_POSTGRES,
    PREFECT_IMAGE,
    PrefectRig,
    build_worker_image,
    free_port,
    stack_secrets,
)
from testrig.swarm import SwarmEngine, SwarmStack

from dockerworker.containers import LABEL_FLOW_RUN_ID, LABEL_WORKER
from dockerworker.jobs import default_base_job_template


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stack's secret files, made as the docs say (compose/docker-compose.yml's top)."""
    path = tmp_path_factory.mktemp("swarm-stack-secrets")
    stack_secrets(path)
    return path


@pytest.fixture(scope="module")
def auth(secrets_dir: Path) -> tuple[str, str]:
    user, _, password = (secrets_dir / "prefect_auth_string").read_text().strip().partition(":")
    return user, password


@pytest.fixture(scope="module")
def stack(swarm_engine: SwarmEngine, docker_client: docker.DockerClient,
          flow_image: str, secrets_dir: Path) -> Iterator[SwarmStack]:
    worker_image = build_worker_image(docker_client)
    swarm_engine.load_images(docker_client, LOCAL_POSTGRES, PREFECT_IMAGE, flow_image,
                             worker_image)
    tag = secrets.token_hex(2)
    stack = SwarmStack(
        swarm_engine, f"dw{tag}", f"t-swarm-{tag}", free_port(),
        {"postgres": LOCAL_POSTGRES, "server": PREFECT_IMAGE, "worker": worker_image},
        f"dw{tag}-prefect",
        DOCKERWORKER_POLL_INTERVAL="1", DOCKERWORKER_HEARTBEAT_INTERVAL="5",
        SECRETS_DIR=str(secrets_dir),
    )
    stack.deploy()
    try:
        yield stack
    except BaseException:
        print(stack.describe())
        raise
    finally:
        stack.remove()


@pytest.fixture(scope="module")
def rig(stack: SwarmStack, flow_image: str, auth: tuple[str, str]) -> Iterator[PrefectRig]:
    """REST helper of the stack's server (with its auth string), once it is healthy, with the
    stack's pool carrying the overlay network (and the flow image) as defaults."""
    helper = PrefectRig(stack.api_url, auth=auth)
    try:
        stack.engine.wait_for("the stack's server healthy", lambda: healthy(helper), 180,
                              stack.describe)
        set_pool_defaults(helper, stack.pool, flow_image, stack.network)
        yield helper
    finally:
        helper.close()


def healthy(rig: PrefectRig) -> bool:
    try:
        return rig._request("GET", "/health").status_code == 200
    except httpx.HTTPError:
        return False


def set_pool_defaults(rig: PrefectRig, pool: str, image: str, network: str) -> None:
    """Create the pool with networks = [network] by default, or (the worker, up first, made it
    already) set that default on it."""
    template = default_base_job_template(image)
    template["variables"]["properties"]["networks"]["default"] = [network]
    response = rig._request("POST", "/work_pools/",
                            {"name": pool, "type": "docker", "base_job_template": template})
    if response.status_code == 409:
        response = rig._request("PATCH", f"/work_pools/{pool}",
                                {"base_job_template": template})
    assert response.status_code in (200, 201, 204), response.text


def online_workers(rig: PrefectRig, pool: str, since: datetime) -> dict[str, dict[str, Any]]:
    """The pool's ONLINE workers by name whose last heartbeat came after `since`."""
    try:
        workers = rig._call("POST", f"/work_pools/{pool}/workers/filter", {})
    except (AssertionError, httpx.HTTPError):
        return {}
    return {w["name"]: w for w in workers if w["status"] == "ONLINE"
            and datetime.fromisoformat(w["last_heartbeat_time"]) > since}


def node_worker_name(engine: SwarmEngine) -> str:
    """What compose/stack.yml names the worker of the (only) node: dockerworker-<hostname>."""
    (node,) = engine.client.nodes.list()
    return f"dockerworker-{node.attrs['Description']['Hostname']}"


def run_hello(rig: PrefectRig, stack: SwarmStack) -> str:
    """A run of flows.py:hello with no job variables (the pool's defaults: the flow image and
    the overlay network); return the name of the worker that ran it."""
    deployment = rig.create_deployment(stack.pool, "flows.py:hello")
    run = rig.wait_for_final(rig.create_flow_run(deployment), timeout=120)
    assert run["state"]["type"] == "COMPLETED", (run["state"], stack.describe())
    (container,) = stack.engine.client.containers.list(all=True, filters={
        "label": f"{LABEL_FLOW_RUN_ID}={run['id']}"})
    assert stack.network in container.attrs["NetworkSettings"]["Networks"], container.attrs
    return str(container.labels[LABEL_WORKER])


def test_stack_deploys_and_runs_a_flow_on_the_overlay(
    stack: SwarmStack, rig: PrefectRig
) -> None:
    name = node_worker_name(stack.engine)
    start = datetime.now(UTC)
    workers = stack.engine.wait_for(f"worker {name} online",
                                    lambda: online_workers(rig, stack.pool, start), 120,
                                    stack.describe)
    assert set(workers) == {name}, workers
    assert run_hello(rig, stack) == name
    (task,) = stack.running_containers("worker")
    assert task.attrs["Config"]["Hostname"] == name.removeprefix("dockerworker-")


def test_the_stack_s_credentials_are_swarm_secrets_in_no_spec_or_inspect(
    stack: SwarmStack, rig: PrefectRig, auth: tuple[str, str], secrets_dir: Path
) -> None:
    """The worker authenticates (it is online: the server refuses requests without the auth
    string) with the credential read from its secret file; neither the auth string nor
    PostgreSQL's password is in a service's spec or a task container's inspect."""
    password = auth[1]
    postgres_password = (secrets_dir / "postgres_password").read_text().strip()
    assert httpx.post(f"{stack.api_url}/work_pools/filter", json={}, trust_env=False,
                      timeout=10).status_code == 401
    name = node_worker_name(stack.engine)
    stack.engine.wait_for("worker online", lambda: online_workers(
        rig, stack.pool, datetime.fromtimestamp(0, UTC)).get(name), 120, stack.describe)
    worker = stack.engine.client.services.get(stack.service("worker"))
    container_spec = worker.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]
    assert "PREFECT_API_AUTH_STRING_FILE=/run/secrets/prefect_auth_string" in container_spec["Env"]
    (reference,) = container_spec["Secrets"]
    assert reference["File"]["Name"] == "prefect_auth_string"
    assert (reference["File"]["UID"], reference["File"]["Mode"]) == ("10001", 0o400)
    for short in ("postgres", "server", "worker"):
        spec = json.dumps(stack.engine.client.services.get(stack.service(short)).attrs)
        assert password not in spec and postgres_password not in spec, short
        for container in stack.running_containers(short):
            inspected = json.dumps(container.attrs)
            assert password not in inspected and postgres_password not in inspected, short
    (task,) = stack.running_containers("worker")
    assert password not in task.logs().decode(errors="replace")


def test_worker_keeps_its_name_and_its_run_across_a_forced_update(
    stack: SwarmStack, rig: PrefectRig
) -> None:
    name = node_worker_name(stack.engine)
    stack.engine.wait_for("worker online", lambda: online_workers(
        rig, stack.pool, datetime.fromtimestamp(0, UTC)).get(name), 120, stack.describe)
    (before,) = stack.running_containers("worker")
    deployment = rig.create_deployment(stack.pool, "flows.py:sleepy")
    sleepy = rig.create_flow_run(deployment, parameters={"seconds": 20})
    rig.wait_for_state(sleepy, "RUNNING", timeout=90)

    updated = datetime.now(UTC)
    stack.update_force("worker")
    stack.engine.wait_for("the old worker task replaced", lambda: [
        c for c in stack.running_containers("worker") if c.id != before.id], 90,
        stack.describe)
    workers = stack.engine.wait_for(f"{name} online again",
                                    lambda: online_workers(rig, stack.pool, updated), 90,
                                    stack.describe)
    assert set(workers) == {name}, workers
    (after,) = stack.running_containers("worker")
    assert after.id != before.id
    assert after.attrs["Config"]["Hostname"] == before.attrs["Config"]["Hostname"]

    run = rig.wait_for_final(sleepy, timeout=90)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    adopted = f"of flow run {run['name']!r}"
    stack.engine.wait_for("the new worker adopting the run's container", lambda: adopted in (
        after.logs().decode(errors="replace")), 30, lambda: after.logs().decode()[-3000:])
    assert run_hello(rig, stack) == name
