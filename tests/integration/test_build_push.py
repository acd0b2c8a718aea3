"""`--build-push` (issue 17): dependency images built by a Swarm worker are pushed to a
registry before the job is submitted, and the job names them by tag and digest, so any node
can pull them; on the tests' own Swarm and loopback registry (testrig/swarm.py, registry.py)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest
from testrig.prefect_rig import FLOWS_IMAGE, PrefectRig, free_port
from testrig.registry import LocalRegistry
from testrig.swarm import SwarmEngine
from testrig.workers import HOST_CA_BUNDLE, WorkerProcess

from dockerworker.builds import REPOSITORY_PREFIX, Builder, BuildOptions, BuildPlan

RUN_LABEL = "io.prefect.flow-run-id"


@pytest.fixture
def push_worker(start_worker, policy_file, swarm: SwarmEngine) -> Callable[..., WorkerProcess]:
    """`dockerworker start --runtime swarm --build-push REGISTRY` on the Swarm's manager."""
    policy = policy_file(no_new_privileges=False, allow_dockerfile_lines=True)

    def start(pool: str, registry: str) -> WorkerProcess:
        return start_worker(pool, "--runtime", "swarm", "--policy", policy,
                            "--build-push", registry, env={"DOCKER_HOST": swarm.host})

    return start


def messages(rig: PrefectRig, run_id: str) -> list[str]:
    return [log["message"] for log in rig.read_logs(run_id)]


def job_image(swarm: SwarmEngine, run_id: str) -> str:
    (job,) = swarm.client.services.list(filters={"label": f"{RUN_LABEL}={run_id}"})
    return str(job.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"])


def test_a_build_is_pushed_once_and_its_swarm_job_runs_it_by_the_registry_s_digest(
    rig: PrefectRig, push_worker, unique_pool: str, swarm: SwarmEngine,
    local_registry: LocalRegistry
) -> None:
    worker = push_worker(unique_pool, local_registry.address)
    deployment = rig.create_deployment(unique_pool, "flows.py:six_version", {
        "image": FLOWS_IMAGE, "pip_packages": ["six==1.16.0"]})
    first = rig.create_flow_run(deployment)
    run = rig.wait_for_final(first, timeout=300)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    rig.wait_for_log(first, "six version 1.16.0")

    # the job names the pushed image by tag and digest, and the registry serves that digest
    name, _, digest = job_image(swarm, first).partition("@")
    repository, _, key = name.rpartition(":")
    registry, _, path = repository.partition("/")
    assert registry == local_registry.address and path.startswith("dockerworker/"), name
    assert local_registry.tags(path) == [key]
    assert local_registry.digest(path, key) == digest
    rig.wait_for_log(first, f"pushed image {name}@{digest} to registry {registry}")

    second = rig.create_flow_run(deployment)
    assert rig.wait_for_final(second, timeout=120)["state"]["type"] == "COMPLETED"
    rig.wait_for_log(second, "six version 1.16.0")
    logged = messages(rig, second)
    assert any("cached, no build" in m for m in logged), logged
    assert any("before, not pushed again" in m for m in logged), logged
    assert not any(m.startswith("pushed image") for m in logged), logged
    assert job_image(swarm, second) == f"{name}@{digest}"
    assert worker.output().count("pushed image") == 1, worker.output()

    # a worker that did not push it (a restart, another manager) finds it in the registry
    options = BuildOptions(network_mode="host", ca_bundle=Path(HOST_CA_BUNDLE),
                           push=local_registry.address)
    found = Builder(swarm.client, options, holder="test").ensure(
        FLOWS_IMAGE, BuildPlan(["six==1.16.0"], "", []), path.removeprefix("dockerworker/"),
        lambda line: None)
    assert (found.built, found.push, found.reference) == (False, "present", f"{name}@{digest}")
    assert local_registry.tags(path) == [key]


def test_a_push_the_registry_refuses_crashes_the_run_naming_it_and_the_worker_goes_on(
    rig: PrefectRig, push_worker, unique_pool: str, swarm: SwarmEngine
) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    push_worker(unique_pool, closed)
    built = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": FLOWS_IMAGE, "dockerfile_lines": ["ENV DW_PUSH_TEST=1"], "infra_retries": 0})
    refused = rig.create_flow_run(built)
    state = rig.wait_for_final(refused, timeout=120)["state"]
    assert state["type"] == "CRASHED", state
    assert f"to registry {closed} failed" in state["message"], state["message"]
    assert "connection refused" in state["message"], state["message"]
    assert not swarm.client.services.list(filters={"label": f"{RUN_LABEL}={refused}"})

    plain = rig.create_deployment(unique_pool, "flows.py:hello", {"image": FLOWS_IMAGE})
    assert rig.wait_for_final(rig.create_flow_run(plain), timeout=120)["state"]["type"] == (
        "COMPLETED")


def test_with_the_docker_runtime_the_container_runs_the_pushed_reference(
    rig: PrefectRig, start_worker, policy_file, unique_pool: str, flow_image: str,
    docker_client, local_registry: LocalRegistry
) -> None:
    """On one engine the build is pushed too, and the container is created from the local
    copy by the same `REGISTRY/…:<hash>@<digest>` reference."""
    marker = uuid.uuid4().hex[:8]
    start_worker(unique_pool, "--policy", policy_file(allow_dockerfile_lines=True),
                 "--build-push", local_registry.address)
    deployment = rig.create_deployment(unique_pool, "flows.py:env_value", {
        "image": flow_image, "dockerfile_lines": [f"ENV DW_PUSHED={marker}"]})
    run_id = rig.create_flow_run(deployment, parameters={"name": "DW_PUSHED"})
    assert rig.wait_for_final(run_id, timeout=120)["state"]["type"] == "COMPLETED"
    rig.wait_for_log(run_id, f"DW_PUSHED={marker}")
    (container,) = docker_client.containers.list(all=True, filters={
        "label": f"{RUN_LABEL}={run_id}"})
    reference = container.attrs["Config"]["Image"]
    name, _, digest = reference.partition("@")
    repository, _, key = name.rpartition(":")
    path = repository.removeprefix(f"{local_registry.address}/")
    try:
        assert path.startswith("dockerworker/") and digest.startswith("sha256:"), reference
        assert local_registry.digest(path, key) == digest
        local = f"{REPOSITORY_PREFIX}{path.removeprefix('dockerworker/')}:{key}"
        assert container.image.id == docker_client.images.get(local).id
    finally:
        container.remove(force=True)
        for tag in (name, f"{REPOSITORY_PREFIX}{path.removeprefix('dockerworker/')}:{key}"):
            with contextlib.suppress(docker.errors.APIError):
                docker_client.images.remove(tag)
