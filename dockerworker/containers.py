"""The Docker side of a flow run: the container's settings, creating it, reading how it ended.

Labels are the worker's memory: every container carries the flow run, pool and worker it
serves, so a restarted worker (or an operator with `docker ps`) can tell what it is.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import docker
import docker.errors
import docker.types
from docker.models.containers import Container

from . import __version__
from .api import Deployment, Flow, FlowRun, WorkPool
from .entry import LABEL_CONTROL, SECRETS_DIR, SECRETS_ENV, entry_command
from .flowcode import NEEDS_ENV, needs_env
from .jobs import WORKER_LABELS, JobVariables, docker_label_key
from .resources import engine_time

LABEL_FLOW_RUN_ID = "io.prefect.flow-run-id"
LABEL_POOL = "io.prefect.work-pool-name"
LABEL_WORKER = "io.prefect.worker-name"
LABEL_MANAGED = "io.dockerworker.managed"
_OPTION_PREFIX = WORKER_LABELS
_LOCAL_HOSTS = ("127.0.0.1", "localhost")
# The run's identity in a container's env and labels (what a warm container gets at hand-over).
RUN_ENV = frozenset({"PREFECT__FLOW_RUN_ID", "PREFECT__FLOW_ID", "PREFECT__FLOW_NAME",
                     "PREFECT__DEPLOYMENT_ID", "PREFECT__DEPLOYMENT_NAME", NEEDS_ENV})
RUN_LABELS = frozenset({"io.prefect.flow-run-id", "io.prefect.flow-run-name", "io.prefect.flow-id",
                        "io.prefect.flow-name", "io.prefect.deployment-id",
                        "io.prefect.deployment-name"})


@dataclass
class WatchOptions:
    """What following a container and judging its end needs. Stored on the container as
    labels, so a restarted worker that adopts it knows the same."""

    auto_remove: bool = False
    stream_output: bool = True
    max_log_bytes: int = 10 * 1024 * 1024
    stop_timeout: int = 30
    mem_limit: str | None = None
    skip_engine_records: bool = True
    infra_retries: int = 1

    @classmethod
    def from_job(cls, job: JobVariables) -> WatchOptions:
        to_api = (job.env.get("PREFECT_LOGGING_TO_API_ENABLED") or "true").lower()
        return cls(
            auto_remove=job.auto_remove,
            stream_output=job.stream_output,
            max_log_bytes=job.max_log_bytes,
            stop_timeout=job.stop_timeout,
            mem_limit=job.mem_limit,
            skip_engine_records=to_api not in ("false", "0", "no"),
            infra_retries=cls.infra_retries if job.infra_retries is None else job.infra_retries,
        )

    def labels(self) -> dict[str, str]:
        values = {
            "auto-remove": str(self.auto_remove).lower(),
            "stream-output": str(self.stream_output).lower(),
            "max-log-bytes": str(self.max_log_bytes),
            "stop-timeout": str(self.stop_timeout),
            "skip-engine-records": str(self.skip_engine_records).lower(),
            "infra-retries": str(self.infra_retries),
        }
        if self.mem_limit:
            values["mem-limit"] = self.mem_limit
        return {_OPTION_PREFIX + k: v for k, v in values.items()}

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> WatchOptions:
        def get(key: str, default: str) -> str:
            return labels.get(_OPTION_PREFIX + key, default)

        return cls(
            auto_remove=get("auto-remove", "false") == "true",
            stream_output=get("stream-output", "true") == "true",
            max_log_bytes=int(get("max-log-bytes", str(cls.max_log_bytes))),
            stop_timeout=int(get("stop-timeout", str(cls.stop_timeout))),
            mem_limit=labels.get(_OPTION_PREFIX + "mem-limit"),
            skip_engine_records=get("skip-engine-records", "true") == "true",
            infra_retries=int(get("infra-retries", str(cls.infra_retries))),
        )


@dataclass
class ContainerSpec:
    """Everything `containers.create` gets, plus the extra networks to connect afterwards."""

    name: str
    create_kwargs: dict[str, Any]
    extra_networks: list[str] = field(default_factory=list)
    auto_remove: bool = False
    # The run's secrets by name: written to the container's stdin once it runs (entry
    # script), never part of what `containers.create` gets, never shown.
    secret_files: dict[str, bytes] = field(default_factory=dict, repr=False)
    # for `--runtime swarm` (swarmjobs.py): the job's CPUs and placement constraints
    cpus: float | None = None
    placement: list[str] = field(default_factory=list)


# The tmpfs the entry script writes a run's secrets into: in memory, not executable, and
# writable by the image's user whoever that is (the script then makes it read-only).
SECRETS_TMPFS = "rw,noexec,nosuid,nodev,size=4m,mode=1777"


def container_name(base: str, flow_run_id: uuid.UUID) -> str:
    """Docker-safe slug of the run's (or job's) name plus a short id: readable and unique."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", base).strip("_.-")[:60] or "flow-run"
    return f"{slug}-{flow_run_id.hex[:8]}"


def network_mode_for(job: JobVariables, api_url: str) -> str | None:
    """prefect-docker's rule: the job's mode; none with networks; host for a local API on Linux."""
    if job.network_mode:
        return job.network_mode
    if job.networks:
        return None
    host = urlparse(api_url).hostname or ""
    if sys.platform == "linux" and host in _LOCAL_HOSTS:
        return "host"
    return None


def _own_network_namespace(mode: str | None) -> bool:
    """Whether the container gets a namespace of its own, where the host's loopback is the
    gateway (`networks: ["host"]` means host mode as much as `network_mode: host` does)."""
    return not (mode in ("host", "none") or (mode or "").startswith("container:"))


def build_spec(
    job: JobVariables,
    *,
    flow_run: FlowRun,
    deployment: Deployment | None,
    flow: Flow | None,
    pool: WorkPool,
    worker_name: str,
    api_url: str,
    auth_env: dict[str, str],
) -> ContainerSpec:
    """The container for one run: base env and labels, then the job's values on top.

    Only the API location, credentials and run identity come from the worker; none of the
    worker's own environment leaks into the flow.
    """
    network_mode = network_mode_for(job, api_url)
    flow_api_url = api_url
    extra_hosts: dict[str, str] | None = None
    if _own_network_namespace(network_mode or (job.networks or [None])[0]) and (
            urlparse(api_url).hostname in _LOCAL_HOSTS):
        for local in _LOCAL_HOSTS:
            flow_api_url = flow_api_url.replace(local, "host.docker.internal")
        extra_hosts = {"host.docker.internal": "host-gateway"}
    environment = _run_env(job, flow_run, deployment, flow, worker_name, flow_api_url, auth_env)
    labels = _run_labels(job, flow_run, deployment, flow, pool, worker_name)
    extra = _extra_kwargs(job, extra_hosts)
    create_kwargs: dict[str, Any] = {
        "image": job.image,
        "command": job.command or entry_command(),
        "stdin_open": True if job.command is None else None,
        "environment": environment,
        "labels": labels,
        "network": job.networks[0] if job.networks else None,
        "network_mode": network_mode,
        "extra_hosts": extra_hosts,
        "volumes": list(job.volumes),
        "mem_limit": job.mem_limit,
        "memswap_limit": job.memswap_limit,
        "privileged": job.privileged,
        # An init as PID 1 forwards SIGTERM to the engine, so a stop takes effect at once.
        "init": True,
        **extra,
    }
    if job.gpus is not None:
        create_kwargs["device_requests"] = [gpu_request(job.gpus)]
    if job.secrets:  # their names only; the values reach the running container's stdin
        environment[SECRETS_ENV] = ",".join(job.secrets)
        create_kwargs["tmpfs"] = {**_tmpfs_dict(extra.get("tmpfs")), SECRETS_DIR: SECRETS_TMPFS}
    create_kwargs = {k: v for k, v in create_kwargs.items() if v is not None}
    name = container_name(job.name or flow_run.name, flow_run.id)
    return ContainerSpec(
        name=name,
        create_kwargs=create_kwargs,
        extra_networks=list(job.networks[1:]),
        auto_remove=job.auto_remove,
        cpus=job.cpus,
        placement=list(job.placement),
    )


def _run_env(job: JobVariables, flow_run: FlowRun, deployment: Deployment | None,
             flow: Flow | None, worker_name: str, flow_api_url: str,
             auth_env: dict[str, str]) -> dict[str, str]:
    """The API location, credentials and the run's identity; the job's env on top."""
    env: dict[str, str | None] = {
        "PREFECT_API_URL": flow_api_url,
        **auth_env,
        "PREFECT__FLOW_RUN_ID": str(flow_run.id),
        "PREFECT__FLOW_ID": str(flow_run.flow_id),
        "PREFECT__WORKER_NAME": worker_name,
    }
    if flow:
        env["PREFECT__FLOW_NAME"] = flow.name
    if deployment:
        env["PREFECT__DEPLOYMENT_ID"] = str(deployment.id)
        env["PREFECT__DEPLOYMENT_NAME"] = deployment.name
        env.update(needs_env(deployment.pull_steps, job.image))
    env.update(job.env)
    return {k: v for k, v in env.items() if v is not None}


def _run_labels(job: JobVariables, flow_run: FlowRun, deployment: Deployment | None,
                flow: Flow | None, pool: WorkPool, worker_name: str) -> dict[str, str]:
    """The job's labels, then the worker's own (they win: they are how it finds its
    containers again) and the watch options."""
    ours = {
        "prefect.io/flow-run-id": str(flow_run.id),
        "prefect.io/flow-run-name": flow_run.name,
        "prefect.io/work-pool-name": pool.name,
        "prefect.io/work-pool-id": str(pool.id),
        "prefect.io/worker-name": worker_name,
        "prefect.io/flow-id": str(flow_run.flow_id),
    }
    if flow:
        ours["prefect.io/flow-name"] = flow.name
    if deployment:
        ours["prefect.io/deployment-id"] = str(deployment.id)
        ours["prefect.io/deployment-name"] = deployment.name
    labels = {docker_label_key(k): v for k, v in job.labels.items()}
    labels.update({docker_label_key(k): v for k, v in ours.items()})
    labels[LABEL_MANAGED] = "true"
    labels["io.dockerworker.version"] = __version__
    labels.update(WatchOptions.from_job(job).labels())
    if job.command is None:  # Prefect's engine through our entry script (entry.py)
        labels[LABEL_CONTROL] = "stdin"
    return labels


def _extra_kwargs(job: JobVariables, extra_hosts: dict[str, str] | None) -> dict[str, Any]:
    """The job's container_create_kwargs, minus what the worker owns; the job's extra_hosts
    are merged into `extra_hosts` (changed in place) when the worker sets some."""
    extra = dict(job.container_create_kwargs or {})
    extra = {k: v for k, v in extra.items() if k not in JobVariables.model_fields}
    for key in ("volumes", "detach", "auto_remove", "remove"):
        extra.pop(key, None)
    if extra_hosts:
        user_hosts = extra.pop("extra_hosts", None)
        if isinstance(user_hosts, dict):
            extra_hosts.update(user_hosts)
        elif isinstance(user_hosts, list):
            extra_hosts.update(dict(h.split(":", 1) for h in user_hosts if ":" in h))
    return extra


def _tmpfs_dict(tmpfs: Any) -> dict[str, str]:
    """The job's own `tmpfs` kwarg (a dict, or a list of `path[:options]`) as a dict."""
    if isinstance(tmpfs, dict):
        return {str(k): str(v or "") for k, v in tmpfs.items()}
    if isinstance(tmpfs, list):
        return dict((str(item).split(":", 1) + [""])[:2] for item in tmpfs)  # type: ignore[misc]
    return {}


def gpu_request(gpus: str | int | list[str]) -> docker.types.DeviceRequest:
    """`docker run --gpus` as the SDK says it: all, a count, or device ids."""
    if isinstance(gpus, list):
        return docker.types.DeviceRequest(device_ids=gpus, capabilities=[["gpu"]])
    count = -1 if gpus == "all" else int(gpus)
    return docker.types.DeviceRequest(count=count, capabilities=[["gpu"]])


def create_and_start(client: docker.DockerClient, spec: ContainerSpec) -> Container:
    """Create (detached, never Docker's own auto-remove: the exit code must survive) and start."""
    try:
        container = client.containers.create(name=spec.name, detach=True, **spec.create_kwargs)
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise
        container = client.containers.create(
            name=f"{spec.name}-{uuid.uuid4().hex[:4]}", detach=True, **spec.create_kwargs
        )
    try:
        for network in spec.extra_networks:
            client.networks.get(network).connect(container)
        container.start()
    except docker.errors.APIError:
        if spec.auto_remove:
            remove_quietly(container)
        raise
    return container


def remove_quietly(container: Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


@functools.cache
def docker_host_id(client: docker.DockerClient) -> str:
    """The engine's id, asked once per client (`docker info` is not cheap on every run)."""
    return str(client.info().get("ID") or client.api.base_url)


@dataclass
class ExitReport:
    """How a container ended, read before it is removed."""

    exit_code: int
    oom_killed: bool
    error: str
    # for the run's resource report (resources.py): the engine's clock, its image, its limit
    started: datetime | None = None
    finished: datetime | None = None
    image: str = ""
    memory_limit: int = 0  # bytes; 0: none
    # the cluster ended it, not the flow: a Swarm task rejected by its node (an image the
    # node cannot pull) or orphaned (its node lost): worth an infrastructure retry
    by_infrastructure: bool = False

    def describe(self, mem_limit: str | None) -> str:
        """A short human reason: out of memory, a signal, or the plain exit code."""
        if self.oom_killed:
            limit = f" (mem_limit {mem_limit})" if mem_limit else ""
            return f"killed: out of memory{limit}, exit code {self.exit_code}"
        if self.error:
            return f"Docker reported an error: {self.error} (exit code {self.exit_code})"
        if self.exit_code > 128:
            try:
                name = signal.Signals(self.exit_code - 128).name
            except ValueError:
                name = f"signal {self.exit_code - 128}"
            return f"killed by {name} (exit code {self.exit_code})"
        return f"exited with code {self.exit_code}"


def read_exit(container: Container) -> ExitReport:
    container.reload()
    state = container.attrs.get("State", {})
    return ExitReport(
        exit_code=int(state.get("ExitCode", -1)),
        oom_killed=bool(state.get("OOMKilled")),
        error=str(state.get("Error") or ""),
        started=engine_time(state.get("StartedAt")),
        finished=engine_time(state.get("FinishedAt")),
        image=str(container.attrs.get("Config", {}).get("Image") or ""),
        memory_limit=int(container.attrs.get("HostConfig", {}).get("Memory") or 0),
    )


def last_output(container: Container, lines: int = 300) -> list[str]:
    """Its last `lines` lines of output (stdout and stderr), for a crash message."""
    try:
        raw = container.logs(stdout=True, stderr=True, tail=lines)
    except docker.errors.APIError:
        return []
    return raw.decode("utf-8", errors="replace").rstrip().splitlines()
