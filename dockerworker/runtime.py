"""The runtime seam: what one flow run needs from the engine that runs its container.

Claims, policy, output shipping and verdicts never talk to Docker themselves; they hold a
`Workload` (a small record of one container) and ask a `Runtime` to act on it. `LocalEngine`
is the machine's Docker engine through the Docker SDK; a Swarm backend (services of mode
`replicated-job`) and the unit tests' in-memory fake implement the same interface.

Errors are translated in one place (as docker-py does for HTTP): `WorkloadGone` when the
container no longer exists, `EngineUnavailable` while the engine is away (restarting, socket
gone; worth waiting for), `EngineError` for any other refusal (with the engine's reason).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import docker
import docker.errors
import requests
import urllib3
from docker.models.containers import Container

from . import metrics
from .containers import (
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_WORKER,
    RUN_ENV,
    ContainerSpec,
    ExitReport,
    create_and_start,
    docker_host_id,
    last_output,
    read_exit,
    remove_quietly,
)
from .entry import CANCEL_LINE, LABEL_CONTROL, READY_LINE, write_line, write_secrets
from .hostview import HostView, Resolved
from .images import ensure_image
from .jobs import JobVariables
from .logs import ResumePoint, RunOutput
from .ownership import (
    LABEL_GENERATION,
    LABEL_HOLDER,
    LABEL_OWNER_OF,
    LABEL_OWNER_POOL,
    Owner,
    latest_owners,
    owner_record_name,
)
from .resources import Usage, parse_stats

log = logging.getLogger(__name__)
DEFAULT_CPU_SHARES = 1024  # Docker's default weight: what a warm container gets at hand-over


class RuntimeTrouble(Exception):
    """Something the engine said or failed to say; the subclasses say what to do about it."""


class WorkloadGone(RuntimeTrouble):
    """The container no longer exists (removed behind our back, or never made it)."""


class EngineUnavailable(RuntimeTrouble):
    """The engine does not answer (restarting, socket gone): wait and try again."""


class EngineError(RuntimeTrouble):
    """The engine refused (bad image, bad option, a name in use...): its reason is the text."""


@dataclass
class Workload:
    """One container as the run sees it. `native` is the backend's own handle."""

    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    status: str = "running"  # created | running | exited | dead ...
    env: dict[str, str] = field(default_factory=dict)
    native: Any = None

    @property
    def short_id(self) -> str:
        return self.id[:12]


def infrastructure_pid(host_id: str, workload_id: str) -> str:
    """`<engine id>:<container id>`, as Prefect's workers record it."""
    return f"{host_id}:{workload_id}"


def parse_infrastructure_pid(value: str | None) -> tuple[str, str]:
    """(engine id, container id); ("", "") when the run has none."""
    host, _, workload_id = (value or "").rpartition(":")
    return host, workload_id


@runtime_checkable
class Runtime(Protocol):
    """What a run needs from the engine; every method may raise a `RuntimeTrouble`."""

    def host_id(self) -> str:
        """The engine's identity: which runs' infrastructure_pid points here."""

    def ping(self) -> None:
        """Raises EngineUnavailable unless the engine answers (no claims while it is away)."""

    def engine_version(self) -> str:
        """The engine's version, for the build info metric and the logs."""

    def host_view(self) -> HostView | None:
        """The host as the engine sees it (bind sources, networks), for the policy; None:
        the policy judges the job by its text alone."""

    def ensure_image(self, job: JobVariables, trusted_credentials: bool) -> str:
        """Make the job's image available by its pull policy; says what was done."""

    def start(self, spec: ContainerSpec) -> Workload:
        """Create and start the container (cold)."""

    def hand_over(self, workload: Workload, spec: ContainerSpec) -> None:
        """Give a waiting warm container the run's identity."""

    def resume(self, workload: Workload) -> None:
        """Start a container that was created but never started (a worker died in between)."""

    def follow(self, workload: Workload, output: RunOutput, resume: ResumePoint | None) -> None:
        """Feed the container's output to `output` until it ends or `output.stop()`."""

    def wait(self, workload: Workload) -> None:
        """Block until the container has ended."""

    def read_exit(self, workload: Workload) -> ExitReport:
        """How it ended: exit code, out of memory, the engine's error."""

    def usage(self, workload: Workload) -> Usage | None:
        """One reading of its cgroup accounting (peak memory, CPU), without waiting for a
        second sample; None when it is not running (resources.py)."""

    def unread_usage(self) -> str | None:
        """Why this runtime reads no usage at all, for the run's resource line (which then
        says so instead of blaming a short run); None: it does read it."""

    def stop(self, workload: Workload, grace: int, note: Callable[[str], None]) -> None:
        """Cancel: ask Prefect's engine inside (or SIGTERM), SIGKILL after `grace` seconds."""

    def remove(self, workload: Workload) -> None:
        """Remove it; already gone is fine."""

    def removed_meanwhile(self, workload: Workload) -> bool:
        """True when it was removed just after it ended (`docker rm -f` kills, then removes)."""

    def last_output(self, workload: Workload) -> list[str]:
        """Its last lines of output, for a crash message ([] when they cannot be read)."""

    def is_running(self, workload: Workload) -> bool:
        """Still running (a warm container can be handed a run)."""

    def wait_ready(self, workload: Workload, timeout: float) -> bool:
        """Block until a warm container says it is ready (entry.READY_LINE): True; False when
        it ended first or `timeout` passed."""

    def inspect(self, workload_id: str) -> Workload:
        """The container by id, with everything (env too); `WorkloadGone` if there is none."""

    def list_workloads(self, pool: str, **labels: str) -> list[Workload]:
        """This pool's containers (managed by dockerworker), with these labels too."""

    def starts_elsewhere(self, worker: str, window: float) -> dict[str, float]:
        """Id to age in seconds of the running workloads that other dockerworker workers started
        on this engine less than `window` seconds ago (any pool): starts that load the
        same CPU as ours (admission.py). Empty where the engine places work (Swarm)."""

    def take_over(self, workload: Workload, pool: str, owner: Owner) -> bool:
        """Record `owner` as the container's owner at `owner.generation`, atomically: False
        when another worker recorded that generation first (ownership.py)."""

    def owners(self, pool: str) -> dict[str, Owner]:
        """The latest takeover of each of this pool's containers that has one, by id."""

    def forget_owners(self, pool: str, keep: set[str]) -> int:
        """Remove the takeover records of containers not in `keep` (they are gone)."""


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Docker's errors as the runtime's (the one place that knows docker-py's exceptions)."""
    try:
        yield
    except docker.errors.NotFound as exc:
        metrics.DOCKER_ERRORS.labels("gone").inc()
        raise WorkloadGone(str(exc)) from exc
    except docker.errors.APIError as exc:
        # The engine answered: a 500 is its refusal (a runtime error, a missing driver), not
        # its absence; only no answer or a gateway's "not now" means it is away.
        if exc.status_code is None or exc.status_code in (502, 503, 504):
            metrics.DOCKER_ERRORS.labels("unavailable").inc()
            raise EngineUnavailable(str(exc)) from exc
        metrics.DOCKER_ERRORS.labels("refused").inc()
        raise EngineError(exc.explanation or str(exc)) from exc
    except (requests.ConnectionError, requests.Timeout, ConnectionError) as exc:
        metrics.DOCKER_ERRORS.labels("unavailable").inc()
        raise EngineUnavailable(str(exc)) from exc
    except docker.errors.DockerException as exc:
        metrics.DOCKER_ERRORS.labels("refused").inc()
        raise EngineError(str(exc)) from exc


class _TranslatedHostView(HostView):
    """The host view, its engine errors translated like every other call's."""

    def resolve_bind(self, source: str, prefixes: list[str]) -> Resolved:
        with _translated():
            return super().resolve_bind(source, prefixes)

    def network_driver(self, name: str) -> str | None:
        with _translated():
            return super().network_driver(name)


def _workload(container: Container, full: bool = True) -> Workload:
    """A Workload from an inspected container (`full`) or from a sparse listing."""
    attrs = container.attrs
    if full:
        labels = dict(attrs.get("Config", {}).get("Labels") or {})
        env = dict(item.partition("=")[::2] for item in attrs.get("Config", {}).get("Env") or [])
        name = str(attrs.get("Name") or container.name or "").lstrip("/")
        status = str(attrs.get("State", {}).get("Status") or container.status)
    else:
        labels = dict(attrs.get("Labels") or {})
        env = {}
        names = attrs.get("Names") or [attrs.get("Name") or ""]
        name = names[0].lstrip("/")
        status = str(attrs.get("State") or "")
    return Workload(id=container.id, name=name, labels=labels, status=status, env=env,
                    native=container)


class LocalEngine:
    """The machine's Docker engine through the Docker SDK."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def _container(self, workload: Workload) -> Container:
        if workload.native is None:
            with _translated():
                workload.native = self.client.containers.get(workload.id)
        return workload.native

    def host_id(self) -> str:
        with _translated():
            return docker_host_id(self.client)

    def ping(self) -> None:
        with _translated():
            self.client.ping()

    def engine_version(self) -> str:
        with _translated():
            return str(self.client.version().get("Version", "unknown"))

    def host_view(self) -> HostView:
        return _TranslatedHostView(self.client)

    def ensure_image(self, job: JobVariables, trusted_credentials: bool) -> str:
        with _translated():
            return ensure_image(self.client, job, trusted_credentials)

    def start(self, spec: ContainerSpec) -> Workload:
        with _translated():
            container = create_and_start(self.client, spec)
            if spec.secret_files:
                try:
                    write_secrets(container, spec.secret_files)
                except Exception:  # a container waiting for secrets that never come
                    remove_quietly(container)
                    raise
        workload = _workload(container)  # attrs as created: no second inspect per run
        workload.status = "running"
        return workload

    def hand_over(self, workload: Workload, spec: ContainerSpec) -> None:
        """Name the container after the run, give it the job's CPU weight and write the
        run's identity to its stdin (see warm.py)."""
        container = self._container(workload)
        name = spec.name
        with _translated():
            try:
                container.rename(name)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                name = f"{spec.name}-{uuid.uuid4().hex[:4]}"
                container.rename(name)
            env = {k: v for k, v in spec.create_kwargs["environment"].items() if k in RUN_ENV}
            write_line(container, json.dumps(env))  # the engine starts now; the rest is ours
            if spec.secret_files:
                write_secrets(container, spec.secret_files)
            container.update(cpu_shares=spec.create_kwargs.get("cpu_shares") or DEFAULT_CPU_SHARES)
        workload.name = name

    def resume(self, workload: Workload) -> None:
        with _translated():
            self._container(workload).start()
        workload.status = "running"

    def follow(self, workload: Workload, output: RunOutput, resume: ResumePoint | None) -> None:
        with _translated():
            output.follow(self._container(workload), resume)

    def wait(self, workload: Workload) -> None:
        with _translated():
            self._container(workload).wait(timeout=None)

    def read_exit(self, workload: Workload) -> ExitReport:
        with _translated():
            return read_exit(self._container(workload))

    def usage(self, workload: Workload) -> Usage | None:
        """The stats API, one-shot (API 1.41): the collector's next tick at the latest."""
        with _translated():
            try:
                stats = self.client.api.stats(workload.id, stream=False, one_shot=True)
            except docker.errors.InvalidVersion:  # an older engine: two samples, 1-2 s
                stats = self.client.api.stats(workload.id, stream=False)
        return parse_stats(stats) if isinstance(stats, dict) else None

    def unread_usage(self) -> str | None:
        return None  # read from the stats API (usage())

    def stop(self, workload: Workload, grace: int, note: Callable[[str], None]) -> None:
        """Prefect's engine behind our entry script is asked to cancel (it reports Cancelled
        and runs on_cancellation hooks); anything else gets SIGTERM. SIGKILL after the grace."""
        container = self._container(workload)
        if workload.labels.get(LABEL_CONTROL) == "stdin":
            note(f"asking Prefect's engine in container {workload.name} to cancel "
                 f"(SIGKILL after {grace} s)")
            try:
                with _translated():
                    write_line(container, CANCEL_LINE)
                    container.wait(timeout=grace)
                return
            except WorkloadGone:
                raise
            except (RuntimeTrouble, requests.RequestException) as exc:
                log.info("container %s: no exit after the cancel request (%s); killing",
                         workload.name, exc)
            with contextlib.suppress(docker.errors.APIError):  # it may have ended meanwhile
                container.kill()
            return
        note(f"stopping container {workload.name} (SIGTERM, SIGKILL after {grace} s)")
        with _translated():
            container.stop(timeout=grace)

    def remove(self, workload: Workload) -> None:
        with _translated():
            remove_quietly(self._container(workload))

    def removed_meanwhile(self, workload: Workload) -> bool:
        time.sleep(0.5)
        try:
            with _translated():
                self._container(workload).reload()
        except WorkloadGone:
            return True
        return False

    def last_output(self, workload: Workload) -> list[str]:
        try:
            return last_output(self._container(workload))
        except (RuntimeTrouble, docker.errors.DockerException):
            return []

    def wait_ready(self, workload: Workload, timeout: float) -> bool:
        """Follow its stdout (one stream while it boots, closed then, or by a timer at
        `timeout`) up to the ready line."""
        ready = READY_LINE.encode()
        with _translated():
            stream = self._container(workload).logs(stdout=True, stderr=False, stream=True,
                                                    follow=True)
        timer = threading.Timer(timeout, stream.close)
        timer.daemon = True
        timer.start()
        pending = b""
        try:
            for chunk in stream:
                pending += chunk
                if ready in pending:
                    return True
                pending = pending[-len(ready):]
        except (OSError, requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
            pass  # closed by the timer, or the engine went away: not ready
        finally:
            timer.cancel()
            stream.close()
        return False

    def is_running(self, workload: Workload) -> bool:
        try:
            with _translated():
                container = self._container(workload)
                container.reload()
        except WorkloadGone:
            return False
        workload.status = container.status
        return container.status == "running"

    def inspect(self, workload_id: str) -> Workload:
        with _translated():
            return _workload(self.client.containers.get(workload_id))

    def list_workloads(self, pool: str, **labels: str) -> list[Workload]:
        filters = [f"{LABEL_POOL}={pool}", f"{LABEL_MANAGED}=true"]
        filters += [f"{k}={v}" for k, v in labels.items()]
        # sparse (labels in attrs["Labels"]): no inspect per container, which would race
        # with removals by other replicas
        with _translated():
            found = self.client.containers.list(all=True, sparse=True,
                                                filters={"label": filters})
        return [_workload(container, full=False) for container in found]

    def starts_elsewhere(self, worker: str, window: float) -> dict[str, float]:
        with _translated():  # sparse: the list's own Created and Labels, no inspect
            found = self.client.containers.list(sparse=True, filters={
                "label": f"{LABEL_MANAGED}=true", "status": "running"})
        now = time.time()
        ages = {c.id: now - float(c.attrs.get("Created") or 0) for c in found
                if (c.attrs.get("Labels") or {}).get(LABEL_WORKER) != worker}
        return {key: age for key, age in ages.items() if age < window}

    # --- ownership records (ownership.py) ------------------------------------------------
    def take_over(self, workload: Workload, pool: str, owner: Owner) -> bool:
        """A never-started container named after the container and generation, from the
        container's own image (present as long as the container is): Docker creates a name
        once."""
        labels = {LABEL_OWNER_POOL: pool, LABEL_OWNER_OF: workload.id, LABEL_HOLDER: owner.name,
                  LABEL_GENERATION: str(owner.generation)}
        with _translated():
            image = self.client.containers.get(workload.id).attrs["Image"]
            try:
                self.client.containers.create(image, name=owner_record_name(
                    workload.id, owner.generation), command=["true"], labels=labels)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    return False
                raise
        return True

    def _owner_records(self, pool: str) -> list[Container]:
        with _translated():
            return self.client.containers.list(all=True, sparse=True, filters={
                "label": [f"{LABEL_OWNER_POOL}={pool}", LABEL_OWNER_OF]})

    def owners(self, pool: str) -> dict[str, Owner]:
        # a record is a container never started: a started one is a workload, whatever its
        # labels and name say
        return latest_owners(((record.attrs.get("Names") or [""])[0].lstrip("/"),
                              record.attrs.get("Labels") or {})
                             for record in self._owner_records(pool)
                             if record.attrs.get("State") == "created")

    def forget_owners(self, pool: str, keep: set[str]) -> int:
        removed = 0
        for record in self._owner_records(pool):
            if (record.attrs.get("Labels") or {}).get(LABEL_OWNER_OF) not in keep:
                with _translated():
                    remove_quietly(record)
                removed += 1
        return removed
