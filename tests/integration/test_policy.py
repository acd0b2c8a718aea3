"""The operator's policy, hardened defaults, secrets and authentication (issue 6)."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from testrig.junk import junk_job_variables
from testrig.prefect_rig import POOL_LABEL, PrefectRig, start_prefect_server

from dockerworker.jobs import default_base_job_template

RUN_LABEL = "io.prefect.flow-run-id"
REFUSALS = {
    "privileged": ({"privileged": True}, "privileged: privileged containers are not allowed"),
    "root volume": ({"volumes": ["/:/host"]}, "volumes[0]: host path / is not under an allowed"),
    "host network": ({"network_mode": "host"}, "network_mode: 'host' is not allowed"),
    "cap_add": ({"container_create_kwargs": {"cap_add": ["SYS_ADMIN"]}},
                "container_create_kwargs.cap_add: not allowed"),
    "foreign image": ({"image": "registry.example.com/evil/miner:1"},
                      "image: 'registry.example.com/evil/miner:1' is not an allowed image"),
}


def policy_file(tmp_path: Path, **rules: Any) -> str:
    lines = ["[policy]"] + [f"{key} = {json.dumps(value)}" for key, value in rules.items()]
    path = tmp_path / "policy.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def creates_since(docker_client, since: datetime, pool: str) -> list[str]:
    events = docker_client.events(
        since=since, until=datetime.now(UTC), decode=True,
        filters={"type": "container", "event": "create", "label": f"{POOL_LABEL}={pool}"},
    )
    return [event["id"] for event in events]


def test_refused_requests_crash_naming_the_rule_and_create_nothing(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, tmp_path
) -> None:
    since = datetime.now(UTC)
    start_worker(unique_pool, "--policy",
                 policy_file(tmp_path, allowed_images=["docker.io/dockerworker-test/*"]))
    runs = {}
    for case, (asked, _) in REFUSALS.items():
        deployment = rig.create_deployment(
            unique_pool, "flows.py:hello", {"image": flow_image, **asked}
        )
        runs[case] = rig.create_flow_run(deployment)
    for case, run_id in runs.items():
        state = rig.wait_for_final(run_id, timeout=60)["state"]
        assert state["type"] == "CRASHED", (case, state)
        assert "refused by the worker's policy" in state["message"], case
        assert REFUSALS[case][1] in state["message"], (case, state["message"])
    time.sleep(1)
    assert creates_since(docker_client, since, unique_pool) == []


def test_the_same_requests_succeed_when_the_policy_allows_them(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, tmp_path
) -> None:
    allowing = policy_file(
        tmp_path,
        allow_privileged=True,
        allowed_volume_prefixes=["/"],
        allow_docker_socket=True,
        allowed_network_modes=["bridge", "host"],
        allowed_create_kwargs=["cap_add"],
    )
    start_worker(unique_pool, "--policy", allowing)
    runs = {}
    for case in ("root volume", "host network", "cap_add", "privileged"):
        deployment = rig.create_deployment(
            unique_pool, "flows.py:hello", {"image": flow_image, **REFUSALS[case][0]}
        )
        runs[case] = rig.create_flow_run(deployment)
    for case in ("root volume", "host network", "cap_add"):
        assert rig.wait_for_final(runs[case], timeout=120)["state"]["type"] == "COMPLETED", case
    # This engine cannot start privileged containers; the request must still reach Docker.
    state = rig.wait_for_final(runs["privileged"], timeout=60)["state"]
    assert "refused" not in state["message"]
    (container,) = docker_client.containers.list(
        all=True, filters={"label": f"{RUN_LABEL}={runs['privileged']}"}
    )
    assert container.attrs["HostConfig"]["Privileged"] is True


def test_a_default_container_is_hardened(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    run_id = rig.create_flow_run(deployment)
    assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"
    (container,) = docker_client.containers.list(
        all=True, filters={"label": f"{RUN_LABEL}={run_id}"}
    )
    host = container.attrs["HostConfig"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["PidsLimit"] == 2048
    assert host["Privileged"] is False
    assert not any("docker.sock" in bind for bind in host.get("Binds") or [])


def test_malformed_job_variable_documents_end_with_a_clear_message(
    rig: PrefectRig, start_worker, unique_pool: str
) -> None:
    """A pool whose template accepts anything (as a hand-written one may): the worker must
    judge every document itself, with a clear message, and never die. Forty documents through
    a real server (the same generator runs a thousand through the worker's own path in
    tests/unit/test_runs.py)."""
    template = default_base_job_template()
    template["variables"] = {  # every variable declared, none typed
        "type": "object", "properties": {name: {} for name in template["job_configuration"]},
    }
    rig.create_work_pool(unique_pool, base_job_template=template)
    # none gets as far as a container: no reason to take them two at a time
    worker = start_worker(unique_pool, "--max-starting", "20")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": "dockerworker-test/absent:fuzz", "image_pull_policy": "Never"})
    rng = random.Random(20261129)
    runs = []
    for _ in range(40):
        document = junk_job_variables(rng)
        runs.append((rig.create_flow_run(deployment, job_variables=document), document))
    clear = ("invalid job variables: ", "refused by the worker's policy: ", "image ")
    for run_id, document in runs:
        state = rig.wait_for_final(run_id, timeout=180)["state"]
        assert state["type"] == "CRASHED", (document, state)
        assert state["message"].startswith(clear), (document, state["message"][:300])
        assert "Traceback" not in state["message"]
        assert len(state["message"]) < 3000
    assert worker.alive()
    assert "unexpected worker error" not in worker.output()


def test_the_api_key_never_shows(
    rig: PrefectRig, prefect_server, start_worker, unique_pool: str, flow_image: str, tmp_path
) -> None:
    key = "pnu_dockerworker_test_key_0123456789"
    from testrig.workers import WorkerProcess, worker_env

    env = worker_env(prefect_server.url, PREFECT_API_KEY=key)
    worker = WorkerProcess(["--pool", unique_pool, "--name", f"{unique_pool}-k",
                            "--poll-interval", "1"], env, tmp_path / "worker.log")
    try:
        worker.wait_for_output("polling pool")
        command = "sh -c 'echo the key is $PREFECT_API_KEY; echo $PREFECT_API_KEY >&2; exit 1'"
        deployment = rig.create_deployment(
            unique_pool, "flows.py:hello", {"image": flow_image, "command": command}
        )
        run_id = rig.create_flow_run(deployment)
        state = rig.wait_for_final(run_id)["state"]
        assert state["type"] == "CRASHED" and "the key is ***" in state["message"]
        time.sleep(2)
    finally:
        worker.stop()
    logs = json.dumps(rig.read_logs(run_id))
    assert "the key is ***" in logs
    assert key not in logs and key not in state["message"] and key not in worker.output()


@pytest.mark.parametrize("right", [True, False], ids=["right-string", "wrong-string"])
def test_server_with_basic_auth(
    right: bool, start_worker, unique_pool: str, flow_image: str, tmp_path: Path
) -> None:
    from testrig.workers import WorkerProcess, worker_env

    auth = "admin:correct-horse"
    with start_prefect_server(env={"PREFECT_SERVER_API_AUTH_STRING": auth}) as server:
        given = auth if right else "admin:wrong-password"
        env = worker_env(server.url, PREFECT_API_AUTH_STRING=given)
        worker = WorkerProcess(["--pool", unique_pool, "--name", f"{unique_pool}-a",
                                "--poll-interval", "1"], env, tmp_path / "worker.log")
        try:
            if not right:
                worker.wait_for_output("rejected", timeout=30)
                time.sleep(3)
                assert worker.alive(), worker.output()
                assert "wrong-password" not in worker.output()
                return
            worker.wait_for_output("polling pool")
            rig = PrefectRig(server.url, auth=("admin", "correct-horse"))
            deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                               {"image": flow_image})
            run = rig.wait_for_final(rig.create_flow_run(deployment), timeout=120)
            assert run["state"]["type"] == "COMPLETED", run["state"]
            rig.close()
        finally:
            worker.stop()


def test_gpus_refused_by_default_and_reach_docker_when_allowed(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, tmp_path
) -> None:
    deployment_job = {"image": flow_image, "gpus": "all"}
    start_worker(unique_pool, name=f"{unique_pool}-default")
    refused = rig.create_deployment(unique_pool, "flows.py:hello", deployment_job)
    state = rig.wait_for_final(rig.create_flow_run(refused))["state"]
    assert "gpus: GPU access ('all') is not allowed (allow_gpus)" in state["message"]

    gpu_pool = f"{unique_pool}-gpu"
    start_worker(gpu_pool, "--policy", policy_file(tmp_path, allow_gpus=True))
    try:
        allowed = rig.create_deployment(gpu_pool, "flows.py:hello", deployment_job)
        run_id = rig.create_flow_run(allowed)
        state = rig.wait_for_final(run_id)["state"]
        # No GPU runtime on this machine: Docker's own refusal is the clear message.
        assert state["type"] == "CRASHED"
        assert "could not start the flow run's container" in state["message"]
        assert "gpu" in state["message"].lower()
        (container,) = docker_client.containers.list(
            all=True, filters={"label": f"{RUN_LABEL}={run_id}"}
        )
        (request,) = container.attrs["HostConfig"]["DeviceRequests"]
        assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{POOL_LABEL}={gpu_pool}"}
        ):
            container.remove(force=True)
        rig.delete_work_pool(gpu_pool)
