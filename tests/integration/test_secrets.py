"""Secrets the Docker way, with a real server and real containers: the worker's own auth
string from a file (absent from its environment and output, a rotated file picked up without
a restart), and a flow given a secret as a file in a tmpfs (absent from `docker inspect`,
`docker diff`, the run's logs and the worker's output); a secret the policy does not allow is
refused before any container exists."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import docker
from testrig.prefect_rig import POOL_LABEL, PrefectRig, log_messages, start_prefect_server
from testrig.workers import WorkerProcess, worker_env


def _environ_of(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode()


def test_worker_reads_its_auth_string_from_a_file_and_a_rotated_one_without_restart(
    unique_pool: str, flow_image: str, tmp_path: Path
) -> None:
    password = secrets.token_hex(12)
    auth = f"admin:{password}"
    secret_file = tmp_path / "prefect_auth_string"
    secret_file.write_text("admin:not-yet-the-right-one\n")  # as before a rotation
    with start_prefect_server(env={"PREFECT_SERVER_API_AUTH_STRING": auth}) as server:
        env = worker_env(server.url, PREFECT_API_AUTH_STRING_FILE=str(secret_file))
        worker = WorkerProcess(["--pool", unique_pool, "--name", f"{unique_pool}-a",
                                "--poll-interval", "1"], env, tmp_path / "worker.log")
        rig = PrefectRig(server.url, auth=("admin", password))
        try:
            worker.wait_for_output("rejected", timeout=30)
            secret_file.write_text(auth + "\n")  # the operator rotates the secret
            worker.wait_for_output("polling pool", timeout=60)
            assert "rotated secret" in worker.output()
            deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                               {"image": flow_image})
            run = rig.wait_for_final(rig.create_flow_run(deployment), timeout=120)
            assert run["state"]["type"] == "COMPLETED", run["state"]
            assert password not in _environ_of(worker.process.pid)
            assert "PREFECT_API_AUTH_STRING_FILE" in _environ_of(worker.process.pid)
        finally:
            rig.close()
            worker.stop()
        assert password not in worker.output(), worker.output()


def _flow_containers(client: docker.DockerClient, pool: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{POOL_LABEL}={pool}"})


def test_a_flow_reads_an_allowed_secret_from_its_file_and_nothing_shows_it(
    rig: PrefectRig, start_worker: Callable[..., WorkerProcess], unique_pool: str,
    flow_image: str, docker_client: docker.DockerClient, policy_file, tmp_path: Path,
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    value = "pg-" + secrets.token_hex(16)
    (secrets_dir / "db_password").write_text(value)
    policy = policy_file(allowed_secrets=["db_*"])
    worker = start_worker(unique_pool, "--policy", policy, "--secrets-dir", str(secrets_dir),
                          "--warm", "1")
    deployment = rig.create_deployment(
        unique_pool, "flows.py:secret_length", {"image": flow_image, "secrets": ["db_password"]})
    for attempt in ("cold", "warm"):
        run_id = rig.create_flow_run(deployment)
        run = rig.wait_for_final(run_id, timeout=180)
        assert run["state"]["type"] == "COMPLETED", (attempt, run["state"], worker.output())
        rig.wait_for_log(run_id, "secret value: ***")
        logs = rig.read_logs(run_id)
        assert f"secret db_password has {len(value)} characters" in log_messages(logs), attempt
        assert value not in json.dumps(logs)
    assert "took over the run" in worker.output()  # the second run was handed a warm container

    containers = _flow_containers(docker_client, unique_pool)  # the runs', a waiting warm one
    ran = [c for c in containers if not c.name.startswith("dockerworker-warm-")]
    assert len(ran) == 2, [c.name for c in containers]
    for container in containers:
        container.reload()
        assert value not in json.dumps(container.attrs)  # env, labels, command, mounts
        options = set(container.attrs["HostConfig"]["Tmpfs"]["/run/secrets"].split(","))
        assert {"rw", "noexec", "nosuid", "nodev", "size=4m"} <= options, options
        assert not [c for c in container.diff() or [] if c["Path"].startswith("/run/secrets/")]
    time.sleep(1)
    assert value not in worker.output()


def test_a_secret_the_policy_does_not_allow_is_refused_before_any_container(
    rig: PrefectRig, start_worker: Callable[..., WorkerProcess], unique_pool: str,
    flow_image: str, docker_client: docker.DockerClient, policy_file, tmp_path: Path,
) -> None:
    """Not allowed by name; and the worker's own credential, in the same directory as in
    compose and Swarm, refused even when a glob allows its name."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "root_password").write_text("never-given-" + secrets.token_hex(8))
    own_key = "pnu_" + secrets.token_hex(12)
    (secrets_dir / "prefect_api_key").write_text(own_key + "\n")
    (secrets_dir / "db_copy_of_the_key").write_text(own_key)
    worker = start_worker(
        unique_pool, "--policy", policy_file(allowed_secrets=["db_*", "prefect_*"]),
        "--secrets-dir", str(secrets_dir),
        env={"PREFECT_API_KEY_FILE": str(secrets_dir / "prefect_api_key")})
    expected = {
        "root_password":
            "secrets[0]: secret 'root_password' is not allowed (allowed_secrets: ['db_*', "
            "'prefect_*'])",
        "prefect_api_key":
            "secrets: 'prefect_api_key' holds one of the worker's own credentials",
        "db_copy_of_the_key":
            "secrets: 'db_copy_of_the_key' holds one of the worker's own credentials",
    }
    runs = {name: rig.create_flow_run(rig.create_deployment(
        unique_pool, "flows.py:secret_length", {"image": flow_image, "secrets": [name]},
        parameters={"name": name})) for name in expected}
    for name, run_id in runs.items():
        state = rig.wait_for_final(run_id, timeout=60)["state"]
        assert state["type"] == "CRASHED", state
        assert expected[name] in state["message"], state
        assert own_key not in json.dumps(rig.read_logs(run_id))
    assert _flow_containers(docker_client, unique_pool) == []
    assert own_key not in worker.output()
