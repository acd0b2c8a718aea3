"""Integration fixtures: a real Prefect server, Docker, the test images, per-test pools."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
import requests
from testrig.engine import Engine
from testrig.faultproxy import FaultProxy
from testrig.prefect_rig import (
    FLOWS_IMAGE,
    PREFECT_IMAGE,
    REPO_DIR,
    PrefectRig,
    PrefectServer,
    build_flow_image,
    remove_pool_containers,
    start_prefect_server,
)
from testrig.registry import LocalRegistry
from testrig.swarm import SwarmEngine
from testrig.workers import WorkerProcess, worker_env

from dockerworker.ownership import LABEL_OWNER_POOL

SWARM_RUN_LABEL = "io.prefect.flow-run-id"  # on a Swarm job's service


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """A Prefect server on a free loopback port with a temp PREFECT_HOME (SQLite)."""
    try:
        server = start_prefect_server()
    except RuntimeError as exc:
        pytest.fail(f"could not start the Prefect server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The local Docker engine. Missing Docker is a failure, never a skip."""
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        pytest.fail(f"Docker engine not reachable (integration tests need it): {exc}", pytrace=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def flow_image(docker_client: docker.DockerClient) -> str:
    """Tag of the test flows image (tests/flows at /opt/flows), built once per session."""
    try:
        docker_client.images.get(PREFECT_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"image {PREFECT_IMAGE} is missing: run {REPO_DIR / 'images/build-local.sh'} first",
            pytrace=False,
        )
    try:
        return build_flow_image(docker_client)
    except docker.errors.BuildError as exc:
        output = "".join(str(chunk.get("stream", chunk)) for chunk in exc.build_log)
        pytest.fail(f"building {FLOWS_IMAGE} failed: {exc}\n{output}", pytrace=False)


@pytest.fixture
def rig(prefect_server: PrefectServer) -> Iterator[PrefectRig]:
    """REST helper bound to the session's Prefect server."""
    helper = PrefectRig(prefect_server.url)
    try:
        yield helper
    finally:
        helper.close()


@pytest.fixture
def unique_pool(
    request: pytest.FixtureRequest,
    docker_client: docker.DockerClient,
    prefect_server: PrefectServer,
) -> Iterator[str]:
    """A fresh work pool name (not created); afterwards its containers and the pool are removed."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(2)}"
    yield name
    remove_pool_containers(docker_client, name)
    for record in docker_client.containers.list(  # takeover records (ownership.py)
            all=True, sparse=True, filters={"label": f"{LABEL_OWNER_POOL}={name}"}):
        record.remove(force=True)
    cleanup = PrefectRig(prefect_server.url)
    try:
        cleanup.delete_work_pool(name)
    finally:
        cleanup.close()


@pytest.fixture
def start_worker(
    prefect_server: PrefectServer,
    unique_pool: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `dockerworker start --pool POOL ...` subprocesses; all stopped after the test
    (before `unique_pool` removes the pool's containers), their output printed on failure."""
    started: list[WorkerProcess] = []

    def start(pool: str, *args: str, api_url: str | None = None, ready: bool = True,
              name: str | None = None, env: dict[str, str] | None = None) -> WorkerProcess:
        """Each worker gets its own `--name` (several share this host) unless `name` is given,
        e.g. to restart one. With `ready`, return once it polls (so its pool exists). `env`
        adds variables (e.g. DOCKER_HOST of an engine of the test's own)."""
        env = worker_env(api_url or prefect_server.url, **(env or {}))
        log_path = tmp_path / f"worker-{len(started)}.log"
        name = name or f"{pool}-w{len(started)}"
        worker = WorkerProcess(
            ["--pool", pool, "--name", name, "--poll-interval", "1", *args], env, log_path
        )
        started.append(worker)
        if ready:
            worker.wait_for_output("polling pool")
        return worker

    yield start
    for worker in started:
        worker.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is None or failed.failed:
        for worker in started:
            print(f"--- {worker.log_path.name} ---\n{worker.output()}")


@pytest.fixture
def policy_file(tmp_path: Path) -> Callable[..., str]:
    """Write a policy file with the given rules; returns its path for `--policy`."""
    import json

    def write(**rules: object) -> str:
        path = tmp_path / f"policy-{secrets.token_hex(3)}.toml"
        lines = ["[policy]"] + [f"{key} = {json.dumps(value)}" for key, value in rules.items()]
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return write



@pytest.fixture
def fault_proxy(prefect_server: PrefectServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy on loopback in front of the session's server (`.url` for the
    worker); it stops itself after 15 minutes whatever happens."""
    with FaultProxy(prefect_server.port, lifetime=900) as proxy:
        yield proxy


def own_engine_place() -> dict[str, str]:
    """Root, bridge and subnet of this test process's second dockerd: pytest-xdist's
    processes (`make test` runs two) each have their own, the first (or only) the default."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if worker == 0:
        return {}
    return {"root": f"/tmp/dwr14-{worker}", "bridge": f"dwr14-{worker}-br0",
            "bridge_cidr": f"172.30.{40 + worker}.1/24"}


@pytest.fixture
def own_engine(docker_client: docker.DockerClient) -> Iterator[Engine]:
    """A second dockerd of the test's own (ENVIRONMENT.md), empty; afterwards it is stopped,
    its bridge and data dir are deleted and the machine's engine is checked to still run a
    container."""
    engine = Engine(**own_engine_place())
    try:
        engine.start()
    except RuntimeError as exc:
        engine.stop(check_host=False)
        pytest.fail(f"could not start a second dockerd: {exc}", pytrace=False)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def swarm_engine(docker_client: docker.DockerClient) -> Iterator[SwarmEngine]:
    """A single-node Swarm on a second dockerd of the session's own (never the machine's
    engine), made once: images loaded into it stay for the session's later tests. Afterwards
    it leaves the Swarm, stops, its bridges and data dir are deleted and the machine's engine
    is checked to still run a container."""
    engine = SwarmEngine()
    try:
        engine.start()
    except RuntimeError as exc:
        pytest.fail(f"could not start a Swarm engine of the tests' own: {exc}", pytrace=False)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def swarm(swarm_engine: SwarmEngine, flow_image: str,
          docker_client: docker.DockerClient) -> Iterator[SwarmEngine]:
    """The session's Swarm with the flows image; afterwards no job of the test is left, nor
    a Swarm secret of one (flow secrets on Swarm jobs)."""
    swarm_engine.load_images(docker_client, flow_image)
    yield swarm_engine
    for service in swarm_engine.client.services.list(filters={"label": SWARM_RUN_LABEL}):
        service.remove()
    for secret in swarm_engine.client.secrets.list(filters={"label": SWARM_RUN_LABEL}):
        secret.remove()


@pytest.fixture(scope="session")
def local_registry() -> Iterator[LocalRegistry]:
    """A container registry (Debian's docker-registry) on a loopback port, for the push path:
    no other registry is reachable here. Its storage is deleted afterwards."""
    registry = LocalRegistry()
    try:
        registry.start()
    except RuntimeError as exc:
        pytest.fail(f"could not start the local registry: {exc}", pytrace=False)
    try:
        yield registry
    finally:
        registry.stop()
