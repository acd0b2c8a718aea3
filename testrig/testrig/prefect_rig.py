"""Integration-test rig: a real Prefect server, a small REST client over it, Docker helpers.

Everything here talks to loopback and the local Docker engine only.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import docker.errors
import httpx

REPO_DIR = Path(__file__).resolve().parents[2]  # testrig/testrig/ -> the repository
TESTS_DIR = REPO_DIR / "tests"
if not (REPO_DIR / "dockerworker").is_dir() or not TESTS_DIR.is_dir():
    raise ImportError(f"testrig works from dockerworker's repository; {REPO_DIR} is not it "
                      "(install it editable: pip install -e ./testrig, as `make setup` does)")
PREFECT_IMAGE = "dockerworker/prefect:3.9.1-local"
# Tags of the images the tests build from this tree; a worktree sharing the engine with
# another checkout's tests gives its own (DOCKERWORKER_TEST_*_IMAGE) so neither retags the other's.
FLOWS_IMAGE = os.environ.get("DOCKERWORKER_TEST_FLOWS_IMAGE") or "dockerworker-test/flows:dev"
# The Prefect 2 compatibility set: the last 2.x release, its server in a venv of its own (made
# on first use, cached under testrig/.venvs/, gitignored) and a flow image built like the
# 3.x one (images/build-local.sh builds both Prefect images).
PREFECT2_VERSION = "2.20.27"
PREFECT2_IMAGE = f"dockerworker/prefect:{PREFECT2_VERSION}-local"
FLOWS2_IMAGE = f"dockerworker-test/flows:prefect-{PREFECT2_VERSION}"
VENVS_DIR = REPO_DIR / "testrig" / ".venvs"
FLOWS_DOCKERFILE = "images/flows.Dockerfile"
POOL_LABEL = "io.prefect.work-pool-name"
FINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_executable() -> str:
    """The `prefect` CLI of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "prefect"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("prefect")
    if not found:
        raise RuntimeError(f"no `prefect` next to {sys.executable} nor on PATH")
    return found


def prefect_venv_executable(version: str) -> str:
    """The `prefect` CLI of Prefect `version` in a venv of its own under testrig/.venvs/,
    made on first use (pip install, about a minute; a lock keeps parallel sessions from
    making it twice) and reused after: the dev venv holds Prefect 3 for the other tests."""
    venv = VENVS_DIR / f"prefect-{version}"
    executable = venv / "bin" / "prefect"
    done = venv / ".complete"
    if done.exists():
        return str(executable)
    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    with open(VENVS_DIR / f"prefect-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            installed = subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                 f"prefect=={version}"],
                capture_output=True, text=True, timeout=900, check=False,
            )
            if installed.returncode != 0:
                raise RuntimeError(f"pip install prefect=={version} into {venv} failed:\n"
                                   f"{installed.stdout}{installed.stderr}")
            done.write_text(version + "\n")
    return str(executable)


def server_env(home: Path) -> dict[str, str]:
    """Environment for a loopback-only server: no analytics, no UI, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    return env


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess; `url` ends in /api."""

    url: str
    home: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _owns_home: bool = field(default=False, repr=False)
    auth: tuple[str, str] | None = None  # basic auth, for a server started with an auth string
    version: str | None = None  # None: the Prefect of the running interpreter (3.x)
    csrf: bool = False  # started with PREFECT_SERVER_CSRF_PROTECTION_ENABLED

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0]) if self.version else 3

    @property
    def executable(self) -> str:
        """This server's `prefect` CLI (a Prefect 2 server needs a Prefect 2 client)."""
        return prefect_venv_executable(self.version) if self.version else prefect_executable()

    def output(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_healthy(self) -> bool:
        """True when GET /api/health answers true."""
        try:
            r = httpx.get(f"{self.url}/health", timeout=2, trust_env=False, auth=self.auth)
            return r.status_code == 200 and r.json() is True
        except (httpx.HTTPError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Block until healthy; raise RuntimeError with the server's output otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with {self.process.returncode}:\n{self.output()}"
                )
            if self.is_healthy():
                return
            time.sleep(0.25)
        raise RuntimeError(f"prefect server not healthy after {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (its whole process group); remove the home if we made it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        if self._owns_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_prefect_server(
    port: int | None = None,
    home: Path | str | None = None,
    *,
    wait: bool = True,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    version: str | None = None,
) -> PrefectServer:
    """Start `prefect server start` on 127.0.0.1 (SQLite under `home`).

    `version` (e.g. PREFECT2_VERSION): that Prefect's server, from its own venv (made on first
    use); default: the Prefect installed beside the tests (3.x).

    With `wait`, returns once /api/health is true. Reusing a `home` keeps the database, so a
    server can be stopped and started again on the same port with the same data. The caller
    stops it (`.stop()` or use it as a context manager).
    """
    port = port or free_port()
    owns_home = home is None
    home_path = Path(tempfile.mkdtemp(prefix="prefect-home-")) if home is None else Path(home)
    home_path.mkdir(parents=True, exist_ok=True)
    log_path = home_path / f"server-{port}-{int(time.time() * 1000)}.log"
    executable = prefect_venv_executable(version) if version else prefect_executable()
    cmd = [
        executable, "server", "start",
        "--host", "127.0.0.1", "--port", str(port),
        "--no-ui", "--analytics-off",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            env={**server_env(home_path), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = PrefectServer(
        url=f"http://127.0.0.1:{port}/api",
        home=home_path,
        port=port,
        process=process,
        log_path=log_path,
        _owns_home=owns_home,
        auth=_basic_auth((env or {}).get("PREFECT_SERVER_API_AUTH_STRING")),
        version=version,
        csrf=(env or {}).get("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "").lower() == "true",
    )
    if wait:
        try:
            server.wait_healthy(timeout)
        except Exception:
            server.stop()
            raise
    return server


def _basic_auth(auth_string: str | None) -> tuple[str, str] | None:
    if not auth_string:
        return None
    user, _, password = auth_string.partition(":")
    return user, password


class PrefectRig:
    """Synchronous helper over the Prefect REST API, for test setup and assertions."""

    def __init__(self, api_url: str, timeout: float = 30.0, auth: tuple[str, str] | None = None,
                 csrf: bool = False) -> None:
        self.api_url = api_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.api_url, timeout=timeout, trust_env=False, auth=auth
        )
        # A server with CSRF protection wants a token on every write (its own client id);
        # without `csrf`, the first write it refuses turns this on.
        self.csrf_client = f"testrig-{uuid.uuid4()}" if csrf else None
        self._csrf_token: str | None = None

    def csrf_token(self, client: str) -> str:
        """A new CSRF token for `client` (it replaces the one the server held for it)."""
        response = self.http.get("/csrf-token", params={"client": client})
        if response.is_error:
            raise AssertionError(f"GET /csrf-token -> {response.status_code}: {response.text}")
        return str(response.json()["token"])

    def _headers(self, method: str, refresh: bool = False) -> dict[str, str]:
        if self.csrf_client is None or method not in ("POST", "PUT", "PATCH", "DELETE"):
            return {}
        if refresh or self._csrf_token is None:
            self._csrf_token = self.csrf_token(self.csrf_client)
        return {"Prefect-Csrf-Token": self._csrf_token, "Prefect-Csrf-Client": self.csrf_client}

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """One request; a 503 (SQLite busy under concurrent writers) is tried again."""
        for _ in range(10):
            response = self.http.request(method, path, json=json, headers=self._headers(method))
            if response.status_code == 403 and "CSRF" in response.text:
                # A server with CSRF protection (seen here first), or our token expired.
                self.csrf_client = self.csrf_client or f"testrig-{uuid.uuid4()}"
                response = self.http.request(method, path, json=json,
                                             headers=self._headers(method, refresh=True))
            if response.status_code != 503:
                break
            time.sleep(0.5)
        return response

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        response = self._request(method, path, json)
        if response.is_error:
            raise AssertionError(
                f"{method} {path} -> {response.status_code}: {response.text[:2000]}"
            )
        return response.json() if response.content else None

    def create_work_pool(
        self, name: str, type: str = "docker", base_job_template: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Create a work pool and return it."""
        body: dict[str, Any] = {"name": name, "type": type}
        if base_job_template is not None:
            body["base_job_template"] = base_job_template
        return self._call("POST", "/work_pools/", body)

    def create_work_queue(self, pool: str, name: str, priority: int) -> dict[str, Any]:
        """Create a queue of `pool` (priority 1 is the highest; the server shifts the others)."""
        return self._call("POST", f"/work_pools/{pool}/queues",
                          {"name": name, "priority": priority})

    def read_work_pool(self, name: str) -> dict[str, Any]:
        """Read a work pool by name."""
        return self._call("GET", f"/work_pools/{name}")

    def delete_work_pool(self, name: str) -> None:
        """Delete a work pool; a missing one is fine."""
        response = self._request("DELETE", f"/work_pools/{name}")
        if response.status_code not in (200, 204, 404):
            raise AssertionError(f"DELETE work pool {name} -> {response.status_code}")

    def create_deployment(
        self,
        pool: str,
        entrypoint: str,
        job_variables: dict[str, Any] | None = None,
        path: str | None = "/opt/flows",
        name: str | None = None,
        work_queue_name: str | None = None,
        **extra: Any,
    ) -> str:
        """Create (flow and) deployment for `entrypoint` like "flows.py:hello"; return its id.

        With `path` and a "file.py:func" entrypoint and no pull steps, `prefect flow-run
        execute` imports `path`/file.py. `extra` goes into the body (e.g. pull_steps).
        """
        func = entrypoint.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        flow = self._call("POST", "/flows/", {"name": func.replace("_", "-")})
        body: dict[str, Any] = {
            "name": name or f"{func}-{uuid.uuid4().hex[:8]}",
            "flow_id": flow["id"],
            "entrypoint": entrypoint,
            "path": path,
            "work_pool_name": pool,
            "work_queue_name": work_queue_name,
            "job_variables": job_variables or {},
            "enforce_parameter_schema": False,
            **extra,
        }
        return str(self._call("POST", "/deployments/", body)["id"])

    def create_secret_block(self, name: str, value: str) -> str:
        """A Secret block document (`{{ prefect.blocks.secret.NAME }}`); return its id."""
        block_type = self._call("GET", "/block_types/slug/secret")
        (schema, *_) = self._call("POST", "/block_schemas/filter", {
            "block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}})
        return str(self._call("POST", "/block_documents/", {
            "name": name, "block_type_id": block_type["id"], "block_schema_id": schema["id"],
            "data": {"value": value}})["id"])

    def delete_deployment(self, deployment_id: str) -> None:
        """Delete a deployment; a missing one is fine."""
        response = self._request("DELETE", f"/deployments/{deployment_id}")
        if response.status_code not in (200, 204, 404):
            raise AssertionError(f"DELETE deployment -> {response.status_code}")

    def create_flow_run(
        self,
        deployment_id: str,
        parameters: dict[str, Any] | None = None,
        job_variables: dict[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """Create a (Scheduled, due now) flow run of a deployment; return its id."""
        body: dict[str, Any] = {"parameters": parameters or {}, **extra}
        if job_variables is not None:
            body["job_variables"] = job_variables
        return str(self._call("POST", f"/deployments/{deployment_id}/create_flow_run", body)["id"])

    def create_flow_run_due(self, deployment_id: str, due: datetime, **extra: Any) -> str:
        """A flow run of a deployment scheduled for `due`, as a deployment's schedule makes
        them (ahead of their time); return its id."""
        return self.create_flow_run(deployment_id, state={
            "type": "SCHEDULED", "name": "Scheduled",
            "state_details": {"scheduled_time": due.isoformat()}}, **extra)

    def claimed_at(self, flow_run_id: str) -> datetime:
        """When the run was first claimed: its first PENDING state."""
        return min(datetime.fromisoformat(s["timestamp"])
                   for s in self.read_state_history(flow_run_id) if s["type"] == "PENDING")

    def create_orphan_flow_run(self, pool: str) -> str:
        """A scheduled run in `pool` whose deployment does not exist (deleting a deployment
        deletes its runs, so this is how a run outlives its deployment)."""
        flow = self._call("POST", "/flows/", {"name": "orphan"})
        body = {
            "flow_id": flow["id"],
            "deployment_id": str(uuid.uuid4()),
            "work_pool_name": pool,
            "work_queue_name": "default",
            "state": {"type": "SCHEDULED", "name": "Scheduled"},
        }
        return str(self._call("POST", "/flow_runs/", body)["id"])

    def read_flow_run(self, flow_run_id: str) -> dict[str, Any]:
        """Read a flow run."""
        return self._call("GET", f"/flow_runs/{flow_run_id}")

    def set_state(
        self, flow_run_id: str, type: str, name: str | None = None, force: bool = False
    ) -> dict[str, Any]:
        """Propose a state; returns the orchestration result (`status`: ACCEPT/REJECT/...)."""
        state = {"type": type, "name": name or type.title()}
        return self._call(
            "POST", f"/flow_runs/{flow_run_id}/set_state", {"state": state, "force": force}
        )

    def wait_for_final(
        self, flow_run_id: str, timeout: float = 120.0, interval: float = 0.5
    ) -> dict[str, Any]:
        """Poll until the run is COMPLETED/FAILED/CRASHED/CANCELLED; return the run."""
        deadline = time.monotonic() + timeout
        run = self.read_flow_run(flow_run_id)
        while state_type(run) not in FINAL_STATE_TYPES:
            if time.monotonic() > deadline:
                state = run.get("state") or {}
                raise AssertionError(
                    f"flow run {flow_run_id} not final after {timeout} s; last state "
                    f"{state.get('type')}/{state.get('name')}: {state.get('message')!r}"
                )
            time.sleep(interval)
            run = self.read_flow_run(flow_run_id)
        return run

    def wait_for_state(
        self, flow_run_id: str, types: set[str] | str, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Poll until the run's state type is one of `types`; return the run."""
        wanted = {types} if isinstance(types, str) else set(types)
        deadline = time.monotonic() + timeout
        run = self.read_flow_run(flow_run_id)
        while state_type(run) not in wanted:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {flow_run_id} never reached {sorted(wanted)} in {timeout} s; "
                    f"last state {state_type(run)}"
                )
            time.sleep(0.25)
            run = self.read_flow_run(flow_run_id)
        return run

    def wait_for_log(self, flow_run_id: str, text: str, timeout: float = 20.0) -> None:
        """Until a log line of the run contains `text` (output is shipped in batches)."""
        deadline = time.monotonic() + timeout
        while not any(text in log["message"] for log in self.read_logs(flow_run_id)):
            if time.monotonic() > deadline:
                messages = [log["message"] for log in self.read_logs(flow_run_id)]
                raise AssertionError(f"no log line with {text!r} after {timeout} s: {messages}")
            time.sleep(0.3)

    def read_states(self, flow_run_id: str) -> list[str]:
        """The run's state types, oldest first."""
        return [s["type"] for s in self.read_state_history(flow_run_id)]

    def read_state_history(self, flow_run_id: str) -> list[dict[str, Any]]:
        """The run's states (type, name, message, …), oldest first."""
        states = self._call("GET", f"/flow_run_states/?flow_run_id={flow_run_id}")
        return sorted(states, key=lambda s: s["timestamp"])

    def resume_flow_run(self, flow_run_id: str) -> dict[str, Any]:
        """Resume a paused or suspended run, as `prefect flow-run resume` does."""
        return self._call("POST", f"/flow_runs/{flow_run_id}/resume", {})

    def read_logs_page(
        self, flow_run_id: str, offset: int = 0, limit: int = 200
    ) -> list[dict[str, Any]]:
        """One page of a flow run's logs, oldest first."""
        return self._call(
            "POST",
            "/logs/filter",
            {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "sort": "TIMESTAMP_ASC",
                "limit": limit,
                "offset": offset,
            },
        )

    def read_logs(self, flow_run_id: str) -> list[dict[str, Any]]:
        """All logs of a flow run, oldest first."""
        logs: list[dict[str, Any]] = []
        while True:
            page = self.read_logs_page(flow_run_id, offset=len(logs))
            logs.extend(page)
            if len(page) < 200:
                return logs


def state_type(run: dict[str, Any]) -> str | None:
    """The state type of a flow run dict (None if it has no state)."""
    return (run.get("state") or {}).get("type")


def log_messages(logs: list[dict[str, Any]]) -> list[str]:
    """Just the messages of `PrefectRig.read_logs` output."""
    return [entry["message"] for entry in logs]


def build_flow_image(client: Any, tag: str = FLOWS_IMAGE, base: str = PREFECT_IMAGE) -> str:
    """Build tests/images/flows.Dockerfile (context: tests/) with the Docker SDK; return tag.
    For Prefect 2: `build_flow_image(client, FLOWS2_IMAGE, PREFECT2_IMAGE)`."""
    client.images.build(
        path=str(TESTS_DIR),
        dockerfile=FLOWS_DOCKERFILE,
        tag=tag,
        buildargs={"PREFECT_IMAGE": base},
        rm=True,
        forcerm=True,
        pull=False,
    )
    return tag


def remove_pool_containers(client: Any, pool: str) -> list[str]:
    """Force-remove every container labelled with work pool `pool`; return their names."""
    removed = []
    for container in client.containers.list(
        all=True, sparse=True, filters={"label": f"{POOL_LABEL}={pool}"}
    ):
        with contextlib.suppress(docker.errors.APIError):  # already gone or being removed
            container.remove(force=True)
            removed.append(container.name)
    return removed


WORKER_IMAGE = os.environ.get("DOCKERWORKER_TEST_WORKER_IMAGE") or "dockerworker/worker:test"
LOCAL_BASE = "dockerworker/local-python:bookworm"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def build_worker_image(client: Any, tag: str = WORKER_IMAGE) -> str:
    """Build the top-level Dockerfile from the local base (no registry here), with the host's
    CA bundle as build-ca.crt and host networking so pip reaches PyPI; return the tag."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("Dockerfile", "pyproject.toml", "README.md"):
            tar.add(REPO_DIR / name, arcname=name)
        tar.add(REPO_DIR / "dockerworker", arcname="dockerworker",
                filter=lambda info: None if "__pycache__" in info.name else info)
        if HOST_CA.exists():
            tar.add(HOST_CA, arcname="build-ca.crt")
    buffer.seek(0)
    client.images.build(
        fileobj=buffer, custom_context=True, tag=tag, network_mode="host", rm=True,
        forcerm=True, pull=False, buildargs={"BASE_IMAGE": LOCAL_BASE},
    )
    return tag


COMPOSE_FILE = REPO_DIR / "compose" / "docker-compose.yml"
LOCAL_POSTGRES = "dockerworker/postgres:15-local-2"
LOCAL_PROMETHEUS = "dockerworker/prometheus:2.42-local"  # images/prometheus-local


def compose_command() -> list[str]:
    """`docker compose` (v2) when present, else Debian's docker-compose (v1, --compatibility
    so that deploy.replicas is honoured)."""
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose", "--compatibility"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is installed")


@dataclass
class ComposeStack:
    """compose/docker-compose.yml brought up with this machine's local images."""

    project: str
    port: int
    pool: str
    env: dict[str, str]
    prometheus_port: int | None = None  # set: profile `monitoring` too
    auth: tuple[str, str] | None = None  # the server's basic auth (the stack's secret)
    temporary_secrets: bool = True  # down() removes SECRETS_DIR (a test's own)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def prometheus_url(self) -> str:
        if self.prometheus_port is None:
            raise RuntimeError("this stack runs without the monitoring profile")
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def network(self) -> str:
        return self.project

    def command(self, *args: str) -> list[str]:
        profiles = ["--profile", "monitoring"] if self.prometheus_port is not None else []
        return [*compose_command(), *profiles, "-p", self.project, "-f", str(COMPOSE_FILE),
                *args]

    def up(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command("up", "-d", "--no-build"), env=self.env,
                              capture_output=True, text=True, timeout=600, check=False)

    def logs(self, tail: int = 40) -> str:
        return subprocess.run(self.command("logs", "--no-color", "--tail", str(tail)),
                              env=self.env, capture_output=True, text=True, timeout=120,
                              check=False).stdout

    def down(self) -> None:
        subprocess.run(self.command("down", "-v", "--remove-orphans", "-t", "5"), env=self.env,
                       capture_output=True, timeout=300, check=False)
        if self.temporary_secrets and self.env.get("SECRETS_DIR"):
            shutil.rmtree(self.env["SECRETS_DIR"], ignore_errors=True)

    def wait_for_workers(self, count: int, timeout: float = 240) -> list[dict[str, Any]]:
        """Until `count` workers are ONLINE in the pool; returns them."""
        rig = PrefectRig(self.api_url, auth=self.auth)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    workers = rig._call("POST", f"/work_pools/{self.pool}/workers/filter", {})
                    online = [w for w in workers if w["status"] == "ONLINE"]
                except (AssertionError, httpx.HTTPError):
                    online = []
                if len(online) >= count:
                    return online
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(online)} workers online:\n{self.logs()}")
                time.sleep(2)
        finally:
            rig.close()


def stack_secrets(secrets_dir: Path) -> tuple[str, str]:
    """The stack's secret files in `secrets_dir`, as the docs say to make them: made when
    absent, kept when present (a stack that stays up keeps its password); the auth pair."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    for name, value in (("prefect_auth_string", f"admin:{uuid.uuid4().hex}"),
                        ("postgres_password", uuid.uuid4().hex)):
        path = secrets_dir / name
        if not path.exists():
            path.write_text(value + "\n")
            path.chmod(0o444)
    user, _, password = (secrets_dir / "prefect_auth_string").read_text().strip().partition(":")
    return user, password


def compose_stack(client: Any, pool: str, project: str, port: int,
                  prometheus_port: int | None = None,
                  prometheus_config: Path | None = None,
                  secrets_dir: Path | None = None) -> ComposeStack:
    """The stack's settings with local images (built here: no registry), not yet up. With
    `prometheus_port`, profile `monitoring` too: Prometheus published on that loopback port,
    its config from `prometheus_config` (default: compose/prometheus/). Its secrets in
    `secrets_dir` (default: a temporary directory, removed by `down()`)."""
    client.images.get(LOCAL_POSTGRES)  # images/build-local.sh builds it
    client.images.get(PREFECT_IMAGE)
    temporary = secrets_dir is None
    secrets_dir = secrets_dir or Path(tempfile.mkdtemp(prefix="dw-compose-secrets-"))
    auth = stack_secrets(secrets_dir)
    env = {
        "SECRETS_DIR": str(secrets_dir),
        **os.environ,
        "POSTGRES_IMAGE": LOCAL_POSTGRES,
        "PREFECT_IMAGE": PREFECT_IMAGE,
        "DOCKERWORKER_IMAGE": build_worker_image(client),
        "PREFECT_PORT": str(port),
        "PREFECT_NETWORK": project,
        "DOCKERWORKER_POOL": pool,
        "DOCKERWORKER_POLL_INTERVAL": "1",
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
    }
    if prometheus_port is not None:
        client.images.get(LOCAL_PROMETHEUS)
        env["PROMETHEUS_IMAGE"] = LOCAL_PROMETHEUS
        env["PROMETHEUS_PORT"] = str(prometheus_port)
        if prometheus_config is not None:
            env["PROMETHEUS_CONFIG_DIR"] = str(prometheus_config)
    return ComposeStack(project, port, pool, env, prometheus_port, auth, temporary)
