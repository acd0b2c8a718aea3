"""Pull steps: what they need from the image, which credentials they carry, why one failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dockerworker import entry_script
from dockerworker.flowcode import (
    NEEDS_ENV,
    Need,
    block_references,
    block_secrets,
    explain,
    needs,
    needs_env,
    secret_values,
)

GIT = "prefect.deployments.steps.git_clone"
REMOTE = "prefect.deployments.steps.pull_from_remote_storage"


def test_git_clone_needs_git_and_over_ssh_ssh_too() -> None:
    https = [{GIT: {"repository": "https://example.com/org/repo.git"}}]
    assert needs(https) == [Need("git_clone", command="git", package="git")]
    for repository in ("git@example.com:org/repo.git", "ssh://git@example.com:2222/repo.git",
                       "deploy@10.0.0.1:repo.git"):
        assert [n.command for n in needs([{GIT: {"repository": repository}}])] == ["git", "ssh"]


def test_remote_storage_needs_its_fsspec_package_and_integrations_their_own() -> None:
    assert needs([{REMOTE: {"url": "s3://bucket/flows"}}]) == [
        Need("pull_from_remote_storage", module="s3fs", package="s3fs")]
    assert [n.module for n in needs([{REMOTE: {"url": "gs://b/f"}}])] == ["gcsfs"]
    assert needs([{REMOTE: {"url": "file:///opt/code"}}]) == []
    assert needs([{REMOTE: {"url": "{{ prefect.variables.where }}"}}]) == []
    assert needs([{"prefect_aws.deployments.steps.pull_from_s3": {"bucket": "b"}}]) == [
        Need("pull_from_s3", module="prefect_aws", package="prefect-aws")]
    set_dir = {"prefect.deployments.steps.set_working_directory": {"directory": "/opt"}}
    assert needs([set_dir, "not a step", {"a": 1, "b": 2}]) == []
    assert needs_env(None, "img") == {} and needs_env([set_dir], "img") == {}


def test_messages_say_how_to_fix_it_and_that_pip_packages_cannot_install_git() -> None:
    (git,) = json.loads(needs_env([{GIT: {"repository": "https://h/r.git"}}], "my/image:1")
                        [NEEDS_ENV])
    assert git["command"] == "git"
    assert "image my/image:1 has no git" in git["message"]
    assert "pip_packages cannot install it" in git["message"]
    assert "apt-get install -y git" in git["message"] and "dockerfile_lines" in git["message"]
    (s3,) = json.loads(needs_env([{REMOTE: {"url": "s3://b/p"}}], "img")[NEEDS_ENV])
    assert s3["module"] == "s3fs" and "add 's3fs' to the job's pip_packages" in s3["message"]


def test_the_entry_script_names_what_is_missing_and_only_that() -> None:
    checks = [{"command": "surely-not-a-command-here", "message": "no such command"},
              {"command": sys.executable, "message": "no python"},
              {"module": "json", "message": "no json"},
              {"module": "surely_not_installed_here", "message": "no module"}]
    assert entry_script.missing_needs(checks) == ["no such command", "no module"]
    assert entry_script.missing_needs([]) == []


def test_the_entry_script_exits_before_the_engine_with_the_message(tmp_path) -> None:
    """Run as the container runs it: `python -c` with the checklist in env. A stub Prefect
    whose engine fails loudly if run: the script must exit before it."""
    stub = tmp_path / "prefect"
    stub.mkdir()
    (stub / "__init__.py").write_text("")
    (stub / "engine.py").write_text(
        "if __name__ == '__main__':\n    raise SystemExit('the engine must not run')\n")
    checks = [{"module": "surely_not_installed_here", "message": "dockerworker: the pull step "
               "x needs the Python package y"}]
    script = Path(entry_script.__file__).read_text()
    result = subprocess.run([sys.executable, "-c", script], env={
        NEEDS_ENV: json.dumps(checks), "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1, result
    assert result.stderr.strip() == "dockerworker: the pull step x needs the Python package y"


def test_secrets_written_into_the_steps() -> None:
    steps = [
        {GIT: {"repository": "https://deploy:url-password@git.example.com/r.git",
               "access_token": "literal-token-123"}},
        {REMOTE: {"url": "s3://b/p", "key": "AKIAEXAMPLE", "secret": "{{ $S3_SECRET }}",
                  "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}},
        {GIT: {"repository": "https://h/r.git", "access_token": "{{ prefect.blocks.secret.t }}"}},
    ]
    env = {"S3_SECRET": "from-env-secret", "UNRELATED": "plain-value"}
    assert secret_values(steps, env) == {"url-password", "literal-token-123", "from-env-secret"}


def test_blocks_named_by_the_steps_and_what_of_them_is_secret() -> None:
    steps = [{GIT: {"repository": "https://h/r.git",
                    "access_token": "{{ prefect.blocks.secret.git-token }}"}},
             {GIT: {"repository": "https://h/s.git",
                    "credentials": "{{prefect.blocks.github-credentials.ci}}"}},
             {REMOTE: {"url": "s3://b", "secret": "{{ prefect.blocks.aws-credentials.prod."
                                                  "aws_secret_access_key }}"}}]
    assert block_references(steps) == {("secret", "git-token"), ("github-credentials", "ci"),
                                       ("aws-credentials", "prod")}
    assert block_secrets("secret", {"value": "tok-1"}) == {"tok-1"}
    assert block_secrets("secret", {"value": {"user": "u", "password": "p-2"}}) == {"u", "p-2"}
    assert block_secrets("github-credentials", {"token": "ghp_x", "owner": "me"}) == {"ghp_x"}
    assert block_secrets("aws-credentials", {"aws_access_key_id": "AKIA",
                                             "aws_secret_access_key": "s3cr3t",
                                             "region_name": "eu-west-1"}) == {"s3cr3t"}


# What Prefect 3.9.1 and git print (the RuntimeError carries git's lines once the entry script
# removed Prefect's generic hint).
CLONE = "RuntimeError: Failed to clone repository 'http://127.0.0.1:4000/r.git' with exit code 128."
STEP = "prefect.deployments.steps.core.StepExecutionError: Encountered error while running " \
       "prefect.deployments.steps.git_clone"


@pytest.mark.parametrize(("stderr", "expected"), [
    ("fatal: Authentication failed for 'http://127.0.0.1:4000/r.git/'",
     "refused the credentials"),
    ("fatal: could not read Username for 'http://127.0.0.1:4000': terminal prompts disabled",
     "refused the credentials"),
    ("git@127.0.0.1: Permission denied (publickey).", "refused the SSH key"),
    ("Host key verification failed.", "SSH host key of the git server is unknown"),
    ("fatal: Remote branch nope not found in upstream origin",
     "the branch or commit nope does not exist"),
    ("fatal: repository 'http://127.0.0.1:4000/x.git/' not found", "repository does not exist"),
    (("fatal: unable to access 'http://127.0.0.1:1/r.git/': Failed to connect to 127.0.0.1 "
     "port 1 after 0 ms: Couldn't connect to server"), "could not be reached"),
    ("ssh: connect to host 127.0.0.1 port 1: Connection refused", "could not be reached"),
    (("fatal: unable to access 'https://nowhere.invalid/r.git/': Could not resolve host: "
     "nowhere.invalid"), "the git host nowhere.invalid could not be resolved"),
])
def test_a_failed_clone_is_named(stderr: str, expected: str) -> None:
    output = ["Traceback (most recent call last):", f"{CLONE} git stderr: {stderr}", STEP]
    explanation = explain(output)
    assert explanation.startswith("the flow's code could not be pulled (git_clone): ")
    assert expected in explanation, explanation


@pytest.mark.parametrize(("line", "expected"), [
    (("botocore.exceptions.ClientError: An error occurred (InvalidAccessKeyId) when calling "
     "the ListObjectsV2 operation: The AWS Access Key Id you provided does not exist"),
     "refused the credentials"),
    (("PermissionError: The request signature we calculated does not match the signature you "
     "provided. (SignatureDoesNotMatch)"), "refused the credentials"),
    ("FileNotFoundError: The specified bucket does not exist (NoSuchBucket)",
     "the bucket does not exist"),
    (('botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: '
     '"http://127.0.0.1:1/b"'), "at http://127.0.0.1:1/b could not be reached"),
    ("botocore.exceptions.NoCredentialsError: Unable to locate credentials",
     "no credentials for the object store"),
])
def test_a_failed_download_is_named(line: str, expected: str) -> None:
    output = [line, ("prefect.deployments.steps.core.StepExecutionError: Encountered error "
              "while running prefect.deployments.steps.pull_from_remote_storage")]
    explanation = explain(output)
    assert explanation.startswith(
        "the flow's code could not be pulled (pull_from_remote_storage): "), explanation
    assert expected in explanation, explanation


def test_missing_tools_are_named_even_without_the_entry_script() -> None:
    assert "needs git" in explain([("FileNotFoundError: [Errno 2] No such file or directory: "
                                   "'git'"), STEP])
    assert "needs s3fs" in explain(["ImportError: Install s3fs to access S3"])
    marker = "dockerworker: the pull step git_clone needs git, and image x has no git"
    assert explain(["noise", marker, "more"]) == marker.removeprefix("dockerworker: ")


def test_output_without_a_failed_pull_explains_nothing() -> None:
    assert explain([]) == ""
    assert explain(["ValueError: the flow's own bug", "Last words"]) == ""
    assert explain(["Cloning into 'repo'...", "hello from the flow",
                    "RuntimeError: something else failed later"]) == ""
