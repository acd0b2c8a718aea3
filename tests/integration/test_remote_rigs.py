"""Self-tests of issue 16's remote code rigs (testrig.gitserve, testrig.s3serve): the host's
git and boto3 are served and refused as a real forge or bucket would. Prefect's own pull steps
against them, and the failure messages the worker names, are tested through the worker in
test_flow_code.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from botocore.exceptions import ClientError
from testrig.gitserve import GitHttpServer, SshGitServer
from testrig.prefect_rig import PREFECT_IMAGE
from testrig.s3serve import S3Server

FILES = {"flow.py": "from prefect import flow\n", "pkg/util.py": "X = 1\n"}
DEV = {"dev.py": "Y = 2\n"}
TOKEN = "tok-" + "5" * 20

def _git(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_GLOBAL": os.devnull,
            **(env or {})}
    return subprocess.run(["git", *args], capture_output=True, text=True, env=full,
                          check=False, timeout=60)


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
