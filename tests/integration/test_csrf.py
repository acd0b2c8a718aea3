"""Servers with CSRF protection on, both majors (issue 15): the worker fetches a token, sends
it with every write, fetches a new one when it expires or is refused, and never reads the
protection's 403 as rejected credentials. The flow containers' own Prefect clients handle
the protection themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import docker
import pytest
from testrig.prefect_rig import (
    FLOWS2_IMAGE,
    PREFECT2_IMAGE,
    PREFECT2_VERSION,
    PrefectRig,
    PrefectServer,
    build_flow_image,
    start_prefect_server,
)

from dockerworker.api import PrefectAPI

TOKEN_SECONDS = 40  # with the worker's 30 s margin: a new token every ~10 s of writes


@pytest.fixture(scope="module", params=[None, PREFECT2_VERSION], ids=["prefect3", "prefect2"])
def prefect_server(request: pytest.FixtureRequest) -> Iterator[PrefectServer]:
    """A server of each major with CSRF protection on and short-lived tokens."""
    env = {"PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
           "PREFECT_SERVER_CSRF_TOKEN_EXPIRATION": f"PT{TOKEN_SECONDS}S"}
    try:
        server = start_prefect_server(env=env, version=request.param, timeout=120)
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"could not start a Prefect server with CSRF protection: {exc}",
                    pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def flow_image(prefect_server: PrefectServer, docker_client: docker.DockerClient) -> str:
    """The flows image of the server's major."""
    if prefect_server.major == 2:
        return build_flow_image(docker_client, FLOWS2_IMAGE, PREFECT2_IMAGE)
    return build_flow_image(docker_client)


def test_the_server_wants_tokens(prefect_server: PrefectServer) -> None:
    bare = PrefectRig(prefect_server.url)
    try:
        refused = bare.http.post("/work_pools/filter", json={})
        assert refused.status_code == 403 and "CSRF" in refused.text
    finally:
        bare.close()


def test_runs_complete_and_their_output_is_shipped(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    worker = start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:prints_three",
                                       {"image": flow_image})
    started = time.monotonic()
    for count in (1, 2):  # then two at once, after the first token's refresh point
        run_ids = [rig.create_flow_run(deployment) for _ in range(count)]
        for run_id in run_ids:
            assert rig.wait_for_final(run_id, timeout=120)["state"]["type"] == "COMPLETED"
            rig.wait_for_log(run_id, "line three")  # POST /logs/ carried a token
        while time.monotonic() - started < TOKEN_SECONDS - 25:
            time.sleep(0.5)
    assert "rejected" not in worker.output(), worker.output()


def test_a_refused_token_is_refreshed(prefect_server: PrefectServer, rig: PrefectRig) -> None:
    api = PrefectAPI(prefect_server.url, patience=5)
    try:
        api.probe_work_pools()  # a POST: fetches the first token
        first = api._csrf.token
        assert api._csrf.enabled and first
        # Someone asks a token for the same client id: the server now refuses ours.
        rig.csrf_token(api._csrf.client)
        api.probe_work_pools()  # refused once, then sent again with a new token
        assert api._csrf.token not in (None, first)
        assert api._csrf.expires is not None and api._csrf.expires > datetime.now(UTC)
    finally:
        api.close()
