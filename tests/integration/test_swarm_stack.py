"""compose/stack.yml on a single-node Swarm of the tests' own (issue 17, part A): server,
PostgreSQL and the global worker come up from `docker stack deploy`; a flow runs in a container
on the attachable overlay network; the worker's name is the per-node one and survives
`docker service update --force`, the new worker adopting the run the old one started."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
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
)
from testrig.swarm import SwarmEngine, SwarmStack

from dockerworker.containers import LABEL_FLOW_RUN_ID, LABEL_WORKER
from dockerworker.jobs import default_base_job_template


@pytest.fixture(scope="module")
def stack(swarm_engine: SwarmEngine, docker_client: docker.DockerClient,
          flow_image: str) -> Iterator[SwarmStack]:
    worker_image = build_worker_image(docker_client)
    swarm_engine.load_images(docker_client, LOCAL_POSTGRES, PREFECT_IMAGE, flow_image,
                             worker_image)
    tag = secrets.token_hex(2)
    stack = SwarmStack(
        swarm_engine, f"dw{tag}", f"t-swarm-{tag}", free_port(),
        {"postgres": LOCAL_POSTGRES, "server": PREFECT_IMAGE, "worker": worker_image},
        f"dw{tag}-prefect",
        DOCKERWORKER_POLL_INTERVAL="1", DOCKERWORKER_HEARTBEAT_INTERVAL="5",
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
def rig(stack: SwarmStack, flow_image: str) -> Iterator[PrefectRig]:
    """REST helper of the stack's server, once it is healthy, with the stack's pool carrying
    the overlay network (and the flow image) as defaults."""
    helper = PrefectRig(stack.api_url)
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
