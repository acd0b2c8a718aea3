"""`--runtime swarm` (issue 17 B): each flow run a Swarm job on a Swarm of the tests' own (a
second dockerd, never the machine's engine), with the worker talking to its manager socket."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest
from testrig.prefect_rig import FLOWS_IMAGE, PrefectRig
from testrig.swarm import FAKE_GPU, GPU_KIND, SwarmEngine
from testrig.workers import WorkerProcess

RUN_LABEL = "io.prefect.flow-run-id"


@pytest.fixture
def swarm_worker(start_worker, policy_file, swarm: SwarmEngine) -> Callable[..., WorkerProcess]:
    """`dockerworker start --runtime swarm` against the Swarm's manager socket, with the
    policy a Swarm worker needs (Swarm services cannot take no-new-privileges here)."""
    def start(pool: str, *args: str, rules: dict[str, object] | None = None,
              **kwargs: object) -> WorkerProcess:
        policy = policy_file(no_new_privileges=False, **(rules or {}))
        return start_worker(pool, "--runtime", "swarm", "--policy", policy, *args,
                            env={"DOCKER_HOST": swarm.host}, **kwargs)

    return start


def jobs_of(swarm: SwarmEngine, run_id: str) -> list:
    return swarm.client.services.list(filters={"label": f"{RUN_LABEL}={run_id}"})


def messages(rig: PrefectRig, run_id: str) -> list[str]:
    return [log["message"] for log in rig.read_logs(run_id)]


def test_runs_as_swarm_jobs_complete_fail_and_die_of_oom(
    rig: PrefectRig, swarm_worker, unique_pool: str, swarm: SwarmEngine
) -> None:
    swarm_worker(unique_pool)
    hello = rig.create_deployment(unique_pool, "flows.py:hello", {"image": FLOWS_IMAGE})
    fails = rig.create_deployment(unique_pool, "flows.py:fails", {"image": FLOWS_IMAGE})
    hog = rig.create_deployment(unique_pool, "flows.py:allocate",
                                {"image": FLOWS_IMAGE, "mem_limit": "256m"})
    # a job's own command as a string, as containers take it (a service takes only a list)
    exits = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": FLOWS_IMAGE, "command": "sh -c 'echo last words on swarm; exit 3'"})
    completed = rig.create_flow_run(hello, parameters={"name": "swarm"})
    failed = rig.create_flow_run(fails)
    oom = rig.create_flow_run(hog, parameters={"mb": 768})
    exited = rig.create_flow_run(exits)

    # placed by Swarm: while it runs, the run is a one-shot service with one task
    deadline = time.monotonic() + 60
    while not jobs_of(swarm, completed):
        assert time.monotonic() < deadline, "no Swarm job for the run"
        time.sleep(0.5)
    (job,) = jobs_of(swarm, completed)
    assert "ReplicatedJob" in job.attrs["Spec"]["Mode"]
    assert job.attrs["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"

    run = rig.wait_for_final(completed, timeout=120)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    host, _, service_id = run["infrastructure_pid"].rpartition(":")
    assert host == f"swarm-{swarm.client.swarm.attrs['ID']}" and service_id == job.id
    rig.wait_for_log(completed, "hello, swarm")  # the task's output, shipped from its logs
    assert messages(rig, completed).count("hello, swarm") == 1
    assert rig.wait_for_final(failed, timeout=120)["state"]["type"] == "FAILED"
    state = rig.wait_for_final(oom, timeout=120)["state"]
    assert state["type"] == "CRASHED"
    assert "out of memory (mem_limit 256m)" in state["message"], state["message"]
    state = rig.wait_for_final(exited, timeout=120)["state"]
    assert state["type"] == "CRASHED"
    assert "exited with code 3" in state["message"], state["message"]
    assert "last words on swarm" in state["message"], state["message"]


def test_a_cancelled_job_is_cancelled_by_prefect_s_engine_and_its_service_gone(
    rig: PrefectRig, swarm_worker, unique_pool: str, swarm: SwarmEngine
) -> None:
    """No stdin on Swarm (and Docker 20.10 leaves a removed job's task running): the entry
    script sees CANCELLING itself and hands it to Prefect's engine, which reports CANCELLED
    and runs the flow's hook; then the service is removed."""
    swarm_worker(unique_pool)
    sleepy = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": FLOWS_IMAGE})
    run_id = rig.create_flow_run(sleepy, parameters={"seconds": 120})
    rig.wait_for_state(run_id, "RUNNING", timeout=90)
    rig.set_state(run_id, "CANCELLING", force=True)
    run = rig.wait_for_final(run_id, timeout=60)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert "CRASHED" not in rig.read_states(run_id)
    # reported by Prefect's engine in the task (the worker's own verdict would say the
    # container is gone): the stop signal reached it as a cancellation
    assert "is gone" not in (run["state"]["message"] or ""), run["state"]
    rig.wait_for_log(run_id, "on_cancellation hook ran")
    deadline = time.monotonic() + 20
    while jobs_of(swarm, run_id):
        assert time.monotonic() < deadline, "the cancelled run's service is still there"
        time.sleep(0.5)


def test_placement_on_a_label_no_node_has_waits_with_the_reason_until_one_does(
    rig: PrefectRig, swarm_worker, unique_pool: str, swarm: SwarmEngine
) -> None:
    swarm_worker(unique_pool)
    label = f"dw-tier-{unique_pool[-4:]}"
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": FLOWS_IMAGE, "placement": [f"node.labels.{label}==batch"]})
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_log(run_id, "Swarm has not placed the job yet", timeout=60)
    reason = next(m for m in messages(rig, run_id) if "Swarm has not placed" in m)
    assert "no suitable node" in reason, reason
    assert rig.read_flow_run(run_id)["state"]["type"] == "PENDING"
    node = swarm.client.nodes.list()[0]
    spec = node.attrs["Spec"]
    spec["Labels"] = {**spec.get("Labels", {}), label: "batch"}
    node.update(spec)
    try:
        assert rig.wait_for_final(run_id, timeout=120)["state"]["type"] == "COMPLETED"
    finally:
        node.reload()
        spec = node.attrs["Spec"]
        spec["Labels"].pop(label, None)
        node.update(spec)


def test_a_restarted_worker_adopts_its_running_job(
    rig: PrefectRig, swarm_worker, unique_pool: str, swarm: SwarmEngine
) -> None:
    first = swarm_worker(unique_pool, name="swarm-w")
    ticker = rig.create_deployment(unique_pool, "flows.py:ticker", {"image": FLOWS_IMAGE})
    run_id = rig.create_flow_run(ticker, parameters={"seconds": 12})
    rig.wait_for_log(run_id, "tick 2", timeout=90)
    first.process.kill()  # no goodbye: the job runs on without its worker
    first.process.wait(10)
    second = swarm_worker(unique_pool, name="swarm-w")
    second.wait_for_output("adopting")
    assert rig.wait_for_final(run_id, timeout=90)["state"]["type"] == "COMPLETED"
    (job,) = jobs_of(swarm, run_id)
    assert job.attrs.get("JobStatus", {}).get("JobIteration", {}).get("Index", 0) == 0  # once
    rig.wait_for_log(run_id, "tick 12")
    ticks = [m for m in messages(rig, run_id) if m.startswith("tick ")]
    assert sorted(ticks, key=lambda t: int(t.split()[1])) == [f"tick {i}" for i in range(1, 13)]


def test_a_second_task_of_a_running_run_does_not_run_the_flow_again(
    rig: PrefectRig, swarm_worker, unique_pool: str, swarm: SwarmEngine
) -> None:
    """Swarm may start a job's task twice (a known bug): the second container, started here
    by hand with the job's own settings while the run is RUNNING, refuses and exits."""
    swarm_worker(unique_pool)
    ticker = rig.create_deployment(unique_pool, "flows.py:ticker", {"image": FLOWS_IMAGE})
    run_id = rig.create_flow_run(ticker, parameters={"seconds": 8})
    rig.wait_for_state(run_id, "RUNNING", timeout=90)
    (job,) = jobs_of(swarm, run_id)
    spec = job.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]
    try:
        output = swarm.client.containers.run(
            spec["Image"].split("@")[0], spec.get("Args"), environment=spec["Env"],
            network_mode="host", remove=True, stdout=True, stderr=True)
    except docker.errors.ContainerError as exc:
        pytest.fail(f"the duplicate failed instead of refusing: {exc}")
    assert b"another task runs or ran it; this one does not run it again" in output
    assert b"tick 1" not in output
    assert rig.wait_for_final(run_id, timeout=90)["state"]["type"] == "COMPLETED"
    rig.wait_for_log(run_id, "tick 8")  # the output is shipped after the state, in batches
    ticks = [m for m in messages(rig, run_id) if m.startswith("tick ")]
    assert sorted(ticks) == [f"tick {i}" for i in range(1, 9)], ticks  # once each, no more


def test_a_gpu_count_is_placed_where_swarm_has_one_free_and_two_wait_with_the_reason(
    rig: PrefectRig, start_worker, policy_file, unique_pool: str, swarm: SwarmEngine
) -> None:
    """The rig's node advertises one fake GPU (generic resource NVIDIA-GPU=GPU-fake0): a run
    asking for one is placed and Swarm hands it the GPU's id; one asking for two stays
    PENDING, its logs saying why in Swarm's words."""
    policy = policy_file(no_new_privileges=False, allow_gpus=True)
    start_worker(unique_pool, "--runtime", "swarm", "--policy", policy,
                 env={"DOCKER_HOST": swarm.host})
    variable = f"DOCKER_RESOURCE_{GPU_KIND}"  # Swarm's name: DOCKER_RESOURCE_<KIND>, upper-cased
    one = rig.create_deployment(unique_pool, "flows.py:env_value",
                                {"image": FLOWS_IMAGE, "gpus": 1})
    two = rig.create_deployment(unique_pool, "flows.py:env_value",
                                {"image": FLOWS_IMAGE, "gpus": 2})
    placed = rig.create_flow_run(one, parameters={"name": variable})
    waiting = rig.create_flow_run(two, parameters={"name": variable})

    assert rig.wait_for_final(placed, timeout=120)["state"]["type"] == "COMPLETED"
    rig.wait_for_log(placed, f"{variable}={FAKE_GPU}")
    (job,) = jobs_of(swarm, placed)
    reservations = job.attrs["Spec"]["TaskTemplate"]["Resources"]["Reservations"]
    assert reservations["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": GPU_KIND, "Value": 1}}]

    rig.wait_for_log(waiting, "Swarm has not placed the job yet", timeout=60)
    reason = next(m for m in messages(rig, waiting) if "Swarm has not placed" in m)
    assert "insufficient resources" in reason, reason
    assert rig.read_flow_run(waiting)["state"]["type"] == "PENDING"


def secrets_of(swarm: SwarmEngine, run_id: str) -> list:
    return swarm.client.secrets.list(filters={"label": f"{RUN_LABEL}={run_id}"})


def task_container(swarm: SwarmEngine, run_id: str) -> tuple[dict, dict]:
    """The run's job service and its task's container, inspected while they exist."""
    for job in jobs_of(swarm, run_id):
        for task in swarm.client.api.tasks(filters={"service": job.id}):
            container = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
            if container:
                return job.attrs, swarm.client.api.inspect_container(container)
    raise LookupError("no task container yet")


def test_a_flow_reads_its_secret_as_a_swarm_secret_and_nothing_shows_it(
    rig: PrefectRig, swarm_worker, unique_pool: str, swarm: SwarmEngine, tmp_path: Path
) -> None:
    """Swarm's own service secrets: the file at /run/secrets/NAME (0400), the value in no
    service spec, task container or log, the Swarm secret gone with the job; a secret the
    policy does not allow is refused before any service or secret exists."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    value = "pg-" + secrets.token_hex(16)
    (secrets_dir / "db_password").write_text(value)
    (secrets_dir / "root_password").write_text("never-given-" + secrets.token_hex(8))
    worker = swarm_worker(unique_pool, "--secrets-dir", str(secrets_dir),
                          rules={"allowed_secrets": ["db_*"]})
    allowed = rig.create_deployment(unique_pool, "flows.py:secret_length",
                                    {"image": FLOWS_IMAGE, "secrets": ["db_password"]})
    refused = rig.create_deployment(unique_pool, "flows.py:secret_length",
                                    {"image": FLOWS_IMAGE, "secrets": ["root_password"]},
                                    parameters={"name": "root_password"})
    run_id = rig.create_flow_run(allowed)
    refused_id = rig.create_flow_run(refused)

    deadline = time.monotonic() + 90
    while True:  # caught while it runs: the job is removed when it ends
        try:
            service, container = task_container(swarm, run_id)
            break
        except (LookupError, docker.errors.NotFound):
            assert time.monotonic() < deadline, "no task container for the run"
            time.sleep(0.2)
    (reference,) = service["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]
    assert reference["File"] == {"Name": "db_password", "UID": "0", "GID": "0", "Mode": 0o400}
    (secret,) = secrets_of(swarm, run_id)
    assert secret.id == reference["SecretID"]
    assert value not in json.dumps(service) and value not in json.dumps(container)

    run = rig.wait_for_final(run_id, timeout=120)
    assert run["state"]["type"] == "COMPLETED", (run["state"], worker.output())
    rig.wait_for_log(run_id, "secret value: ***")
    logs = rig.read_logs(run_id)
    assert f"secret db_password has {len(value)} characters" in messages(rig, run_id)
    assert value not in json.dumps(logs)
    rig.wait_for_log(run_id, "memory and CPU are not read for Swarm jobs")  # #17
    deadline = time.monotonic() + 30
    while jobs_of(swarm, run_id) or secrets_of(swarm, run_id):
        assert time.monotonic() < deadline, "the job or its Swarm secret outlived the run"
        time.sleep(0.5)

    state = rig.wait_for_final(refused_id, timeout=60)["state"]
    assert state["type"] == "CRASHED", state
    assert ("secrets[0]: secret 'root_password' is not allowed (allowed_secrets: ['db_*'])"
            in state["message"]), state
    assert not jobs_of(swarm, refused_id) and not secrets_of(swarm, refused_id)
    assert value not in worker.output()
