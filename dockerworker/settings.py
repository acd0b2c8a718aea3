"""The worker's settings: one pydantic model, filled from CLI flags and the environment.

`WorkerSettings` is the one place that knows each setting's default, bounds, flag, env
variable and help: `dockerworker start`'s options are generated from it (cli.py), so the
command line and the model cannot disagree.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from .builds import BuildOptions
from .policy import Policy

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
API_URL_ENV = "PREFECT_API_URL"


@dataclass(frozen=True)
class Flag:
    """How a setting appears on `dockerworker start`: its flag, short form and env variable.
    The default, bounds and help are the field's own (`Field(default, ge, le, description)`)."""

    name: str
    short: str | None = None
    env: str | None = None
    existing_file: bool = False  # a path that must name an existing file
    param: str | None = None  # the CLI parameter, when the flag names a file the field is read from


@dataclass(frozen=True)
class FromEnv:
    """A setting only the environment gives (credentials, pip's index): never a flag. With
    `file`, `<name>_FILE` may name a file holding the value instead (Docker's convention for
    secrets, as the postgres image's POSTGRES_PASSWORD_FILE): the value then never is in the
    worker's environment, hence not in `docker inspect` of its container."""

    name: str
    file: bool = False


class SecretSourceError(ValueError):
    """A secret given both ways, or by a file that cannot be read; the message names the
    variable and the file, never the value."""


REGISTRY_PREFIX = re.compile(r"[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*")
SECRETS_DIR = Path("/run/secrets")  # where compose and Swarm mount a container's secrets


def default_worker_name() -> str:
    """Stable across restarts, so a restarted worker knows its containers again. Compose
    replicas get distinct hostnames; several workers on one host need `--name` each."""
    return f"dockerworker-{socket.gethostname()}"


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class WorkerSettings(BaseModel):
    """Everything `dockerworker start` is told; the order here is the order of `--help`."""

    pool: Annotated[str, Flag("--pool", "-p", env="DOCKERWORKER_POOL")] = Field(
        description="Work pool to serve (created with type docker if missing).")
    work_queues: Annotated[list[str], Flag("--work-queue", "-q")] = Field(
        default_factory=list,
        description="Only take runs from this queue (repeatable; default: all queues).")
    name: Annotated[str, Flag("--name", "-n", env="DOCKERWORKER_NAME")] = Field(
        default_factory=default_worker_name,
        description="Worker name shown in the pool; a restarted worker adopts the containers "
                    "carrying it (default: dockerworker-<hostname>).")
    limit: Annotated[int | None, Flag("--limit", "-l", env="DOCKERWORKER_LIMIT")] = Field(
        default=None, ge=1,
        description="Most flow runs this worker runs at once (default: no limit).")
    poll_interval: Annotated[float, Flag("--poll-interval", env="DOCKERWORKER_POLL_INTERVAL")] = (
        Field(default=5.0, ge=0.1,
              description="Seconds between polls for runs while the server's event stream is "
                          "not connected (an old server, a proxy without websockets)."))
    poll_interval_with_events: Annotated[
        float, Flag("--poll-interval-with-events", env="DOCKERWORKER_POLL_INTERVAL_WITH_EVENTS")
    ] = Field(default=30.0, ge=1,
              description="Seconds between polls while the event stream is connected: it "
                          "announces new runs at once, the poll is the net, and it looks this "
                          "far ahead for runs scheduled in between (keep it under 60: the "
                          "server marks queues not ready after 60 s without a poll).")
    prefetch_seconds: Annotated[
        float, Flag("--prefetch-seconds", env="DOCKERWORKER_PREFETCH_SECONDS")
    ] = Field(default=10.0, ge=0, description="Claim runs scheduled up to this many seconds ahead.")
    heartbeat_interval: Annotated[
        float, Flag("--heartbeat-interval", env="DOCKERWORKER_HEARTBEAT_INTERVAL")
    ] = Field(default=30.0, ge=1, description="Seconds between heartbeats to the pool.")
    max_starting: Annotated[int, Flag("--max-starting", env="DOCKERWORKER_MAX_STARTING")] = Field(
        default_factory=lambda: os.cpu_count() or 2, ge=0,
        description="Most runs starting at once (claimed, not yet RUNNING) on this Docker "
                    "engine: other workers' fresh starts there count too; the rest stay "
                    "scheduled for the next poll or another worker. 0: no bound (default: "
                    "the number of CPUs).")
    warm: Annotated[int, Flag("--warm", env="DOCKERWORKER_WARM")] = Field(
        default=0, ge=0, le=32,
        description="Warm starts: keep up to this many containers with Prefect already "
                    "imported waiting for runs, shared among the job configurations in use (at "
                    "least one each, the most recently used first); each still serves one run. "
                    "Runs due up to 60 s past a poll's look-ahead are warmed for ahead.")
    run_once: Annotated[bool, Flag("--run-once")] = Field(
        default=False,
        description="Process the runs that are due now, wait for them (cancelling those "
                    "cancelled meanwhile), then exit.")
    drain: Annotated[bool, Flag("--drain", env="DOCKERWORKER_DRAIN")] = Field(
        default=False,
        description="On SIGTERM/SIGINT, wait for this worker's runs to finish before exiting "
                    "(default: leave their containers running for the next worker to adopt).")
    health_port: Annotated[int | None, Flag("--health-port", env="DOCKERWORKER_HEALTH_PORT")] = (
        Field(default=None, ge=0, le=65535,
              description="Serve GET /health (200 while the loop polls) and GET /metrics "
                          "(Prometheus) on this port."))
    api_url: Annotated[str, Flag("--api-url", env=API_URL_ENV)] = Field(
        default=DEFAULT_API_URL, description="Prefect API URL.")
    api_patience: Annotated[float, Flag("--api-patience", env="DOCKERWORKER_API_PATIENCE")] = (
        Field(default=120.0, ge=1,
              description="Seconds a call to the server is retried (no connection, timeout, "
                          "429, 5xx) before the worker gives up on it: a run it was starting "
                          "is rescheduled (an infrastructure retry), a periodic round is "
                          "tried again at its next turn. Raise it to ride out longer server "
                          "restarts."))
    api_key: Annotated[SecretStr | None, FromEnv("PREFECT_API_KEY", file=True)] = None
    auth_string: Annotated[SecretStr | None, FromEnv("PREFECT_API_AUTH_STRING", file=True)] = None
    build_network_mode: Annotated[
        str | None, Flag("--build-network", env="DOCKERWORKER_BUILD_NETWORK")
    ] = Field(default=None,
              description="Network mode for dependency image builds (e.g. host).")
    build_ca_bundle: Annotated[
        Path | None,
        Flag("--build-ca-bundle", env="DOCKERWORKER_BUILD_CA_BUNDLE", existing_file=True),
    ] = Field(default=None,
              description="CA bundle pip trusts inside builds (TLS-inspecting proxies).")
    pip_index_url: Annotated[str | None, FromEnv("PIP_INDEX_URL", file=True)] = None
    pip_extra_index_url: Annotated[str | None, FromEnv("PIP_EXTRA_INDEX_URL", file=True)] = None
    build_timeout: Annotated[
        float, Flag("--build-timeout", env="DOCKERWORKER_BUILD_TIMEOUT")
    ] = Field(default=BuildOptions.timeout, ge=1,  # the builder's default, stated once there
              description="Seconds a dependency image build may take.")
    build_push: Annotated[
        str | None, Flag("--build-push", env="DOCKERWORKER_BUILD_PUSH")
    ] = Field(default=None,
              description="Push dependency images to this registry (host[:port][/path]) as "
                          "REGISTRY/dockerworker/<name>:<hash> before their runs start, and run "
                          "them by that name and digest: every Swarm node can pull them. "
                          "Credentials: the worker's Docker config (docker login).")
    swarm_gpu_kind: Annotated[
        str, Flag("--swarm-gpu-kind", env="DOCKERWORKER_SWARM_GPU_KIND")
    ] = Field(default="NVIDIA-GPU", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
              description="--runtime swarm: the generic resource kind a job's `gpus` count "
                          "reserves; nodes advertise it (dockerd --node-generic-resource "
                          "KIND=ID).")
    policy: Annotated[
        Policy,
        Flag("--policy", env="DOCKERWORKER_POLICY_FILE", existing_file=True, param="policy_file"),
    ] = Field(default_factory=Policy,  # the CLI reads the file: Policy.load
              description="Policy file (TOML): what deployments may ask of Docker. "
                          "Default: the safe built-in policy.")
    secrets_dir: Annotated[Path, Flag("--secrets-dir", env="DOCKERWORKER_SECRETS_DIR")] = Field(
        default=SECRETS_DIR,
        description="Directory of the files a job may give its flow (job variable `secrets`, "
                    "allowed by the policy's allowed_secrets), each at /run/secrets/NAME in a "
                    "tmpfs of the flow container.")
    runtime: Annotated[Literal["docker", "swarm"],
                       Flag("--runtime", env="DOCKERWORKER_RUNTIME")] = Field(
        default="docker", description="docker: each run a container on this engine; swarm: "
        "each run a Swarm job, submitted through this engine (a manager) and placed by Swarm "
        "(docs/swarm.md).")
    log_level: Annotated[LogLevel, Flag("--log-level", env="DOCKERWORKER_LOG_LEVEL")] = Field(
        default="INFO", description="How much the worker's console says.")
    log_format: Annotated[Literal["console", "json"],
                          Flag("--log-format", env="DOCKERWORKER_LOG_FORMAT")] = Field(
        default="console", description="console: lines for people; json: one JSON object a "
        "line (time, level, logger, message, flow_run_id/flow_run_name) for log aggregators.")

    @field_validator("build_push")
    @classmethod
    def _a_registry_prefix(cls, value: str | None) -> str | None:
        """A registry host (with port and path, as images are named), never a URL."""
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not REGISTRY_PREFIX.fullmatch(value):
            raise ValueError(f"{value!r} is not a registry as images name it: host[:port][/path] "
                             "(e.g. registry.example.com:5000/team), without a scheme or tag")
        return value

    @model_validator(mode="after")
    def _swarm_fits_the_policy(self) -> WorkerSettings:
        """Fail at start, not on every run: a Swarm service cannot take no-new-privileges on
        the engines this targets, so the operator must say the policy does without it."""
        if self.runtime == "swarm" and self.policy.no_new_privileges:
            raise ValueError("--runtime swarm: Swarm services cannot set no-new-privileges "
                             "(not before Docker 25, API 1.44); set `no_new_privileges = false` "
                             "in the worker's policy (--policy) to run Swarm jobs without it")
        return self

    def build_options(self) -> BuildOptions:
        return BuildOptions(
            network_mode=self.build_network_mode,
            ca_bundle=self.build_ca_bundle,
            pip_index_url=self.pip_index_url,
            pip_extra_index_url=self.pip_extra_index_url,
            timeout=self.build_timeout,
            push=self.build_push,
        )

    def secrets(self) -> set[str]:
        """The worker's own credentials: masked wherever text leaves the worker."""
        found = set()
        for secret in (self.api_key, self.auth_string):
            if secret:
                value = secret.get_secret_value()
                found.update({value, value.partition(":")[2]} - {""})
        for index_url in (self.pip_index_url, self.pip_extra_index_url):
            parts = urlsplit(index_url or "")
            token = parts.password or parts.username  # `https://TOKEN@host/simple` too
            if token:
                found |= {token, unquote(token)}
        return found

    def stream_token(self) -> str | None:
        """What the event stream's auth message carries (as Prefect's own client sends)."""
        for secret in (self.api_key, self.auth_string):
            if secret:
                return secret.get_secret_value()
        return None

    def auth_headers(self) -> dict[str, str]:
        """The same credentials as HTTP headers, for the websocket handshake."""
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key.get_secret_value()}"}
        if self.auth_string:
            token = base64.b64encode(self.auth_string.get_secret_value().encode()).decode()
            return {"Authorization": f"Basic {token}"}
        return {}

    def auth_env(self) -> dict[str, str]:
        """The credentials a flow container needs to talk to the same server."""
        env = {}
        if self.api_key:
            env["PREFECT_API_KEY"] = self.api_key.get_secret_value()
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string.get_secret_value()
        return env


def flags() -> dict[str, Flag]:
    """Each flagged setting's Flag, by field name, in the model's order."""
    return {
        name: meta
        for name, field in WorkerSettings.model_fields.items()
        for meta in field.metadata
        if isinstance(meta, Flag)
    }


def _from_env() -> dict[str, FromEnv]:
    return {
        name: meta
        for name, field in WorkerSettings.model_fields.items()
        for meta in field.metadata
        if isinstance(meta, FromEnv)
    }


def env_only_values(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The settings only the environment gives, read from it (or their `_FILE`s) now; unset
    or empty: None. Raises SecretSourceError."""
    environ = os.environ if environ is None else environ
    return {name: env_or_file(meta.name, environ) if meta.file else environ.get(meta.name) or None
            for name, meta in _from_env().items()}


def env_or_file(name: str, environ: Mapping[str, str]) -> str | None:
    """`name`'s value, or the content of the file `name_FILE` names (surrounding whitespace
    dropped: `echo secret > file` leaves a newline). Both set is an error, not a choice: the
    operator would not know which one the worker uses."""
    value, path = environ.get(name) or None, environ.get(f"{name}_FILE") or None
    if value and path:
        raise SecretSourceError(f"both {name} and {name}_FILE are set: set only one")
    return read_secret_file(Path(path), f"{name}_FILE") if path else value


def read_secret_file(path: Path, what: str) -> str:
    """A secret file's text, stripped; SecretSourceError when unreadable or empty."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc.__class__.__name__
        raise SecretSourceError(f"{what}={path}: cannot read it ({reason})") from None
    if not value:
        raise SecretSourceError(f"{what}={path} is empty")
    return value


def credentials_reader(environ: Mapping[str, str] | None = None
                       ) -> Callable[[], tuple[str | None, str | None]] | None:
    """When the API key or auth string comes from a file: a function that reads both again
    (API key, auth string), for a secret rotated while the worker runs; else None."""
    environ = dict(os.environ if environ is None else environ)
    if not any(environ.get(f"{_from_env()[n].name}_FILE") for n in ("api_key", "auth_string")):
        return None

    def read() -> tuple[str | None, str | None]:
        values = env_only_values(environ)
        return values["api_key"], values["auth_string"]

    return read


def docker_host_description() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
