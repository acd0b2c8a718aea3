"""The compose stack from compose/: PostgreSQL, the Prefect server, 3 worker replicas."""

from __future__ import annotations

import secrets
from collections import Counter

import pytest
from testrig.prefect_rig import PrefectRig, compose_stack, free_port


@pytest.fixture
def stack(docker_client, unique_pool: str, flow_image: str):
    stack = compose_stack(docker_client, unique_pool, f"dwtest{secrets.token_hex(3)}",
                          free_port())
    up = stack.up()
    try:
        assert up.returncode == 0, up.stdout + up.stderr + stack.logs()
        yield stack
    finally:
        print(stack.logs()[-6000:])
        stack.down()


def test_compose_stack_runs_flows_over_three_replicas(
    stack, unique_pool: str, flow_image: str, docker_client
) -> None:
    stack.wait_for_workers(3)
    rig = PrefectRig(stack.api_url)
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "networks": [stack.network]}
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
