"""Flow code from where it lives (issue 16): pull steps run by Prefect's engine in the flow
container, against real git (HTTP and SSH) and S3 servers on loopback; each failure named in
the run's state message and logs, credentials masked, the worker carrying on."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from testrig.gitserve import GIT_CLONE, GIT_IMAGE, GitHttpServer, SshGitServer
from testrig.prefect_rig import PREFECT_IMAGE, PrefectRig, free_port
from testrig.s3serve import S3Server
from testrig.workers import worker_env

from dockerworker.jobs import default_base_job_template

REMOTE = "prefect.deployments.steps.pull_from_remote_storage"


def flow_source(where: str) -> str:
    """The flow a repository or bucket holds: it says where its code came from and, asked
    to, prints a Secret block's value (which the worker must mask in the shipped output)."""
    return f"""
from prefect import flow
from prefect.blocks.system import Secret


@flow
def hello(block: str = "", file: str = "") -> str:
    print("code from {where}")
    if block:
        print("the secret is " + Secret.load(block).get())
    if file:
        print("the file holds " + open(file).read())
    return "{where}"
"""


@pytest.fixture(scope="module")
def git_image() -> str:
    client = docker.from_env()
    try:
        client.images.get(GIT_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {GIT_IMAGE} is missing: run images/build-local.sh", pytrace=False)
    finally:
        client.close()
    return GIT_IMAGE


def all_logs(rig: PrefectRig, run_ids: list[str]) -> str:
    return "\n".join(messages(rig, run_id) for run_id in run_ids)


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


def test_git_over_https_token_from_a_block_or_env_and_each_failure_named(
    rig: PrefectRig, start_worker, unique_pool: str, git_image: str, policy_file,
    tmp_path: Path, docker_client
) -> None:
    """A private repository behind a token, its CA mounted from a prefix the policy allows
    (as with a company's own git server): a branch with the token from a Secret block, a
    commit with it from the job's env, a public repository; then a wrong token, a missing branch, a missing
    repository and a closed port, each named in the state message; the token nowhere."""
    token = f"tok-{secrets.token_hex(12)}"
    block = f"git-token-{secrets.token_hex(3)}"
    rig.create_secret_block(block, token)
    ca_dir = tmp_path / "git-ca"
    with GitHttpServer(tls=True) as git:
        shas = git.add_repo("flows.git", {"flow.py": flow_source("main")}, token=token,
                            extra_branches={"dev": {"flow.py": flow_source("dev")}})
        git.add_repo("public.git", {"flow.py": flow_source("public")})
        assert git.ca_file is not None
        ca_dir.mkdir()
        shutil.copy(git.ca_file, ca_dir / "ca.pem")
        start_worker(unique_pool, "--policy",
                     policy_file(allowed_volume_prefixes=[str(ca_dir)]))
        job = {"image": git_image, "volumes": [f"{ca_dir}:/git-ca:ro"],
               "env": {"GIT_SSL_CAINFO": "/git-ca/ca.pem", "GIT_TOKEN": token}}

        def run(clone: dict[str, str], repository: str = git.url("flows.git"),
                **parameters: str) -> str:
            deployment = rig.create_deployment(
                unique_pool, "flow.py:hello", job, path=None,
                pull_steps=[{GIT_CLONE: {"repository": repository, **clone}}])
            return rig.create_flow_run(deployment, parameters=parameters)

        block_ref = f"{{{{ prefect.blocks.secret.{block} }}}}"
        from_block = run({"branch": "dev", "access_token": block_ref}, block=block)
        from_env = run({"commit_sha": shas["main"], "access_token": "{{ $GIT_TOKEN }}"})
        public = run({}, repository=git.url("public.git"))
        wrong = run({"access_token": "not-the-token"})
        no_branch = run({"branch": "no-such-branch", "access_token": token})
        no_repo = run({"access_token": token}, repository=git.url("missing.git"))
        closed = run({}, repository=f"https://127.0.0.1:{free_port()}/x.git")

        assert final(rig, from_block)[0] == "COMPLETED"
        assert final(rig, from_env)[0] == "COMPLETED"
        assert final(rig, public)[0] == "COMPLETED"
        causes = {
            wrong: "the git server refused the credentials",
            no_branch: "the branch or commit no-such-branch does not exist",
            no_repo: "the repository does not exist",
            closed: "the git server could not be reached from the flow container",
        }
        for run_id, cause in causes.items():
            state, message = final(rig, run_id)
            assert state == "CRASHED", (state, message)
            assert message.startswith(f"The flow's code could not be pulled (git_clone): {cause}"
                                      ), message
            assert "exited with code 1 while the flow run was PENDING" in message
            rig.wait_for_log(run_id, "crashed: The flow's code could not be pulled")

    rig.wait_for_log(from_block, "the secret is ***")
    assert "code from dev" in messages(rig, from_block)
    rig.wait_for_log(from_env, "code from main")  # shipped in batches, after the state
    rig.wait_for_log(public, "code from public")
    run_ids = [from_block, from_env, public, *causes]
    everything = all_logs(rig, run_ids) + json.dumps([rig.read_flow_run(r) for r in run_ids])
    assert token not in everything
    # nor in what Docker holds of the kept container, beyond the job's own env (GIT_TOKEN)
    (kept,) = docker_client.containers.list(
        all=True, filters={"label": f"io.prefect.flow-run-id={from_block}"})
    attrs = kept.attrs
    env = [e for e in attrs["Config"]["Env"] if not e.startswith("GIT_TOKEN=")]
    assert token not in json.dumps({**attrs, "Config": {**attrs["Config"], "Env": env}})
    assert token not in json.dumps(docker_client.images.get(git_image).history())


def test_git_over_ssh_with_a_deploy_key_from_a_secret_or_an_allowed_mount(
    rig: PrefectRig, start_worker, unique_pool: str, git_image: str, policy_file,
    tmp_path: Path
) -> None:
    """The operator's deploy key (and known_hosts), never in an image: given as flow secrets
    (the documented way: the worker knows the key, so a flow that prints it shows `***`) or
    mounted read-only from an allowed prefix, the clone works; a key the server does not know
    and a host key nobody vouched for are each named."""
    other_key = tmp_path / "other-key"
    other_key.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(other_key / "id_ed25519")], check=True)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    with SshGitServer() as ssh:
        ssh.add_repo("flows.git", {"flow.py": flow_source("main")},
                     extra_branches={"dev": {"flow.py": flow_source("ssh dev")}})
        shutil.copy(ssh.known_hosts_path, other_key / "known_hosts")
        shutil.copy(ssh.key_path, secrets_dir / "git_deploy_key")
        shutil.copy(ssh.known_hosts_path, secrets_dir / "git_known_hosts")
        start_worker(unique_pool, "--secrets-dir", str(secrets_dir), "--policy", policy_file(
            allowed_volume_prefixes=[str(ssh.client_dir), str(other_key)],
            allowed_secrets=["git_*"]))
        command = ssh.git_ssh_command("/keys/id_ed25519", "/keys/known_hosts")
        private_key = ssh.key_path.read_text()

        def run(job: dict, **parameters: str) -> str:
            return rig.create_flow_run(rig.create_deployment(
                unique_pool, "flow.py:hello", {"image": git_image, **job}, path=None,
                pull_steps=[{GIT_CLONE: {"repository": ssh.url("flows.git"), "branch": "dev"}}]),
                parameters=parameters)

        from_secret = run(
            {"secrets": ["git_deploy_key", "git_known_hosts"],
             "env": {"GIT_SSH_COMMAND": ssh.git_ssh_command("/run/secrets/git_deploy_key",
                                                            "/run/secrets/git_known_hosts")}},
            file="/run/secrets/git_deploy_key")
        mounted = run({"volumes": [f"{ssh.client_dir}:/keys:ro"],
                       "env": {"GIT_SSH_COMMAND": command}})
        unknown_key = run({"volumes": [f"{other_key}:/keys:ro"],
                           "env": {"GIT_SSH_COMMAND": command}})
        unknown_host = run({"volumes": [f"{ssh.client_dir}:/keys:ro"],
                            "env": {"GIT_SSH_COMMAND": "ssh -i /keys/id_ed25519 -o BatchMode=yes "
                                    "-o StrictHostKeyChecking=yes"}})
        for run_id in (from_secret, mounted):
            assert final(rig, run_id)[0] == "COMPLETED", ssh.log()
        for run_id, cause in ((unknown_key, "the git server refused the SSH key"),
                              (unknown_host, "the SSH host key of the git server is unknown")):
            state, message = final(rig, run_id)
            assert state == "CRASHED"
            assert message.startswith(f"The flow's code could not be pulled (git_clone): {cause}"
                                      ), message
    for run_id in (from_secret, mounted):
        rig.wait_for_log(run_id, "code from ssh dev")  # shipped in batches, after the state
    rig.wait_for_log(from_secret, "the file holds")
    assert "the file holds ***" in messages(rig, from_secret), messages(rig, from_secret)
    everything = all_logs(rig, [from_secret, mounted, unknown_key, unknown_host]) + json.dumps(
        rig.read_flow_run(from_secret))
    for line in private_key.strip().splitlines()[1:-1]:  # the key's body, line by line
        assert line not in everything


def test_code_from_s3_with_credentials_from_env_or_blocks_and_refusals_named(
    rig: PrefectRig, start_worker, unique_pool: str, git_image: str
) -> None:
    with S3Server() as s3:
        s3.create_bucket("flows")
        s3.upload("flows", {"flow.py": flow_source("s3")}, prefix="team/a")
        key_block, secret_block = (f"s3-key-{secrets.token_hex(3)}",
                                   f"s3-secret-{secrets.token_hex(3)}")
        rig.create_secret_block(key_block, s3.key_id)
        rig.create_secret_block(secret_block, s3.secret)
        start_worker(unique_pool)

        def run(url: str, env: dict[str, str], **settings: object) -> str:
            return rig.create_flow_run(rig.create_deployment(
                unique_pool, "flow.py:hello", {"image": git_image, "env": env}, path=None,
                pull_steps=[{REMOTE: {"url": url, **settings}}]), parameters={})

        # env as an operator writes it: the secret from a block, resolved by the worker as
        # Prefect's own workers resolve job variables
        from_env = run("s3://flows/team/a", {
            **s3.env(), "AWS_SECRET_ACCESS_KEY": f"{{{{ prefect.blocks.secret.{secret_block} }}}}"})
        # or the step's own parameters, from blocks the engine reads in the container
        from_blocks = run("s3://flows/team/a", {},
                          client_kwargs={"endpoint_url": s3.endpoint_url},
                          key=f"{{{{ prefect.blocks.secret.{key_block} }}}}",
                          secret=f"{{{{ prefect.blocks.secret.{secret_block} }}}}")
        wrong = run("s3://flows/team/a", {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"})
        no_bucket = run("s3://no-such-bucket/team/a", s3.env())
        assert final(rig, from_env)[0] == "COMPLETED"
        assert final(rig, from_blocks)[0] == "COMPLETED"
        for run_id, cause in ((wrong, "the object store refused the credentials"),
                              (no_bucket, "the bucket does not exist")):
            state, message = final(rig, run_id)
            assert state == "CRASHED"
            assert message.startswith("The flow's code could not be pulled "
                                      f"(pull_from_remote_storage): {cause}"), message
        assert "code from s3" in messages(rig, from_env)
        assert "code from s3" in messages(rig, from_blocks)
        assert s3.secret not in all_logs(rig, [from_env, from_blocks, wrong, no_bucket])


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
