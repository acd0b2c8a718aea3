"""`--runtime swarm`: each flow run as a Swarm job, placed by Swarm's scheduler.

The worker runs beside a Swarm manager and submits each run as a one-shot service
(`replicated-job`, one task, restart condition `none`); Swarm puts it on a node with room
(`mem_limit` and `cpus` become reservations and limits; `placement` adds constraints). The
same claim, policy, verdict, output and lifecycle as with one engine, with Swarm's facts:

- output: the service's logs, polled with `since` (following them hangs once the task has
  ended, a known Docker bug), each line shipped once;
- how it ended: the task's status (state, exit code, `Err`); 137 under a memory limit is
  reported as out of memory, with the limit;
- cancellation: there is no stdin on Swarm, and Docker 20.10 leaves the running task of a
  removed job service running; so the entry script watches the run's state itself and takes
  CANCELLING to Prefect's engine as a cancellation. The service is removed once the task has
  ended (or after `stop_timeout`); its stop signal, SIGUSR1, is the same cancel request;
- adoption and reconciliation by the service's labels; ownership records are Swarm configs
  named after the service and generation (the cluster creates a name once, so two workers
  cannot both take a job over; updating the job service itself would run the job again);
- exactly once rests on Prefect's claim: the entry script refuses to run a flow run that is
  no longer PENDING under this worker's claim (a duplicate task, a known Swarm bug);
- flow secrets (job variable `secrets`) are Swarm's own service secrets, one per run and name,
  created just before the service and removed with it (or, orphaned, by the removal round):
  Swarm mounts each at /run/secrets/NAME, mode 0400, owned by the container's user.

A GPU count (`gpus: N`) becomes a reservation of N generic resources of the operator's kind
(`--swarm-gpu-kind`, Docker's convention `NVIDIA-GPU`): Swarm places the job on a node that
advertises that many free, and hands their ids to the task as `DOCKER_RESOURCE_<KIND>`.

What a service cannot be is refused before anything is created, with the reason: privileged,
devices, GPUs as "all" or by device id (Swarm reserves a count), swap limits, a
container's network namespace. Warm containers do not apply.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shlex
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import docker
import docker.errors
import docker.types
from docker.utils import parse_bytes

from .containers import (
    LABEL_FLOW_RUN_ID,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_WORKER,
    ContainerSpec,
    ExitReport,
    WatchOptions,
)
from .entry import LABEL_CONTROL, SECRETS_DIR, SECRETS_MOUNTED_ENV
from .hostview import HostView
from .images import ensure_image
from .jobs import JobVariables
from .logs import ResumePoint, RunOutput
from .ownership import (
    LABEL_GENERATION,
    LABEL_HOLDER,
    LABEL_OWNER_OF,
    LABEL_OWNER_POOL,
    Claim,
    Owner,
    latest_owners,
    owner_record_name,
)
from .resources import Usage, engine_time
from .runtime import EngineError, Workload, WorkloadGone, _translated

log = logging.getLogger(__name__)

CANCEL_SIGNAL = "SIGUSR1"  # the service's stop signal: the entry script's cancel request
ONCE_ENV = "DOCKERWORKER_ONCE"  # the job's claim: the entry script refuses a run not under it
WATCH_CANCEL_ENV = "DOCKERWORKER_WATCH_CANCEL"  # seconds between its looks for CANCELLING
WATCH_CANCEL_SECONDS = 2
_DONE = frozenset({"complete", "failed", "rejected", "shutdown", "orphaned", "remove"})
# a task that ended by the cluster's doing: its node refused it (an image it cannot pull) or
# was lost under it; the run is CRASHED as an infrastructure failure (infra_retries)
_LOST = frozenset({"rejected", "orphaned"})
_WAITING = frozenset({"new", "pending", "assigned", "allocated", "accepted", "preparing",
                      "ready", "starting"})
# create_kwargs a service can carry, and how (containers.build_spec makes them)
_REFUSED = {
    "privileged": "Swarm services cannot run privileged containers",
    "devices": "Swarm services cannot map devices",
    "memswap_limit": "Swarm services have no swap limit",
    "tmpfs": "tmpfs mounts are not given to Swarm jobs yet",
    "ipc_mode": "Swarm services cannot share an IPC namespace",
    "pid_mode": "Swarm services cannot share a PID namespace",
}
_CARRIED = frozenset({"stdin_open", "network", "network_mode", "extra_hosts", "volumes",
                      "mem_limit", "environment", "labels", "command", "image", "init",
                      "working_dir", "user", "cap_add", "cap_drop", "hostname",
                      "cpu_shares", "stop_signal", "pids_limit", "nano_cpus", "security_opt",
                      "device_requests"})
GPU_KIND = "NVIDIA-GPU"  # Docker's convention for GPUs as Swarm generic resources
NO_NEW_PRIVILEGES = ("Swarm services cannot set no-new-privileges (not before Docker 25, API "
                     "1.44): set `no_new_privileges = false` in the worker's policy to run Swarm "
                     "jobs without it")
SERVICE_NAME_MAX = 63
SECRET_NAME_MAX = 64  # Swarm's limit for a secret's name
# An unreferenced run secret younger than this may belong to a job being created right now
ORPHAN_SECRET_AGE = 300.0


def service_name(name: str) -> str:
    """A container name made a service name (at most 63 characters, the short id kept)."""
    if len(name) <= SERVICE_NAME_MAX:
        return name
    base, _, short = name.rpartition("-")
    return f"{base[:SERVICE_NAME_MAX - len(short) - 1]}-{short}"


def _mounts(volumes: list[Any]) -> list[docker.types.Mount]:
    mounts = []
    for volume in volumes:
        source, target, *rest = str(volume).split(":")
        mounts.append(docker.types.Mount(
            target=target, source=source, read_only="ro" in rest,
            type="bind" if source.startswith("/") else "volume"))
    return mounts


def gpu_reservation(requests: list[Any], kind: str) -> dict[str, int]:
    """A container's GPU device requests as a Swarm reservation of `kind`: Swarm reserves a
    count of generic resources, so "all" (no count a scheduler can place) and device ids
    (a task cannot ask for named resources) are refused with the reason."""
    count = 0
    for request in requests:
        capabilities = [c for group in request.get("Capabilities") or [] for c in group]
        if "gpu" not in capabilities:
            raise EngineError(f"Swarm has no device requests but GPUs ({request})")
        if request.get("DeviceIDs"):
            raise EngineError(f"Swarm reserves GPUs by count, not by device id "
                              f"(gpus: {request['DeviceIDs']}): ask for a count, e.g. gpus: 1")
        wanted = int(request.get("Count") or 0)
        if wanted < 1:
            raise EngineError('gpus: "all" cannot be a Swarm reservation (Swarm reserves a '
                              f"count of {kind} generic resources): ask for a count, "
                              "e.g. gpus: 1")
        count += wanted
    return {kind: count} if count else {}


def secret_owner(user: str | None) -> tuple[str, str]:
    """(uid, gid) of a flow's secret files: the container's user. Swarm sets a secret file's
    owner by number and the mode is 0400, so a user by name (which only the image's
    /etc/passwd knows) is refused rather than given files it cannot read."""
    uid, _, gid = (user or "").strip().partition(":")
    uid = "0" if uid in ("", "root") else uid
    gid = "0" if gid == "root" else (gid or "0")
    if not (uid.isdigit() and gid.isdigit()):
        raise EngineError(f"flow secrets on Swarm need the container's user by number (uid or "
                          f"uid:gid), not {user!r}: Swarm sets the files' owner by number")
    return uid, gid


def run_secret_name(run_id: str, index: int, name: str) -> str:
    """A Swarm secret's name for a run's secret: the run, a random part (a retried run gets
    new ones), the index (unique within the run) and the name, cut to Swarm's limit."""
    run = run_id.replace("-", "")[:12]
    return f"dw-{run}-{secrets.token_hex(3)}-{index}-{name}"[:SECRET_NAME_MAX]


def orphan_secrets(found: list[dict[str, Any]], referenced: set[str], now: datetime,
                   min_age: float = ORPHAN_SECRET_AGE) -> list[str]:
    """Of run secrets (`secrets.list` attrs), the ids no service refers to any more (the
    service was removed by hand, or the worker died before it existed) and that are older
    than `min_age` seconds (younger ones may be a job's being created now)."""
    orphans = []
    for secret in found:
        created = engine_time(secret.get("CreatedAt"))
        if secret.get("ID") in referenced or created is None:
            continue
        if (now - created).total_seconds() > min_age:
            orphans.append(str(secret["ID"]))
    return orphans


def _secret_ids(service_attrs: dict[str, Any]) -> list[str]:
    container = service_attrs.get("Spec", {}).get("TaskTemplate", {}).get("ContainerSpec", {})
    return [str(ref["SecretID"]) for ref in container.get("Secrets") or [] if ref.get("SecretID")]


def service_kwargs(name: str, create_kwargs: dict[str, Any], job_cpus: float | None,
                   placement: list[str], stop_timeout: int,
                   extra_networks: list[str], gpu_kind: str = GPU_KIND,
                   mounted_secrets: bool = False) -> dict[str, Any]:
    """What `services.create` gets for a run whose container would get `create_kwargs`;
    EngineError naming what a service cannot be. With `mounted_secrets`, Swarm mounts the
    run's secrets at /run/secrets (the container runtime's tmpfs there is not made)."""
    kwargs = {k: v for k, v in create_kwargs.items() if v not in (None, False, [], {})}
    if mounted_secrets and isinstance(kwargs.get("tmpfs"), dict):
        kwargs["tmpfs"] = {k: v for k, v in kwargs["tmpfs"].items() if k != SECRETS_DIR}
    for key, reason in _REFUSED.items():
        if kwargs.get(key):
            raise EngineError(f"{reason} ({key})")
    for option in kwargs.get("security_opt") or []:
        reason = NO_NEW_PRIVILEGES if option.startswith("no-new-privileges") else (
            "Swarm services take no security_opt")
        raise EngineError(f"{reason} ({option})")
    unknown = sorted(set(kwargs) - _CARRIED - set(_REFUSED))
    if unknown:
        raise EngineError(f"Swarm jobs cannot take container_create_kwargs {unknown}")
    mode = kwargs.get("network_mode")
    if mode and mode not in ("host", "bridge", "none", "default"):
        raise EngineError(f"a Swarm job cannot join {mode!r} (a container's namespace)")
    networks = [n for n in [kwargs.get("network"), *extra_networks] if n]
    if mode == "host":
        networks = ["host", *networks]
    env = dict(kwargs.get("environment") or {})
    if mounted_secrets:
        env[SECRETS_MOUNTED_ENV] = "1"  # the entry script finds them, waits for nothing
    labels = kwargs.get("labels") or {}
    control = labels.get(LABEL_CONTROL)
    memory = parse_bytes(kwargs["mem_limit"]) if kwargs.get("mem_limit") else None
    nano_cpus = int(job_cpus * 1e9) if job_cpus else kwargs.get("nano_cpus")
    gpus = gpu_reservation(kwargs.get("device_requests") or [], gpu_kind)
    resources = docker.types.Resources(cpu_limit=nano_cpus, mem_limit=memory,
                                       cpu_reservation=nano_cpus, mem_reservation=memory,
                                       generic_resources=gpus or None)
    if kwargs.get("pids_limit"):  # API 1.41; the SDK has no parameter for it
        resources.setdefault("Limits", {})["Pids"] = int(kwargs["pids_limit"])
    hosts = kwargs.get("extra_hosts")
    if isinstance(hosts, dict) and "host-gateway" in hosts.values():
        raise EngineError("Swarm jobs cannot use host-gateway: give the job a network that "
                          "reaches the Prefect API (networks), or network_mode host")
    return {
        "name": service_name(name),
        "image": kwargs["image"],
        # `command` of a container is a service's args: the image's entrypoint stays. A
        # string is split as the engine splits a container's (docker-py: shlex), where a
        # service only takes a list
        "args": (shlex.split(command) if isinstance(command := kwargs.get("command"), str)
                 else command),
        "env": [f"{k}={v}" for k, v in {**env,
                                        WATCH_CANCEL_ENV: str(WATCH_CANCEL_SECONDS)}.items()],
        "labels": {**labels, LABEL_CONTROL: "signal"} if control else labels,
        "container_labels": labels,
        "networks": networks,
        "mounts": _mounts(kwargs.get("volumes") or []),
        "resources": resources,
        "restart_policy": docker.types.RestartPolicy(condition="none"),
        "mode": docker.types.ServiceMode("replicated-job", replicas=1, concurrency=1),
        "constraints": list(placement),
        "stop_grace_period": stop_timeout * 1_000_000_000,
        "stop_signal": CANCEL_SIGNAL if control else None,
        "init": bool(kwargs.get("init")),
        "workdir": kwargs.get("working_dir"),
        "user": kwargs.get("user"),
        "cap_add": kwargs.get("cap_add"),
        "cap_drop": kwargs.get("cap_drop"),
        "hostname": kwargs.get("hostname"),
        "hosts": hosts or None,
    }


def _task_time(task: dict[str, Any]) -> str:
    return str(task.get("Status", {}).get("Timestamp") or task.get("UpdatedAt") or "")


def main_task(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The task that tells how the job goes: one running, else the latest that ran a
    container, else the latest."""
    running = [t for t in tasks if t.get("Status", {}).get("State") == "running"]
    if running:
        return max(running, key=_task_time)
    ran = [t for t in tasks if t.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")]
    pool = ran or tasks
    return max(pool, key=_task_time) if pool else None


def task_exit(task: dict[str, Any] | None, memory_limit: int | None) -> ExitReport:
    """A finished task as the verdict reads a container's end."""
    if task is None:
        raise WorkloadGone("the job has no task")
    status = task.get("Status", {})
    code = status.get("ContainerStatus", {}).get("ExitCode")
    state = status.get("State", "")
    error = "" if state == "complete" else str(status.get("Err") or "")
    exit_code = int(code) if code is not None else -1
    if error == f"task: non-zero exit ({exit_code})":  # the exit code again, not an error
        error = ""
    return ExitReport(exit_code=exit_code,
                      oom_killed=exit_code == 137 and bool(memory_limit),
                      error=error if exit_code != 137 else "",
                      started=engine_time(status.get("ContainerStatus", {}).get("StartedAt")),
                      finished=engine_time(status.get("Timestamp")) if state in _DONE else None,
                      image=str(task.get("Spec", {}).get("ContainerSpec", {}).get("Image", "")
                                ).split("@")[0],
                      memory_limit=memory_limit or 0,
                      by_infrastructure=state in _LOST)


def _workload(service: Any) -> Workload:
    spec = service.attrs.get("Spec", {})
    container = spec.get("TaskTemplate", {}).get("ContainerSpec", {})
    env = dict(item.partition("=")[::2] for item in container.get("Env") or [])
    return Workload(id=service.id, name=spec.get("Name", service.name),
                    labels=dict(spec.get("Labels") or {}), status="running", env=env,
                    native=service)


class SwarmJobs:
    """Flow runs as Swarm jobs, through the Docker SDK of a manager node."""

    def __init__(self, client: docker.DockerClient, poll: float = 1.0,
                 gpu_kind: str = GPU_KIND) -> None:
        self.client = client
        self.poll = poll
        self.gpu_kind = gpu_kind  # the generic resource a job's `gpus` count reserves
        self._noted: dict[str, str] = {}  # service id -> the waiting reason last noted
        self._cluster: str | None = None

    # --- the engine --------------------------------------------------------------------
    def host_id(self) -> str:
        """The Swarm's own id (the same from every manager): runs' infrastructure_pid."""
        if self._cluster is None:
            with _translated():
                self._cluster = f"swarm-{self.client.swarm.attrs['ID']}"
        return self._cluster

    def ping(self) -> None:
        with _translated():
            info = self.client.info()
        if not info.get("Swarm", {}).get("ControlAvailable"):
            raise EngineError("this Docker engine is not a Swarm manager: `--runtime swarm` "
                              "submits jobs through a manager's socket")

    def engine_version(self) -> str:
        with _translated():
            return str(self.client.version().get("Version", "unknown"))

    def host_view(self) -> HostView | None:
        return None  # a job may land on any node: the policy judges bind paths by their text

    def ensure_image(self, job: JobVariables, trusted_credentials: bool) -> str:
        """On the manager, as for one engine; each node pulls when the task lands there
        (images must be in a registry every node reaches, or on every node; builds reach one
        with `--build-push` and are named by digest)."""
        with _translated():
            return ensure_image(self.client, job, trusted_credentials)

    # --- a run's job ---------------------------------------------------------------------
    def start(self, spec: ContainerSpec) -> Workload:
        """The job's service, with the run's secrets as Swarm secrets made just before it
        (and removed again if the service cannot be made)."""
        options = WatchOptions.from_labels(spec.create_kwargs.get("labels") or {})
        kwargs = service_kwargs(spec.name, spec.create_kwargs, spec.cpus, spec.placement,
                                options.stop_timeout, spec.extra_networks, self.gpu_kind,
                                mounted_secrets=bool(spec.secret_files))
        # the claim the run is under (runs.RunSupervisor._claim): a second task refuses it
        claim = Claim(kwargs["container_labels"].get(LABEL_WORKER, ""), self.host_id())
        kwargs["env"].append(f"{ONCE_ENV}={claim.message}")
        made: list[str] = []
        try:
            if spec.secret_files:
                kwargs["secrets"] = self._make_secrets(spec, made)
            with _translated():
                service = self.client.services.create(**{k: v for k, v in kwargs.items()
                                                         if v is not None})
                service.reload()
        except BaseException:
            self._remove_secrets(made)
            raise
        workload = _workload(service)
        workload.status = "created"
        return workload

    def _make_secrets(self, spec: ContainerSpec, made: list[str]
                      ) -> list[docker.types.SecretReference]:
        """One Swarm secret per name, labelled with the run and the pool (so the removal
        round finds orphans), mounted at /run/secrets/NAME, 0400, owned by the container's
        user; each id is added to `made` as soon as it exists."""
        labels = spec.create_kwargs.get("labels") or {}
        user = spec.create_kwargs.get("user") or self._image_user(spec.create_kwargs["image"])
        uid, gid = secret_owner(user)
        run_id = str(labels.get(LABEL_FLOW_RUN_ID, ""))
        ours = {LABEL_MANAGED: "true", LABEL_POOL: str(labels.get(LABEL_POOL, "")),
                LABEL_FLOW_RUN_ID: run_id}
        references = []
        for index, (name, value) in enumerate(spec.secret_files.items()):
            secret_name = run_secret_name(run_id, index, name)
            with _translated():
                secret = self.client.secrets.create(name=secret_name, data=value, labels=ours)
            made.append(secret.id)
            references.append(docker.types.SecretReference(
                secret.id, secret_name, filename=name, uid=uid, gid=gid, mode=0o400))
        return references

    def _image_user(self, image: str) -> str | None:
        """The image's own user (its Config.User) when the job sets none; None: root, or
        the image is not on the manager (the task's node pulls it)."""
        try:
            with _translated():
                return self.client.images.get(image).attrs.get("Config", {}).get("User")
        except WorkloadGone:
            return None

    def _remove_secrets(self, ids: list[str]) -> None:
        """Remove these run secrets; already gone is fine."""
        for secret_id in ids:
            try:
                with _translated():
                    self.client.api.remove_secret(secret_id)
            except WorkloadGone:
                pass
            except EngineError as exc:
                log.warning("could not remove Swarm secret %s: %s", secret_id, exc)

    def hand_over(self, workload: Workload, spec: ContainerSpec) -> None:
        raise EngineError("warm containers do not apply to Swarm jobs")

    def resume(self, workload: Workload) -> None:
        """A service runs its task once created: nothing to start."""

    def _service(self, workload: Workload) -> Any:
        with _translated():
            return self.client.services.get(workload.id)

    def _tasks(self, workload: Workload) -> list[dict[str, Any]]:
        with _translated():
            return self.client.api.tasks(filters={"service": workload.id})

    def _memory_limit(self, workload: Workload) -> int | None:
        limit = WatchOptions.from_labels(workload.labels).mem_limit
        return parse_bytes(limit) if limit else None

    def _ended(self, workload: Workload, note: Callable[[str], None] | None = None) -> bool:
        tasks = self._tasks(workload)
        task = main_task(tasks)
        if task is None:
            return False
        status = task.get("Status", {})
        state = status.get("State", "")
        if note is not None and state in _WAITING and status.get("Err"):
            reason = f"Swarm has not placed the job yet ({state}): {status['Err']}"
            if self._noted.get(workload.id) != reason:
                self._noted[workload.id] = reason
                note(reason)
        return state in _DONE

    def follow(self, workload: Workload, output: RunOutput, resume: ResumePoint | None) -> None:
        def read(stream: str, since: datetime | None) -> bytes:
            with _translated():
                chunks = self.client.api.service_logs(
                    workload.id, stdout=stream == "stdout", stderr=stream == "stderr",
                    timestamps=True, since=int(since.timestamp()) if since else 0,
                    is_tty=False)
                return b"".join(chunks)

        output.follow_polled(read, lambda: self._ended(workload, output.note), resume,
                             interval=self.poll)

    def wait(self, workload: Workload) -> None:
        while not self._ended(workload):
            time.sleep(self.poll)

    def read_exit(self, workload: Workload) -> ExitReport:
        return task_exit(main_task(self._tasks(workload)), self._memory_limit(workload))

    def usage(self, workload: Workload) -> Usage | None:
        return None  # the task's node has its stats; the manager has none

    def unread_usage(self) -> str | None:
        return "memory and CPU are not read for Swarm jobs (the task's node has them)"

    def stop(self, workload: Workload, grace: int, note: Callable[[str], None]) -> None:
        """Cancel. The entry script in the task watches the run's state and takes CANCELLING
        to Prefect's engine as a cancellation; the job is given `grace` seconds to end so.
        Then the service is removed, which sends its stop signal (on engines that stop a
        removed job's task: Docker 20.10 leaves it running, see docs/swarm.md)."""
        scripted = bool(workload.labels.get(LABEL_CONTROL))
        if scripted:
            note(f"asking Prefect's engine in Swarm job {workload.name} to cancel "
                 f"(the service removed after {grace} s)")
            deadline = time.monotonic() + grace + 2 * WATCH_CANCEL_SECONDS
            while time.monotonic() < deadline:
                if self._ended(workload):
                    return
                time.sleep(self.poll)
        note(f"removing Swarm job {workload.name} (its stop signal; SIGKILL after {grace} s)")
        self.remove(workload)

    def remove(self, workload: Workload) -> None:
        """Remove the job's service, then its run secrets (Swarm keeps a secret while a
        service refers to it)."""
        attrs = getattr(workload.native, "attrs", None) or {}
        try:
            service = self._service(workload)
            attrs = service.attrs
            with _translated():
                service.remove()
        except WorkloadGone:
            pass
        self._remove_secrets(_secret_ids(attrs))
        self._noted.pop(workload.id, None)

    def removed_meanwhile(self, workload: Workload) -> bool:
        try:
            self._service(workload)
        except WorkloadGone:
            return True
        return False

    def last_output(self, workload: Workload) -> list[str]:
        try:
            with _translated():
                raw = b"".join(self.client.api.service_logs(
                    workload.id, stdout=True, stderr=True, tail=300, is_tty=False))
        except (WorkloadGone, EngineError, docker.errors.DockerException):
            return []
        return raw.decode("utf-8", errors="replace").rstrip().splitlines()

    def wait_ready(self, workload: Workload, timeout: float) -> bool:
        """Swarm jobs are never warm (worker.py): nothing waits to be ready."""
        return False

    def is_running(self, workload: Workload) -> bool:
        try:
            return not self._ended(workload)
        except WorkloadGone:
            return False

    def inspect(self, workload_id: str) -> Workload:
        with _translated():
            return _workload(self.client.services.get(workload_id))

    def starts_elsewhere(self, worker: str, window: float) -> dict[str, float]:
        return {}  # Swarm places each job on a node of its choosing: no host to share

    def list_workloads(self, pool: str, **labels: str) -> list[Workload]:
        filters = [f"{LABEL_POOL}={pool}", f"{LABEL_MANAGED}=true"]
        filters += [f"{k}={v}" for k, v in labels.items()]
        with _translated():
            return [_workload(s) for s in self.client.services.list(filters={"label": filters})]

    # --- ownership records: Swarm configs, whose names the cluster creates once ----------
    # (not the service's own labels: updating a job service runs the job again)
    def take_over(self, workload: Workload, pool: str, owner: Owner) -> bool:
        labels = {LABEL_OWNER_POOL: pool, LABEL_OWNER_OF: workload.id, LABEL_HOLDER: owner.name,
                  LABEL_GENERATION: str(owner.generation)}
        with _translated():
            try:
                self.client.configs.create(name=owner_record_name(workload.id, owner.generation),
                                           data=owner.name.encode(), labels=labels)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    return False
                raise
        return True

    def _owner_records(self, pool: str) -> list[Any]:
        with _translated():
            return self.client.configs.list(filters={"label": [f"{LABEL_OWNER_POOL}={pool}"]})

    def owners(self, pool: str) -> dict[str, Owner]:
        return latest_owners((record.attrs.get("Spec", {}).get("Name", ""),
                              record.attrs.get("Spec", {}).get("Labels") or {})
                             for record in self._owner_records(pool))

    def forget_owners(self, pool: str, keep: set[str]) -> int:
        """The ownership records of services not in `keep`; and the pool's run secrets that
        no service refers to any more (see `orphan_secrets`)."""
        removed = 0
        for record in self._owner_records(pool):
            if (record.attrs.get("Spec", {}).get("Labels") or {}).get(LABEL_OWNER_OF) not in keep:
                with _translated(), contextlib.suppress(docker.errors.NotFound):
                    record.remove()
                removed += 1
        self._forget_secrets(pool)
        return removed

    def _forget_secrets(self, pool: str) -> None:
        ours = [f"{LABEL_POOL}={pool}", f"{LABEL_MANAGED}=true"]
        with _translated():
            found = self.client.api.secrets(filters={"label": ours})
            if not found:
                return
            referenced = {ref for service in self.client.api.services(filters={"label": ours})
                          for ref in _secret_ids(service)}
        orphans = orphan_secrets(found, referenced, datetime.now(UTC))
        if orphans:
            log.info("removing %d Swarm secret(s) of jobs that are gone", len(orphans))
            self._remove_secrets(orphans)


