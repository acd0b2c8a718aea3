"""Flow code from where it lives (issue 16): pull steps run by Prefect's engine in the flow
container, against real git (HTTP and SSH) and S3 servers on loopback; each failure named in
the run's state message and logs, credentials masked, the worker carrying on."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import docker
import pytest
from testrig.prefect_rig import PREFECT_IMAGE, PrefectRig, free_port
from testrig.workers import worker_env

from dockerworker.jobs import default_base_job_template

GIT_CLONE = "prefect.deployments.steps.git_clone"


def final(rig: PrefectRig, run_id: str) -> tuple[str, str]:
    run = rig.wait_for_final(run_id, timeout=180)
    return run["state"]["type"], run["state"]["message"] or ""


def messages(rig: PrefectRig, run_id: str) -> str:
    return "\n".join(log["message"] for log in rig.read_logs(run_id))


def test_an_image_without_git_says_so_before_any_traceback_and_the_worker_goes_on(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    """The plain Prefect image has no git: the entry script stops before the engine with one
    line that says what is missing and why pip_packages cannot help."""
    with pytest.raises(docker.errors.ContainerError):  # the premise: no git in this image
        docker_client.containers.run(PREFECT_IMAGE, ["sh", "-c", "command -v git"], remove=True)
    start_worker(unique_pool)
    needs_git = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": PREFECT_IMAGE}, path=None,
        pull_steps=[{GIT_CLONE: {"repository": f"http://127.0.0.1:{free_port()}/repo.git"}}])
    run_id = rig.create_flow_run(needs_git)
    state, message = final(rig, run_id)
    assert state == "CRASHED"
    expected = (f"The pull step git_clone needs git, and image {PREFECT_IMAGE} has no git on "
                "its PATH. pip_packages cannot install it")
    assert message.startswith(expected), message
    rig.wait_for_log(run_id, "needs git, and image")
    logs = messages(rig, run_id)
    assert "dockerworker: the pull step git_clone needs git" in logs
    assert "Traceback" not in logs + message

    fine = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    assert final(rig, rig.create_flow_run(fine))[0] == "COMPLETED"


# --- doctor --reach ---------------------------------------------------------------------------
@pytest.fixture
def listening_port() -> Iterator[int]:
    """A TCP port on loopback that accepts connections (a stand-in for a git server)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def doctor(api_url: str, pool: str, *urls: str) -> subprocess.CompletedProcess[str]:
    reach = [arg for url in urls for arg in ("--reach", url)]
    return subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "doctor", "--pool", pool, *reach],
        env=worker_env(api_url), capture_output=True, text=True, timeout=120, check=False)


def test_doctor_reach_tries_the_url_from_a_container_of_the_pool_s_image(
    rig: PrefectRig, prefect_server, unique_pool: str, listening_port: int, docker_client
) -> None:
    template = default_base_job_template()
    template["variables"]["properties"]["image"]["default"] = PREFECT_IMAGE
    rig.create_work_pool(unique_pool, base_job_template=template)
    closed = free_port()
    result = doctor(prefect_server.url, unique_pool,
                    f"https://user:s3cret-in-url@127.0.0.1:{listening_port}/org/repo",
                    f"ssh://git@127.0.0.1:{closed}/org/repo.git")
    out = result.stdout
    assert (f"✓ 127.0.0.1:{listening_port} reached from a container of {PREFECT_IMAGE} "
            "(network host): resolves to 127.0.0.1, connected in") in out, out
    assert (f"✗ could not connect to 127.0.0.1:{closed} from a container of {PREFECT_IMAGE} "
            "(network host): ConnectionRefusedError") in out, out
    assert "the image has neither git nor ssh" in out
    assert "s3cret-in-url" not in out + result.stderr
    assert result.returncode == 1
    assert docker_client.containers.list(all=True, filters={"label": "io.dockerworker.doctor"}) == []


def test_doctor_reach_refuses_what_names_no_host(rig: PrefectRig, prefect_server,
                                                 unique_pool: str) -> None:
    rig.create_work_pool(unique_pool, base_job_template=default_base_job_template())
    result = doctor(prefect_server.url, unique_pool, "s3://bucket/flows")
    assert "✗ cannot try to reach s3://bucket/flows: give an http(s), ssh or git URL" in \
        result.stdout
    assert result.returncode == 1
