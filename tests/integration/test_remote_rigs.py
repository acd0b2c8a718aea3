"""Self-tests of issue 16's remote code rigs (testrig.gitserve, testrig.s3serve): the host's
git and boto3 are served and refused as a real forge or bucket would, and Prefect 3.9.1's own
pull steps (`git_clone`, `pull_from_remote_storage`) run for real in a container of
dockerworker/prefect-git:3.9.1-local against them, with the failure messages a classifier of
pull-step failures has to recognise."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from botocore.exceptions import ClientError
from testrig.gitserve import GitHttpServer, SshGitServer
from testrig.prefect_rig import PREFECT_IMAGE, free_port
from testrig.s3serve import S3Server

GIT_IMAGE = "dockerworker/prefect-git:3.9.1-local"
FILES = {"flow.py": "from prefect import flow\n", "pkg/util.py": "X = 1\n"}
DEV = {"dev.py": "Y = 2\n"}
TOKEN = "tok-" + "5" * 20

# Runs one pull step in the container and prints its result as JSON; a failing step's
# exception ends the process with a traceback (exit 1), as in a flow run's container.
STEP_SCRIPT = r"""
import asyncio, json, os, pathlib, sys
os.makedirs("/tmp/work", exist_ok=True)
os.chdir("/tmp/work")
from prefect.deployments.steps import git_clone, pull_from_remote_storage
step, params = json.loads(sys.argv[1])
if step == "git_clone":
    out = git_clone(**params)
else:
    out = asyncio.run(pull_from_remote_storage(**params))
root = pathlib.Path(out["directory"])
files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
               if p.is_file() and p.relative_to(root).parts[0] != ".git")
print("RESULT " + json.dumps({"directory": out["directory"], "files": files}))
"""


@dataclass
class StepRun:
    exit_code: int
    output: str

    @property
    def result(self) -> dict[str, Any]:
        lines = [line for line in self.output.splitlines() if line.startswith("RESULT ")]
        assert lines, f"the step printed no result (exit {self.exit_code}):\n{self.output}"
        return json.loads(lines[-1][len("RESULT "):])

    @property
    def error(self) -> str:
        """The step's exception line (the last line of the traceback)."""
        assert self.exit_code != 0, f"the step succeeded:\n{self.output}"
        return self.output.strip().splitlines()[-1]


def _git(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_GLOBAL": os.devnull,
            **(env or {})}
    return subprocess.run(["git", *args], capture_output=True, text=True, env=full,
                          check=False, timeout=60)


@pytest.fixture(scope="module")
def git_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(GIT_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {GIT_IMAGE} is missing: run images/build-local.sh first",
                    pytrace=False)
    return GIT_IMAGE


def _run_steps(client: docker.DockerClient, cases: dict[str, tuple[str, dict[str, Any],
               dict[str, str], dict[str, dict[str, str]]]]) -> dict[str, StepRun]:
    """Run each case (step, params, env, volumes) in its own host-network container of the git
    image, three at a time (each imports Prefect: CPU-bound)."""

    def one(case: tuple[str, dict[str, Any], dict[str, str], dict[str, dict[str, str]]]
            ) -> StepRun:
        step, params, env, volumes = case
        container = client.containers.run(
            GIT_IMAGE, ["python", "-c", STEP_SCRIPT, json.dumps([step, params])],
            network_mode="host", environment=env, volumes=volumes, detach=True,
            labels={"dockerworker-tests": "remote-rigs"})
        try:
            code = container.wait(timeout=120)["StatusCode"]
            return StepRun(code, container.logs().decode(errors="replace"))
        finally:
            container.remove(force=True)

    with ThreadPoolExecutor(3) as pool:
        runs = dict(zip(cases, pool.map(one, cases.values()), strict=True))
    for name, run in runs.items():  # shown on failure: the exact output of every case
        print(f"--- {name}: exit {run.exit_code}\n{run.output}")
    return runs


# --- HTTP(S) on the host -------------------------------------------------------------------


@pytest.fixture
def http_git() -> Iterator[GitHttpServer]:
    with GitHttpServer() as server:
        server.add_repo("public.git", FILES, extra_branches={"dev": DEV})
        server.add_repo("private.git", FILES, extra_branches={"dev": DEV}, token=TOKEN)
        yield server


def test_http_public_clone_branch_and_commit(http_git: GitHttpServer, tmp_path: Path) -> None:
    assert _git("clone", "-q", http_git.url("public.git"), str(tmp_path / "a")).returncode == 0
    assert (tmp_path / "a" / "pkg" / "util.py").read_text() == FILES["pkg/util.py"]
    assert not (tmp_path / "a" / "dev.py").exists()
    done = _git("clone", "-q", "--branch", "dev", http_git.url("public.git"), str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "dev.py").exists()
    dev_sha = http_git.repos["public.git"].shas["dev"]
    assert _git("-C", str(tmp_path / "a"), "fetch", "-q", "origin", dev_sha).returncode == 0
    assert _git("-C", str(tmp_path / "a"), "checkout", "-q", dev_sha).returncode == 0
    assert (tmp_path / "a" / "dev.py").exists()


def test_http_private_repo_needs_its_token(http_git: GitHttpServer, tmp_path: Path) -> None:
    url = http_git.url("private.git")
    anonymous = _git("clone", "-q", url, str(tmp_path / "none"))
    assert anonymous.returncode == 128
    assert "could not read Username" in anonymous.stderr
    assert http_git.requests[-1].status == 401
    for n, auth in enumerate((f"{TOKEN}@", f"x-access-token:{TOKEN}@", f"oauth2:{TOKEN}@")):
        done = _git("clone", "-q", url.replace("://", f"://{auth}"), str(tmp_path / f"ok{n}"))
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"ok{n}" / "flow.py").exists()
    wrong = _git("clone", "-q", url.replace("://", "://x:wrong@"), str(tmp_path / "wrong"))
    assert wrong.returncode == 128
    assert f"fatal: Authentication failed for '{url}/'" in wrong.stderr


def test_http_wrong_token_can_answer_403(tmp_path: Path) -> None:
    with GitHttpServer(refuse_status=403) as server:
        server.add_repo("private.git", FILES, token=TOKEN)
        url = server.url("private.git").replace("://", "://x:wrong@")
        done = _git("clone", "-q", url, str(tmp_path / "c"))
    assert done.returncode == 128
    assert "The requested URL returned error: 403" in done.stderr


def test_http_missing_repo_and_branch(http_git: GitHttpServer, tmp_path: Path) -> None:
    missing = _git("clone", "-q", http_git.url("nope.git"), str(tmp_path / "a"))
    assert missing.returncode == 128
    assert f"fatal: repository '{http_git.url('nope.git')}/' not found" in missing.stderr
    assert http_git.requests[-1].status == 404
    branch = _git("clone", "-q", "--branch", "nob", http_git.url("public.git"), str(tmp_path / "b"))
    assert branch.returncode == 128
    assert "fatal: Remote branch nob not found in upstream origin" in branch.stderr


def test_http_gzip_and_chunked_request_bodies(http_git: GitHttpServer, tmp_path: Path) -> None:
    """git gzips fetch requests over 1 KiB and sends those over http.postBuffer chunked
    (1600 wants are ~80 KB; a postBuffer of 70000, above git's 64 KiB floor): the rig passes
    both through to http-backend."""
    def many_branches(name: str, count: int) -> None:
        http_git.add_repo(name, FILES)
        stream = "".join(
            f"commit refs/heads/b{i}\ncommitter t <t@t> 0 +0000\ndata 3\nc{i % 10}\n"
            f"M 644 inline f{i}\ndata 1\nx\n\n" for i in range(count))
        done = subprocess.run(["git", "--git-dir", str(http_git.root / name), "fast-import",
                               "--quiet"], input=stream, text=True, capture_output=True,
                              check=False)
        assert done.returncode == 0, done.stderr

    many_branches("gzip.git", 40)
    many_branches("chunked.git", 1600)
    for name, buffer in (("gzip.git", "1m"), ("chunked.git", "70000")):
        done = _git("-c", f"http.postBuffer={buffer}", "clone", "-q", "--bare",
                    http_git.url(name), str(tmp_path / name))
        assert done.returncode == 0, done.stderr
    posts = {name: [r for r in http_git.requests if r.method == "POST" and name in r.path]
             for name in ("gzip.git", "chunked.git")}
    assert any(r.content_encoding == "gzip" for r in posts["gzip.git"]), posts
    assert any(r.chunked for r in posts["chunked.git"]), posts
    assert all(r.status == 200 for rs in posts.values() for r in rs)
    heads = _git("--git-dir", str(tmp_path / "chunked.git"), "for-each-ref", "refs/heads")
    assert len(heads.stdout.splitlines()) == 1601


def test_https_serves_its_own_certificate(tmp_path: Path) -> None:
    with GitHttpServer(tls=True) as server:
        server.add_repo("private.git", FILES, token=TOKEN)
        assert server.ca_file is not None
        url = server.url("private.git").replace("://", f"://{TOKEN}@")
        untrusted = _git("clone", "-q", url, str(tmp_path / "a"),
                         env={"GIT_SSL_CAINFO": "/etc/ssl/certs/ca-certificates.crt"})
        trusted = _git("clone", "-q", url, str(tmp_path / "b"),
                       env={"GIT_SSL_CAINFO": str(server.ca_file)})
    assert "server certificate verification failed" in untrusted.stderr
    assert trusted.returncode == 0, trusted.stderr


# --- SSH on the host -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_git() -> Iterator[SshGitServer]:
    with SshGitServer() as server:
        server.add_repo("flows.git", FILES, extra_branches={"dev": DEV})
        yield server


def test_ssh_clone_with_the_key(ssh_git: SshGitServer, tmp_path: Path) -> None:
    done = _git("clone", "-q", "--branch", "dev", ssh_git.url("flows.git"), str(tmp_path / "a"),
                env={"GIT_SSH_COMMAND": ssh_git.git_ssh_command()})
    assert done.returncode == 0, f"{done.stderr}\nsshd: {ssh_git.log()}"
    assert (tmp_path / "a" / "dev.py").exists()
    assert ssh_git.known_hosts_line.startswith(f"[127.0.0.1]:{ssh_git.port} ssh-ed25519 ")


def test_ssh_refuses_other_keys(ssh_git: SshGitServer, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    done = _git("clone", "-q", ssh_git.url("flows.git"), str(tmp_path / "a"),
                env={"GIT_SSH_COMMAND": ssh_git.git_ssh_command(key=other)})
    assert done.returncode == 128
    assert f"{ssh_git.user}@127.0.0.1: Permission denied (publickey)." in done.stderr
    missing = _git("clone", "-q", ssh_git.url("nope.git"), str(tmp_path / "b"),
                   env={"GIT_SSH_COMMAND": ssh_git.git_ssh_command()})
    assert missing.returncode == 128
    assert "does not appear to be a git repository" in missing.stderr


# --- S3 on the host ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        server.create_bucket("flows")
        server.upload("flows", FILES, prefix="team/a")
        yield server


def test_s3_reads_with_the_right_credentials_only(s3: S3Server) -> None:
    body = s3.client().get_object(Bucket="flows", Key="team/a/pkg/util.py")["Body"].read()
    assert body == FILES["pkg/util.py"].encode()
    refusals = {
        "SignatureDoesNotMatch": s3.client(secret="wrong"),
        "InvalidAccessKeyId": s3.client(key_id="AKIAUNKNOWN000000000", secret="wrong"),
    }
    for code, client in refusals.items():
        with pytest.raises(ClientError) as caught:
            client.list_objects_v2(Bucket="flows")
        assert caught.value.response["Error"]["Code"] == code
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


# --- Prefect's pull steps in a container ---------------------------------------------------


def test_plain_runtime_image_has_no_git(docker_client: docker.DockerClient) -> None:
    """The pull-step failure tests rely on the plain runtime lacking git."""
    output = docker_client.containers.run(
        PREFECT_IMAGE, ["sh", "-c", "command -v git || echo no-git"], remove=True)
    assert output.decode().strip() == "no-git"


def test_prefect_git_clone_over_https_with_access_token(
    git_image: str, docker_client: docker.DockerClient
) -> None:
    """Prefect puts `access_token` into the URL only for https:// repositories, hence TLS;
    the container trusts the rig's certificate through GIT_SSL_CAINFO."""
    dead = free_port()
    with GitHttpServer(tls=True) as https, GitHttpServer() as http:
        shas = https.add_repo("flows.git", FILES, extra_branches={"dev": DEV}, token=TOKEN)
        http.add_repo("flows.git", FILES, token=TOKEN)
        assert https.ca_file is not None
        volumes = {str(https.ca_file): {"bind": "/rig/ca.pem", "mode": "ro"}}
        env = {"GIT_SSL_CAINFO": "/rig/ca.pem"}
        url = https.url("flows.git")

        def clone(**params: Any) -> tuple[str, dict[str, Any], dict[str, str],
                                          dict[str, dict[str, str]]]:
            return "git_clone", params, env, volumes

        runs = _run_steps(docker_client, {
            "token": clone(repository=url, access_token=TOKEN),
            "branch": clone(repository=url, access_token=TOKEN, branch="dev"),
            "commit": clone(repository=url, access_token=TOKEN, commit_sha=shas["dev"]),
            "wrong_token": clone(repository=url, access_token="wrong"),
            "no_token": clone(repository=url),
            "missing_repo": clone(repository=https.url("nope.git"), access_token=TOKEN),
            "missing_branch": clone(repository=url, access_token=TOKEN, branch="nob"),
            "unreachable": clone(repository=f"https://127.0.0.1:{dead}/flows.git",
                                 access_token=TOKEN),
            "plain_http_ignores_token": clone(repository=http.url("flows.git"),
                                              access_token=TOKEN),
        })
    assert runs["token"].result == {"directory": "flows", "files": ["flow.py", "pkg/util.py"]}
    assert runs["branch"].result["directory"] == "flows-dev"
    assert "dev.py" in runs["branch"].result["files"]
    assert "dev.py" in runs["commit"].result["files"]
    failed = f"RuntimeError: Failed to clone repository '{url}' with exit code 128."
    assert runs["wrong_token"].error == (
        f"{failed} git stderr: Cloning into '/tmp/work/flows'... | fatal: could not read"
        f" Password for 'https://127.0.0.1:{https.port}': No such device or address")
    assert runs["no_token"].error == (
        f"{failed} git stderr: Cloning into '/tmp/work/flows'... | fatal: could not read"
        f" Username for 'https://127.0.0.1:{https.port}': No such device or address")
    hint = "Hint: Verify the repository URL and that you have access to it."
    assert runs["missing_repo"].error == (
        f"RuntimeError: Failed to clone repository '{https.url('nope.git')}' with exit code"
        f" 128. {hint}")
    assert runs["missing_branch"].error == f"{failed} {hint}"  # same words as a missing repo
    assert runs["unreachable"].error.startswith(
        f"{failed.replace(url, f'https://127.0.0.1:{dead}/flows.git')} git stderr: Cloning into"
        f" '/tmp/work/flows'... | fatal: unable to access 'https://127.0.0.1:{dead}/flows.git/':"
        f" Failed to connect to 127.0.0.1 port {dead} after ")  # "0 ms", or more
    assert runs["unreachable"].error.endswith(": Couldn't connect to server")
    assert "could not read Username for 'http://127.0.0.1:" in runs[
        "plain_http_ignores_token"].error
    assert TOKEN not in "".join(run.output for run in runs.values())


def test_prefect_git_clone_over_ssh_with_a_mounted_key(
    git_image: str, docker_client: docker.DockerClient, ssh_git: SshGitServer, tmp_path: Path
) -> None:
    """The key and known_hosts are bind-mounted read-only; GIT_SSH_COMMAND points ssh at them."""
    dead = free_port()
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other / "id_ed25519")],
                   check=True)
    (other / "known_hosts").write_text(ssh_git.known_hosts_path.read_text())
    mounted = {str(ssh_git.client_dir): {"bind": "/rig-ssh", "mode": "ro"}}
    with_key = {"GIT_SSH_COMMAND": ssh_git.git_ssh_command("/rig-ssh/id_ed25519",
                                                           "/rig-ssh/known_hosts")}
    url = ssh_git.url("flows.git")

    def clone(env: dict[str, str], volumes: dict[str, dict[str, str]] = mounted, **params: Any
              ) -> tuple[str, dict[str, Any], dict[str, str], dict[str, dict[str, str]]]:
        return "git_clone", params, env, volumes

    runs = _run_steps(docker_client, {
        "key": clone(with_key, repository=url, branch="dev"),
        "other_key": clone(with_key, {str(other): {"bind": "/rig-ssh", "mode": "ro"}},
                           repository=url),
        "no_ssh_command": clone({}, repository=url),
        "missing_repo": clone(with_key, repository=ssh_git.url("nope.git")),
        "missing_branch": clone(with_key, repository=url, branch="nob"),
        "unreachable": clone(with_key, repository=f"ssh://dwgit@127.0.0.1:{dead}/x/flows.git"),
    })
    assert runs["key"].result == {"directory": "flows-dev",
                                  "files": ["dev.py", "flow.py", "pkg/util.py"]}
    shown = url.replace(f"{ssh_git.user}@", "")  # Prefect strips the user from the URL
    failed = f"RuntimeError: Failed to clone repository '{shown}' with exit code 128."
    assert runs["other_key"].error == f"{failed} Hint: Check your SSH key or token permissions."
    no_repo = " | Please make sure you have the correct access rights | and the repository exists."
    assert runs["no_ssh_command"].error == f"{failed} git stderr: {no_repo}"
    assert runs["missing_repo"].error == (
        f"{failed.replace('flows.git', 'nope.git')} git stderr: {no_repo}")
    assert runs["missing_branch"].error == (
        f"{failed} Hint: Verify the repository URL and that you have access to it.")
    assert runs["unreachable"].error == (
        f"RuntimeError: Failed to clone repository 'ssh://127.0.0.1:{dead}/x/flows.git' with"
        " exit code 128. Hint: Check your network connectivity and DNS settings.")


def test_prefect_pull_from_s3_with_env_or_step_credentials(
    git_image: str, docker_client: docker.DockerClient, s3: S3Server
) -> None:
    """s3fs honours AWS_ENDPOINT_URL; as step parameters: key, secret and endpoint_url (or
    client_kwargs={"endpoint_url": ...}). The RuntimeError's own line names no cause for S3:
    the cause is in the chained exceptions above it."""
    dead = free_port()
    url = "s3://flows/team/a"

    def pull(env: dict[str, str], **params: Any
             ) -> tuple[str, dict[str, Any], dict[str, str], dict[str, dict[str, str]]]:
        return "pull_from_remote_storage", {"url": url, **params}, env, {}

    runs = _run_steps(docker_client, {
        "env": pull(s3.env()),
        "params": pull({}, key=s3.key_id, secret=s3.secret, endpoint_url=s3.endpoint_url),
        "client_kwargs": pull({}, key=s3.key_id, secret=s3.secret,
                              client_kwargs={"endpoint_url": s3.endpoint_url}),
        "wrong_secret": pull({**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}),
        "unknown_key": pull({}, key="AKIAUNKNOWN000000000", secret="x",
                            endpoint_url=s3.endpoint_url),
        "no_credentials": pull({"AWS_ENDPOINT_URL": s3.endpoint_url}),
        "missing_bucket": pull(s3.env(), url="s3://nobucket/team/a"),
        "unreachable": pull(s3.env(f"http://127.0.0.1:{dead}")),
    })
    for name in ("env", "params", "client_kwargs"):
        assert runs[name].result == {"directory": "flows/team/a",
                                     "files": ["flow.py", "pkg/util.py"]}, name
    causes = {
        "wrong_secret": ("botocore.exceptions.ClientError: An error occurred"
                         " (SignatureDoesNotMatch) when calling the ListObjectsV2 operation"),
        "unknown_key": ("botocore.exceptions.ClientError: An error occurred (InvalidAccessKeyId)"
                        " when calling the ListObjectsV2 operation"),
        "no_credentials": "botocore.exceptions.NoCredentialsError: Unable to locate credentials",
        "missing_bucket": "FileNotFoundError: The specified bucket does not exist",
        "unreachable": ("botocore.exceptions.EndpointConnectionError: Could not connect to the"
                        f' endpoint URL: "http://127.0.0.1:{dead}/flows?'),
    }
    for name, cause in causes.items():
        remote = "s3://nobucket/team/a" if name == "missing_bucket" else url
        local = remote.replace("s3://", "/tmp/work/")
        assert runs[name].error == (f"RuntimeError: Failed to pull contents from remote storage"
                                    f" {remote!r} to PosixPath({local!r})"), name
        assert cause in runs[name].output, name
    assert s3.secret not in "".join(run.output for run in runs.values())
