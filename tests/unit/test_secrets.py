"""Secrets the Docker way: the worker's credentials from `*_FILE`s (read again when the server
refuses them), and the job variable `secrets`: allowed by the policy, never in the container's
create settings, written by the entry script into its tmpfs."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from dockerworker import cli, entry_script
from dockerworker.api import AuthRejected, FlowRun, PrefectAPI, WorkPool
from dockerworker.containers import SECRETS_TMPFS, build_spec
from dockerworker.jobs import InvalidJobVariables, JobVariables, resolve_job
from dockerworker.policy import Masker, Policy
from dockerworker.prepare import Preparation, secret_texts
from dockerworker.settings import (
    SecretSourceError,
    WorkerSettings,
    credentials_reader,
    env_only_values,
)
from dockerworker.verdict import RunCrashed


# --- the worker's own credentials from files -----------------------------------------------
def test_a_file_gives_the_value_stripped(tmp_path: Path) -> None:
    (tmp_path / "auth").write_text("admin:s3cret-pass\n")
    (tmp_path / "index").write_text("https://tok3n@pypi.example/simple\n")
    values = env_only_values({"PREFECT_API_AUTH_STRING_FILE": str(tmp_path / "auth"),
                              "PIP_INDEX_URL_FILE": str(tmp_path / "index")})
    assert values["auth_string"] == "admin:s3cret-pass"
    assert values["pip_index_url"] == "https://tok3n@pypi.example/simple"
    assert values["api_key"] is None


@pytest.mark.parametrize("environ, words", [
    ({"PREFECT_API_KEY": "k", "PREFECT_API_KEY_FILE": "/x"}, ["both", "PREFECT_API_KEY_FILE"]),
    ({"PREFECT_API_KEY_FILE": "/nonexistent/key"}, ["/nonexistent/key", "cannot read"]),
])
def test_both_or_an_unusable_file_is_a_clear_error(environ: dict, words: list[str]) -> None:
    with pytest.raises(SecretSourceError) as caught:
        env_only_values(environ)
    assert all(word in str(caught.value) for word in words), caught.value


def test_an_empty_file_is_an_error_that_never_shows_a_value(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(SecretSourceError, match="is empty"):
        env_only_values({"PREFECT_API_AUTH_STRING_FILE": str(tmp_path / "empty")})


def test_start_refuses_both_with_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file-value")
    result = CliRunner().invoke(cli.main, ["start", "-p", "p"], env={
        "PREFECT_API_KEY": "from-env-value", "PREFECT_API_KEY_FILE": str(tmp_path / "key")})
    assert result.exit_code == 2
    assert "PREFECT_API_KEY_FILE" in result.output
    assert "from-env-value" not in result.output and "from-file-value" not in result.output


def test_credentials_are_read_again_only_when_a_file_gives_them(tmp_path: Path) -> None:
    assert credentials_reader({"PREFECT_API_KEY": "k"}) is None
    path = tmp_path / "auth"
    path.write_text("admin:one")
    read = credentials_reader({"PREFECT_API_AUTH_STRING_FILE": str(path)})
    assert read is not None and read() == (None, "admin:one")
    path.write_text("admin:two\n")
    assert read() == (None, "admin:two")


def _api_with_server(accepted: str, reread: Any, rotated: list) -> tuple[PrefectAPI, list]:
    """A client whose server accepts only basic auth `accepted`; returns the Authorization
    headers it saw."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        header = request.headers.get("Authorization", "")
        seen.append(header)
        expected = "Basic " + base64.b64encode(accepted.encode()).decode()
        if header != expected:
            return httpx.Response(401, json={"exception_message": "Unauthorized"})
        if request.url.path.endswith("/csrf-token"):
            return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
        return httpx.Response(200, json=[])

    api = PrefectAPI("http://server/api", auth_string="admin:old", patience=0,
                     reread_credentials=reread, on_rotated=lambda *new: rotated.append(new))
    api._client = httpx.Client(base_url="http://server/api/", transport=httpx.MockTransport(answer))
    api._use_credentials(None, "admin:old")
    return api, seen


def test_a_rotated_file_is_picked_up_on_the_next_401() -> None:
    current = {"auth": "admin:new"}
    rotated: list = []
    api, seen = _api_with_server("admin:new", lambda: (None, current["auth"]), rotated)
    api.request("GET", "/work_pools/pool")  # 401 with the old one, then the new one from the file
    assert len(seen) == 2 and seen[0] != seen[1]
    assert rotated == [(None, "admin:new")]
    api.request("GET", "/work_pools/pool")
    assert len(seen) == 3  # the new credentials stay in use


def test_a_write_rotates_too_when_its_csrf_token_is_refused() -> None:
    rotated: list = []
    api, seen = _api_with_server("admin:new", lambda: (None, "admin:new"), rotated)
    api.read_work_queues("pool")  # GET /csrf-token: 401, then again, then the POST
    assert rotated == [(None, "admin:new")] and len(seen) == 3


def test_an_unchanged_file_leaves_the_401_an_auth_error() -> None:
    api, seen = _api_with_server("admin:other", lambda: (None, "admin:old"), [])
    with pytest.raises(AuthRejected, match="_FILE"):
        api.request("GET", "/work_pools/pool")
    assert len(seen) == 1


def test_rotation_tells_the_settings_and_the_logs_mask(tmp_path: Path, monkeypatch) -> None:
    """`start` wires the rotation: new credentials reach the settings flows are started
    with, both old and new stay masked, and the event stream subscribes again."""
    path = tmp_path / "auth"
    path.write_text("admin:first-secret")
    captured: dict[str, Any] = {}

    class FakeEvents:
        rotations = 0

        def credentials_rotated(self) -> None:
            self.rotations += 1

    class FakeWorker:
        def __init__(self, settings: WorkerSettings, api: PrefectAPI, docker_client: Any) -> None:
            captured.update(settings=settings, api=api)
            self.events = captured["events"] = FakeEvents()

        def run(self) -> int:
            return 0

    monkeypatch.setattr(cli, "Worker", FakeWorker)
    monkeypatch.setattr(cli, "connect_docker", lambda: None)
    monkeypatch.setattr(cli, "compose_worker_name", lambda client: None)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)
    monkeypatch.setattr(cli.logformat, "configure", lambda level, log_format: None)
    masks: list[Masker] = []
    monkeypatch.setattr(cli, "mask_logging", masks.append)
    result = CliRunner().invoke(cli.main, ["start", "-p", "p"],
                                env={"PREFECT_API_AUTH_STRING_FILE": str(path)})
    assert result.exit_code == 0, result.output
    assert "PREFECT_API_AUTH_STRING" not in os.environ
    path.write_text("admin:second-secret")
    api: PrefectAPI = captured["api"]
    assert api._rotated(api._credentials)
    settings: WorkerSettings = captured["settings"]
    assert settings.auth_env() == {"PREFECT_API_AUTH_STRING": "admin:second-secret"}
    assert masks[-1]("first-secret second-secret") == "*** ***"
    assert captured["events"].rotations == 1


# --- flow secrets: the job variable, the policy, the container ------------------------------
def test_secret_names_are_file_names_never_paths() -> None:
    assert JobVariables(secrets=["db_password", "api.token", "db_password"]).secrets == [
        "db_password", "api.token"]
    for bad in ("../etc/shadow", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(InvalidJobVariables, match="secrets"):
            resolve_job({}, {"secrets": [bad]})


def test_the_pool_template_offers_the_variable() -> None:
    assert resolve_job({}, {"secrets": ["db"]}).secrets == ["db"]


def test_the_policy_allows_only_the_secrets_it_names() -> None:
    job = JobVariables(secrets=["db_password", "other"])
    assert Policy().violations(job) == [
        "secrets[0]: secret 'db_password' is not allowed (allowed_secrets: none)",
        "secrets[1]: secret 'other' is not allowed (allowed_secrets: none)"]
    policy = Policy(allowed_secrets=["db_*"])
    assert policy.violations(job) == [
        "secrets[1]: secret 'other' is not allowed (allowed_secrets: ['db_*'])"]


def _spec(job: JobVariables, secrets: dict[str, bytes] | None = None) -> Any:
    run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4())
    pool = WorkPool(id=uuid.uuid4(), name="p", type="docker")
    spec = build_spec(job, flow_run=run, deployment=None, flow=None, pool=pool,
                      worker_name="w", api_url="http://prefect:4200/api", auth_env={})
    spec.secret_files = secrets or {}
    return spec


def test_the_container_gets_a_tmpfs_and_the_names_never_the_values() -> None:
    job = JobVariables(secrets=["db_password"],
                       container_create_kwargs={"tmpfs": {"/scratch": "size=1m"}})
    spec = _spec(job, {"db_password": b"hunter2-value"})
    kwargs = spec.create_kwargs
    assert kwargs["tmpfs"] == {"/scratch": "size=1m", "/run/secrets": SECRETS_TMPFS}
    assert kwargs["environment"]["DOCKERWORKER_SECRETS"] == "db_password"
    assert "hunter2-value" not in json.dumps(kwargs, default=str) + repr(spec)
    assert "tmpfs" not in _spec(JobVariables()).create_kwargs


def _preparation(secrets_dir: Path) -> Preparation:
    settings = WorkerSettings(pool="p", secrets_dir=secrets_dir)
    run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4())
    return Preparation(None, None, None, settings, run, None, None,  # type: ignore[arg-type]
                       print, str, threading.Event())


def test_secrets_are_read_from_the_secrets_dir(tmp_path: Path) -> None:
    (tmp_path / "db").write_bytes(b"value\n")
    prepare = _preparation(tmp_path)
    assert prepare.read_secrets(JobVariables(secrets=["db"])) == {"db": b"value\n"}
    with pytest.raises(RunCrashed, match="cannot read 'absent'") as missing:
        prepare.read_secrets(JobVariables(secrets=["absent"]))
    assert missing.value.reason == "invalid"
    with pytest.raises(RunCrashed, match="own `command`"):
        prepare.read_secrets(JobVariables(secrets=["db"], command="python x.py"))
    (tmp_path / "big").write_bytes(b"x" * (500 * 1024 + 1))  # Swarm's limit for a secret
    with pytest.raises(RunCrashed, match="larger than 512000 bytes") as big:
        prepare.read_secrets(JobVariables(secrets=["big"]))
    assert big.value.reason == "invalid"
    (tmp_path / "big").write_bytes(b"x" * 500 * 1024)
    assert len(prepare.read_secrets(JobVariables(secrets=["big"]))["big"]) == 500 * 1024


def test_what_is_masked_of_a_secret_file() -> None:
    pem = b"-----BEGIN KEY-----\nMIIEvQIBADANBgkq\nshort\n-----END KEY-----\n"
    texts = secret_texts({"key": pem, "db": b"hunter2-value\n"})
    assert {"hunter2-value", "MIIEvQIBADANBgkq", pem.decode().strip()} <= texts
    assert "short" not in texts
    masked = Masker(set()).with_secrets(texts)("password=hunter2-value")
    assert masked == "password=***"


# --- the entry script's side -----------------------------------------------------------------
@pytest.fixture
def pipe() -> Any:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def test_the_entry_script_writes_the_secrets_it_waits_for(
        pipe: tuple[int, int], tmp_path: Path, monkeypatch) -> None:
    read_fd, write_fd = pipe
    monkeypatch.setenv("DOCKERWORKER_SECRETS", "db,key")
    identity = json.dumps({"PREFECT__FLOW_RUN_ID": "abc"})
    values = {"db": base64.b64encode(b"v1").decode(), "key": base64.b64encode(b"\x00k").decode()}
    os.write(write_fd, f"{identity}\n{json.dumps(values)}\n".encode())  # in one chunk
    lines = entry_script.read_lines(read_fd)
    assert entry_script.wait_for_identity(lines, read_fd, 5) == {"PREFECT__FLOW_RUN_ID": "abc"}
    entry_script.receive_secrets(lines, str(tmp_path), timeout=5)
    assert (tmp_path / "db").read_bytes() == b"v1" and (tmp_path / "key").read_bytes() == b"\x00k"
    assert (tmp_path / "db").stat().st_mode & 0o777 == 0o400
    assert tmp_path.stat().st_mode & 0o777 == 0o555  # no file added or swapped from now on
    assert "DOCKERWORKER_SECRETS" not in os.environ


def test_the_entry_script_exits_when_the_secrets_never_come(
        pipe: tuple[int, int], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKERWORKER_SECRETS", "db")
    with pytest.raises(SystemExit, match="db never arrived"):
        entry_script.receive_secrets(entry_script.read_lines(pipe[0]), str(tmp_path),
                                     timeout=0.05)
    assert not list(tmp_path.iterdir())


def test_without_secrets_the_entry_script_reads_nothing(pipe: tuple[int, int]) -> None:
    entry_script.receive_secrets(entry_script.read_lines(pipe[0]), "/nonexistent", timeout=5)


def test_a_swarm_job_s_script_finds_its_mounted_secrets_without_reading_stdin(
        pipe: tuple[int, int], tmp_path: Path, monkeypatch) -> None:
    """No stdin on Swarm: Swarm mounted the files; the script must not wait for a line that
    never comes (the pipe stays empty: a wait would last the whole timeout)."""
    (tmp_path / "db").write_text("v1")
    monkeypatch.setenv("DOCKERWORKER_SECRETS", "db")
    monkeypatch.setenv("DOCKERWORKER_SECRETS_MOUNTED", "1")
    started = time.monotonic()
    entry_script.receive_secrets(entry_script.read_lines(pipe[0]), str(tmp_path), timeout=5)
    assert time.monotonic() - started < 1
    assert "DOCKERWORKER_SECRETS" not in os.environ
    assert "DOCKERWORKER_SECRETS_MOUNTED" not in os.environ


def test_a_swarm_job_whose_secret_is_not_mounted_exits_naming_it(
        pipe: tuple[int, int], tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "db").write_text("v1")
    monkeypatch.setenv("DOCKERWORKER_SECRETS", "db,key")
    monkeypatch.setenv("DOCKERWORKER_SECRETS_MOUNTED", "1")
    with pytest.raises(SystemExit, match=f"the secrets key are not in {tmp_path}"):
        entry_script.receive_secrets(entry_script.read_lines(pipe[0]), str(tmp_path),
                                     timeout=5)
