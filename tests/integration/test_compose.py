"""The compose stack from compose/: PostgreSQL, the Prefect server, 3 worker replicas, and
Prometheus (profile `monitoring`) scraping them. One stack for the module: bringing it up is
most of these tests' time."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from testrig.prefect_rig import (
    ComposeStack,
    PrefectRig,
    compose_stack,
    free_port,
    remove_pool_containers,
)
from testrig.prometheus import PrometheusAPI, fast_config, poll

WORKER_NAME_LABEL = "io.prefect.worker-name"
HEALTH_PORT = 8080  # DOCKERWORKER_HEALTH_PORT in compose/docker-compose.yml


@pytest.fixture(scope="module")
def stack(
    docker_client: docker.DockerClient, flow_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeStack]:
    pool = f"t-compose-{secrets.token_hex(2)}"
    config = fast_config(tmp_path_factory.mktemp("prometheus"))
    stack = compose_stack(docker_client, pool, f"dwtest{secrets.token_hex(3)}", free_port(),
                          prometheus_port=free_port(), prometheus_config=config)
    up = stack.up()
    try:
        assert up.returncode == 0, up.stdout + up.stderr + stack.logs()
        yield stack
    finally:
        print(stack.logs()[-6000:])
        stack.down()
        remove_pool_containers(docker_client, pool)


@pytest.fixture
def rig(stack: ComposeStack) -> Iterator[PrefectRig]:
    """REST helper bound to the stack's own Prefect server."""
    helper = PrefectRig(stack.api_url, auth=stack.auth)
    try:
        yield helper
    finally:
        helper.close()


def run_flows(rig: PrefectRig, stack: ComposeStack, flow_image: str, count: int) -> None:
    """`count` runs of flows.py:hello on the stack's pool, each COMPLETED."""
    deployment = rig.create_deployment(
        stack.pool, "flows.py:hello", {"image": flow_image, "networks": [stack.network]}
    )
    runs = [rig.create_flow_run(deployment) for _ in range(count)]
    states = [rig.wait_for_final(run, timeout=300)["state"] for run in runs]
    assert [s["type"] for s in states] == ["COMPLETED"] * count, states


def test_compose_stack_runs_flows_over_three_replicas(
    stack: ComposeStack, rig: PrefectRig, flow_image: str, docker_client
) -> None:
    """Nine runs through the stack's three replicas: each COMPLETED in exactly one container,
    and the three replicas still up. Which replica takes how many is not asserted: replicas on
    one engine share the start bound (admission.py), so the one that starts first may take a
    short burst whole, and a parallel test's containers on the same engine hold the others
    back too."""
    stack.wait_for_workers(3)
    before = len(pool_containers(docker_client, stack.pool))
    run_flows(rig, stack, flow_image, 9)
    by_worker = Counter(c.labels[WORKER_NAME_LABEL]
                        for c in pool_containers(docker_client, stack.pool))
    assert sum(by_worker.values()) == before + 9, by_worker
    assert set(by_worker) <= {w["name"] for w in stack.wait_for_workers(3)}, by_worker


def test_the_stack_keeps_its_secrets_out_of_inspect_env_and_output(
    stack: ComposeStack, docker_client
) -> None:
    """The server needs the auth string; the workers read it from their secret file: the
    value is in no service's `docker inspect`, no worker's process environment or output.
    Unauthenticated requests are refused."""
    stack.wait_for_workers(3)
    assert stack.auth is not None
    password = stack.auth[1]
    postgres_password = (Path(stack.env["SECRETS_DIR"]) / "postgres_password").read_text().strip()
    assert httpx.post(f"{stack.api_url}/work_pools/filter", json={}, trust_env=False,
                      timeout=10).status_code == 401
    services = docker_client.containers.list(
        filters={"label": f"com.docker.compose.project={stack.project}"})
    assert {c.labels["com.docker.compose.service"] for c in services} >= {
        "postgres", "server", "worker"}
    for container in services:
        inspected = json.dumps(container.attrs)
        assert password not in inspected and postgres_password not in inspected, container.name
        if container.labels["com.docker.compose.service"] == "worker":
            environ = container.exec_run(["cat", "/proc/1/environ"]).output.decode()
            assert "PREFECT_API_AUTH_STRING_FILE=/run/secrets/prefect_auth_string" in environ
            assert password not in environ
            assert password not in container.logs().decode(errors="replace")


def test_prometheus_scrapes_every_replica_and_counts_their_runs(
    stack: ComposeStack, rig: PrefectRig, flow_image: str, docker_client
) -> None:
    """Every replica is a target found through DNS and up; after the runs, the runs-finished
    counter summed over replicas is the number of runs the pool ended, and per replica the
    number of run containers that replica started. Rules and alerts load and evaluate."""
    stack.wait_for_workers(3)
    prometheus = PrometheusAPI(stack.prometheus_url)
    try:
        prometheus.wait_ready()
        replicas = replica_addresses(docker_client, stack)
        assert len(replicas) == 3, replicas
        poll(lambda: prometheus.targets("dockerworker"),
             lambda targets: targets == dict.fromkeys(replicas, "up"),
             60, f"every replica {sorted(replicas)} a target, up")

        run_flows(rig, stack, flow_image, 4)
        ended = ended_runs(rig, stack.pool)  # this test's 4, and the module's earlier runs
        assert set(ended) == {"COMPLETED"}, ended
        per_worker = Counter(c.labels[WORKER_NAME_LABEL]
                             for c in pool_containers(docker_client, stack.pool))
        assert sum(per_worker.values()) == ended["COMPLETED"], (per_worker, ended)
        expected = {address: float(per_worker[name]) for address, name in replicas.items()
                    if per_worker[name]}

        finished = 'dockerworker_runs_finished_total{job="dockerworker", state="completed"}'

        def read() -> tuple[dict[str, float], dict[str, float]]:
            return (prometheus.query(f"sum({finished})"),
                    prometheus.query(f"sum by (instance) ({finished})", by="instance"))

        total, by_instance = poll(
            read, lambda got: got[1] == expected or sum(got[1].values()) > ended["COMPLETED"],
            60, f"runs finished: {ended['COMPLETED']} in all, {expected} by replica")
        assert total == {"": float(ended["COMPLETED"])}, total
        assert by_instance == expected, by_instance

        rules = prometheus.rules()
        assert {"DockerworkerDown", "DockerworkerAbsent", "DockerworkerRunsCrashing",
                "DockerworkerPickupSlow", "DockerworkerLogLinesDropped",
                "state:dockerworker_runs_finished:rate5m",
                "job:dockerworker_pickup_seconds:p95_10m"} <= set(rules), rules
        recorded = poll(
            lambda: prometheus.query('state:dockerworker_runs_finished:rate5m', by="state"),
            # present, not necessarily > 0: a replica's series may appear at its final value
            lambda got: "completed" in got, 30, "the recording rule evaluated")
        assert set(recorded) == {"completed"}, recorded
        assert set(prometheus.rules().values()) == {"ok"}, prometheus.rules()
        assert prometheus.query('ALERTS{alertstate="firing"}', by="alertname") == {}
    finally:
        prometheus.close()


def pool_containers(client: docker.DockerClient, pool: str) -> list:
    return client.containers.list(all=True, filters={"label": f"io.prefect.work-pool-name={pool}"})


def replica_addresses(client: docker.DockerClient, stack: ComposeStack) -> dict[str, str]:
    """Each worker replica's scrape address on the stack's network → its worker name (what
    cli.py derives from compose's labels, and what its run containers carry)."""
    replicas = client.containers.list(filters={"label": [
        f"com.docker.compose.project={stack.project}", "com.docker.compose.service=worker"]})
    return {
        f"{c.attrs['NetworkSettings']['Networks'][stack.network]['IPAddress']}:{HEALTH_PORT}":
            f"dockerworker-{stack.project}-worker-{c.labels['com.docker.compose.container-number']}"
        for c in replicas
    }


def ended_runs(rig: PrefectRig, pool: str) -> Counter[str]:
    """The pool's runs by state type; every run of the pool must have ended."""
    runs = rig._call("POST", "/flow_runs/filter",
                     {"work_pools": {"name": {"any_": [pool]}}, "limit": 200})
    states = Counter(run["state"]["type"] for run in runs)
    assert not set(states) - {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, states
    return states

