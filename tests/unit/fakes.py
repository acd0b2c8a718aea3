"""In-memory stand-ins for the Prefect server and the container engine (dramatiq's StubBroker,
docker-py's fake client): orchestration is unit-tested in milliseconds.

`FakeAPI` keeps flow runs and their states and enforces Prefect's claim rule: of concurrent
PENDING proposals from SCHEDULED exactly one is accepted, the others are aborted, as the
server's orchestration rules do; a final state is not left without `force`.

`FakeRuntime` is a dict of fake containers. What a container does is scripted (`Script`): the
lines it prints, how it exits, what Prefect's engine inside reports (RUNNING at start, the
final state at exit), whether it answers a cancel request, and a gate that holds it running.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from dockerworker.api import (
    Deployment,
    Flow,
    FlowRun,
    NotFound,
    OrchestrationResult,
    ServerInfo,
    State,
    StateType,
    WorkPool,
)
from dockerworker.builds import BuildFailed, BuildResult
from dockerworker.containers import (
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_WORKER,
    ContainerSpec,
    ExitReport,
)
from dockerworker.entry import LABEL_CONTROL
from dockerworker.images import ImageUnavailable
from dockerworker.jobs import JobVariables, default_base_job_template
from dockerworker.logs import OutputLine, ResumePoint, RunOutput
from dockerworker.ownership import Owner, owner_record_name
from dockerworker.pacing import scheduled_time
from dockerworker.resources import Usage
from dockerworker.runtime import RuntimeTrouble, Workload, WorkloadGone
from dockerworker.settings import WorkerSettings
from dockerworker.warm import LABEL_WARM
from dockerworker.worker import Worker

POOL_NAME = "pool-a"
_SCRIPTED = object()  # finish(): what the script says
FAKE_HOST = "fake-engine"

# Prefect refuses a PENDING proposal from these (PreventPendingTransitions): abort.
_NO_PENDING_FROM = {StateType.PENDING, StateType.RUNNING, StateType.CANCELLING,
                    StateType.CANCELLED, StateType.COMPLETED, StateType.FAILED,
                    StateType.CRASHED}


class FakeAPI:
    """The Prefect REST calls the worker makes, against dicts; thread-safe."""

    server = ServerInfo("3.9.1")  # what api.PrefectAPI learns from /admin/version

    def __init__(self, pool: str = POOL_NAME) -> None:
        self.pool = WorkPool(id=uuid.uuid4(), name=pool, type="docker",
                             base_job_template=default_base_job_template())
        self.runs: dict[UUID, FlowRun] = {}
        self.deployments: dict[UUID, Deployment] = {}
        self.blocks: dict[tuple[str, str], dict[str, Any]] = {}  # (type slug, name) -> data
        self.variables: dict[str, Any] = {}
        self.flow = Flow(id=uuid.uuid4(), name="etl")
        self.logs: list[dict[str, Any]] = []
        self.history: dict[UUID, list[StateType]] = {}
        self.states: dict[UUID, list[State]] = {}  # with their messages, oldest first
        self.workers: dict[str, dict[str, Any]] = {}  # the pool's workers, by name
        # Proposals of these types are applied, and then answered as their retry would be
        # (the first answer lost on the way back, the client's retry answered instead).
        self.lose_answers: set[StateType] = set()
        self.proposals: list[tuple[UUID, StateType, str]] = []  # (run, state, status)
        self.fail: dict[str, Exception] = {}  # method name → raised at its next call
        self.heartbeats = 0
        self.poll_barrier: threading.Barrier | None = None  # polls meet here before answering
        self._lock = threading.RLock()

    # --- test set-up --------------------------------------------------------------------
    def add_run(self, name: str = "run", *, deployment: Deployment | None = None,
                job_variables: dict[str, Any] | None = None,
                state: StateType = StateType.SCHEDULED, message: str | None = None,
                infrastructure_pid: str | None = None) -> FlowRun:
        run = FlowRun(id=uuid.uuid4(), name=name, flow_id=self.flow.id,
                      deployment_id=deployment.id if deployment else None,
                      work_pool_name=self.pool.name, state=State(type=state, message=message),
                      job_variables=job_variables, infrastructure_pid=infrastructure_pid)
        with self._lock:
            self.runs[run.id] = run
            self.history[run.id] = [state]
            self.states[run.id] = [run.state] if run.state else []
        return run

    def add_deployment(self, name: str = "nightly",
                       job_variables: dict[str, Any] | None = None,
                       pull_steps: list[Any] | None = None) -> Deployment:
        deployment = Deployment(id=uuid.uuid4(), name=name, flow_id=self.flow.id,
                                job_variables=job_variables, pull_steps=pull_steps)
        self.deployments[deployment.id] = deployment
        return deployment

    def state_of(self, run_id: UUID) -> State:
        with self._lock:
            state = self.runs[run_id].state
        assert state is not None
        return state

    def messages(self, run_id: UUID) -> list[str]:
        """The run's log messages, in the order they were shipped."""
        with self._lock:
            return [e["message"] for e in self.logs if e["flow_run_id"] == str(run_id)]

    def _maybe_fail(self, method: str) -> None:
        if (exc := self.fail.pop(method, None)) is not None:
            raise exc

    # --- the client's calls -------------------------------------------------------------
    def health(self, patience: float | None = None) -> None:
        self._maybe_fail("health")

    def read_work_pool(self, name: str, patience: float | None = None) -> WorkPool:
        self._maybe_fail("read_work_pool")
        if name != self.pool.name:
            raise NotFound(f"work pool {name}")
        return self.pool

    def create_work_pool(self, name: str, type_: str,
                         base_job_template: dict[str, Any]) -> WorkPool:
        self._maybe_fail("create_work_pool")
        self.pool = WorkPool(id=uuid.uuid4(), name=name, type=type_,
                             base_job_template=base_job_template)
        return self.pool

    def heartbeat(self, pool: str, worker_name: str, interval_seconds: float,
                  patience: float | None = None) -> None:
        self._maybe_fail("heartbeat")
        self.heartbeats += 1
        self.workers[worker_name] = {"name": worker_name, "status": "ONLINE",
                                     "heartbeat_interval_seconds": int(interval_seconds)}

    def read_workers(self, pool: str, patience: float | None = None) -> list[dict[str, Any]]:
        self._maybe_fail("read_workers")
        return [dict(w) for w in self.workers.values()]

    def read_flow_run_states(self, flow_run_id: UUID,
                             patience: float | None = None) -> list[State]:
        self._maybe_fail("read_flow_run_states")
        with self._lock:
            return list(self.states.get(flow_run_id, []))

    def get_scheduled_flow_runs(self, pool: str, scheduled_before: datetime, limit: int | None,
                                queues: list[str], patience: float | None = None,
                                scheduled_after: datetime | None = None) -> list[FlowRun]:
        """The server's filter on the scheduled time (a run without one is due now), soonest
        first."""
        self._maybe_fail("get_scheduled_flow_runs")
        now = datetime.now(UTC)
        found = sorted(
            (run for run in self.filter_flow_runs(pool, [StateType.SCHEDULED])
             if (scheduled_after is None or _due_at(run, now) >= scheduled_after)
             and _due_at(run, now) <= scheduled_before),
            key=lambda run: _due_at(run, now))
        if self.poll_barrier is not None:
            self.poll_barrier.wait(5)
        return found[:limit] if limit is not None else found

    def filter_flow_runs(self, pool: str, states: list[StateType], ids: list[UUID] | None = None,
                         patience: float | None = None) -> list[FlowRun]:
        self._maybe_fail("filter_flow_runs")
        with self._lock:
            return [run.model_copy(deep=True) for run in self.runs.values()
                    if run.work_pool_name == pool and run.state and run.state.type in states
                    and (ids is None or run.id in ids)]

    def read_flow_run(self, flow_run_id: UUID) -> FlowRun:
        self._maybe_fail("read_flow_run")
        with self._lock:
            if flow_run_id not in self.runs:
                raise NotFound(f"flow run {flow_run_id}")
            return self.runs[flow_run_id].model_copy(deep=True)

    def set_state(self, flow_run_id: UUID, type_: StateType, message: str | None = None,
                  force: bool = False, name: str | None = None) -> OrchestrationResult:
        """Prefect's rules, as far as the worker meets them: PENDING only from SCHEDULED
        (one proposer wins), a final state stays unless forced."""
        self._maybe_fail("set_state")
        result = self._propose(flow_run_id, type_, message, force, name)
        if type_ in self.lose_answers and result.status == "ACCEPT":
            return self._propose(flow_run_id, type_, message, force, name)
        return result

    def _propose(self, flow_run_id: UUID, type_: StateType, message: str | None,
                 force: bool, name: str | None) -> OrchestrationResult:
        with self._lock:
            run = self.runs.get(flow_run_id)
            if run is None:
                raise NotFound(f"flow run {flow_run_id}")
            current = run.state
            status, reason = "ACCEPT", ""
            if not force and current is not None:
                if type_ == StateType.PENDING and current.type in _NO_PENDING_FROM:
                    status = "ABORT"
                    reason = (f"This run is in a {current.type.value} state and cannot "
                              "transition to a PENDING state.")
                elif (type_ == StateType.PENDING and run.deployment_id is not None
                      and run.deployment_id not in self.deployments):
                    status, reason = "ABORT", "Deployment not found."  # Prefect 3's rule
                elif current.is_final:
                    status = "ABORT"
                    reason = "This run has already terminated."
            self.proposals.append((flow_run_id, type_, status))
            if status == "ACCEPT":
                run.state = State(type=type_, name=name or type_.value.title(), message=message)
                self.history[flow_run_id].append(type_)
                self.states[flow_run_id].append(run.state)
            return OrchestrationResult(status=status, state=run.state,
                                       details={"reason": reason} if reason else {})

    def set_infrastructure_pid(self, flow_run_id: UUID, infrastructure_pid: str,
                               patience: float | None = None) -> None:
        self._maybe_fail("set_infrastructure_pid")
        with self._lock:
            self.runs[flow_run_id].infrastructure_pid = infrastructure_pid

    def read_block_data(self, block_type: str, name: str) -> dict[str, Any]:
        self._maybe_fail("read_block_data")
        if (block_type, name) not in self.blocks:
            raise NotFound(f"no block {block_type}/{name}")
        return self.blocks[(block_type, name)]

    def read_variable(self, name: str) -> Any:
        if name not in self.variables:
            raise NotFound(f"no variable {name}")
        return self.variables[name]

    def read_deployment(self, deployment_id: UUID) -> Deployment:
        self._maybe_fail("read_deployment")
        if deployment_id not in self.deployments:
            raise NotFound(f"deployment {deployment_id}")
        return self.deployments[deployment_id]

    def read_flow(self, flow_id: UUID) -> Flow:
        self._maybe_fail("read_flow")
        return self.flow

    def send_logs(self, logs: list[dict[str, Any]], patience: float | None = None) -> None:
        with self._lock:
            self.logs.extend(logs)

    def read_logs_newest_first(self, flow_run_id: UUID, limit: int, offset: int = 0,
                               text: str | None = None) -> list[dict[str, Any]]:
        """What resume_point() reads: a page of the run's logs, newest first (the server
        sends at most 200 a page), matching Prefect's text search if given."""
        self._maybe_fail("read_logs_newest_first")
        limit = min(limit, 200)
        with self._lock:
            rows = [e for e in self.logs if e["flow_run_id"] == str(flow_run_id)
                    and (text is None or _text_matches(text, e))]
        rows.sort(key=lambda e: e["timestamp"], reverse=True)
        return rows[offset:offset + limit]


def _due_at(run: FlowRun, now: datetime) -> datetime:
    return scheduled_time(run) or now


def _text_matches(query: str, entry: dict[str, Any]) -> bool:
    """Prefect's log text search: any plain term, none of the `-term`s, in message + name."""
    searchable = f"{entry['message']} {entry['name']}".lower()
    terms = query.lower().split()
    include = [t for t in terms if not t.startswith("-")]
    exclude = [t[1:] for t in terms if t.startswith("-")]
    return (not include or any(t in searchable for t in include)) and not any(
        t in searchable for t in exclude)


@dataclass
class Script:
    """What one fake container does."""

    lines: list[tuple[str, str]] = field(default_factory=list)  # (stream, text)
    exit_code: int = 0
    oom: bool = False
    error: str = ""
    final_state: StateType | None = StateType.COMPLETED  # what Prefect's engine reports
    reports_running: bool = True
    cancellable: bool = True  # the engine answers a cancel request (reports CANCELLED)
    hold: threading.Event | None = None  # runs until set (or stopped)
    usage: list[Usage] = field(default_factory=list)  # readings while running, in turn
    image: str = "fake/flow:1"
    memory_limit: int = 0


@dataclass
class FakeContainer:
    workload: Workload
    script: Script
    run_id: UUID | None = None
    exit: ExitReport | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    removed: bool = False
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    ready: threading.Event = field(default_factory=threading.Event)  # a warm one said so


class FakeRuntime:
    """The runtime seam over a dict of fake containers; every call is recorded."""

    def __init__(self, api: FakeAPI, host: str = FAKE_HOST) -> None:
        self.api = api
        self.host = host
        self.containers: dict[str, FakeContainer] = {}
        self.script_for: Callable[[ContainerSpec], Script] = lambda spec: Script()
        self.missing_images: set[str] = set()
        self.image_gate: threading.Event | None = None  # ensure_image waits for it
        self.fail: dict[str, Exception] = {}  # method name → raised at its next call
        self.calls: list[tuple[str, str]] = []
        self.records: dict[str, tuple[str, Owner]] = {}  # takeover records: name → (id, owner)
        self.usage_reads = 0  # usage(): called from the sampler thread, not in `calls`
        self.boot_at_once = True  # warm containers are ready as soon as they start
        self.unread: str | None = None  # unread_usage(): a runtime that reads none (Swarm)
        self._lock = threading.RLock()

    # --- test helpers -------------------------------------------------------------------
    def of_run(self, run_id: UUID) -> FakeContainer | None:
        with self._lock:
            return next((c for c in self.containers.values() if c.run_id == run_id), None)

    def add(self, name: str, labels: dict[str, str], script: Script | None = None,
            status: str = "running", run_id: UUID | None = None,
            env: dict[str, str] | None = None) -> FakeContainer:
        """A container that exists before the test's worker does (for adoption)."""
        workload = Workload(id=uuid.uuid4().hex * 2, name=name,
                            labels={LABEL_MANAGED: "true", LABEL_POOL: self.api.pool.name,
                                    **labels}, status=status, env=env or {})
        container = FakeContainer(workload, script or Script(), run_id)
        if status in ("exited", "dead"):
            container.exit = ExitReport(container.script.exit_code, False, "")
            container.ended.set()
        with self._lock:
            self.containers[workload.id] = container
        if status == "running" and run_id is not None:
            self._begin(container, report_running=False)
        return container

    def vanish(self, run_id: UUID) -> None:
        """`docker rm -f` behind the worker's back."""
        container = self.of_run(run_id)
        assert container is not None
        self._drop(container)

    def finish(self, container: FakeContainer, exit_code: int | None = None,
               state: object = _SCRIPTED) -> None:
        """The container ends; Prefect's engine inside reports `state` (the script's unless
        given; None: it reports nothing)."""
        with self._lock:
            if container.ended.is_set():
                return
            script = container.script
            report = script.final_state if state is _SCRIPTED else state
            if isinstance(report, StateType) and container.run_id is not None:
                self.api.set_state(container.run_id, report)
            code = script.exit_code if exit_code is None else exit_code
            container.exit = ExitReport(code, script.oom, script.error,
                                        started=container.started, finished=datetime.now(UTC),
                                        image=script.image, memory_limit=script.memory_limit)
            container.workload.status = "exited"
            container.ended.set()

    def _call(self, method: str, workload: Workload | None = None) -> FakeContainer | None:
        self.calls.append((method, workload.name if workload else ""))
        if (exc := self.fail.pop(method, None)) is not None:
            raise exc
        if workload is None:
            return None
        with self._lock:
            container = self.containers.get(workload.id)
        if container is None:
            raise WorkloadGone(workload.name)
        return container

    def _begin(self, container: FakeContainer, report_running: bool = True) -> None:
        env = container.workload.env
        if "PREFECT__FLOW_RUN_ID" in env:
            container.run_id = UUID(env["PREFECT__FLOW_RUN_ID"])
        if container.run_id is None:
            return  # a warm container waiting for its run
        script = container.script
        if report_running and script.reports_running:
            self.api.set_state(container.run_id, StateType.RUNNING)
        if script.hold is None:
            self.finish(container)
        else:
            hold = script.hold
            threading.Thread(target=lambda: (hold.wait(), self.finish(container)),
                             daemon=True).start()

    def _drop(self, container: FakeContainer) -> None:
        with self._lock:
            self.containers.pop(container.workload.id, None)
        container.removed = True
        container.ended.set()

    # --- the Runtime protocol -----------------------------------------------------------
    def host_id(self) -> str:
        self._call("host_id")
        return self.host

    def ping(self) -> None:
        self._call("ping")

    def engine_version(self) -> str:
        self._call("engine_version")
        return "fake-1.0"

    def host_view(self) -> None:
        return None  # the policy judges the job by its text

    def ensure_image(self, job: JobVariables, trusted_credentials: bool) -> str:
        self._call("ensure_image")
        if self.image_gate is not None:
            self.image_gate.wait(10)
        if job.image in self.missing_images:
            raise ImageUnavailable(f"pulling image {job.image!r} failed: not found")
        return "present"

    def start(self, spec: ContainerSpec) -> Workload:
        self._call("start")
        kwargs = spec.create_kwargs
        workload = Workload(id=uuid.uuid4().hex * 2, name=spec.name,
                            labels=dict(kwargs["labels"]), env=dict(kwargs["environment"]))
        container = FakeContainer(workload, self.script_for(spec))
        with self._lock:
            self.containers[workload.id] = container
        self._begin(container)
        return workload

    def hand_over(self, workload: Workload, spec: ContainerSpec) -> None:
        container = self._call("hand_over", workload)
        assert container is not None and LABEL_WARM in workload.labels
        workload.name = container.workload.name = spec.name
        identity = {k: v for k, v in spec.create_kwargs["environment"].items()
                    if k.startswith("PREFECT__")}
        container.workload.env.update(identity)
        workload.env.update(identity)
        container.script = self.script_for(spec)
        self._begin(container)

    def resume(self, workload: Workload) -> None:
        container = self._call("resume", workload)
        assert container is not None
        container.workload.status = workload.status = "running"
        self._begin(container, report_running=False)

    def follow(self, workload: Workload, output: RunOutput, resume: ResumePoint | None) -> None:
        container = self._call("follow", workload)
        assert container is not None
        for stream, text in container.script.lines:
            output.add(OutputLine(stream, datetime.now(UTC), text))
        while not container.ended.wait(0.005):
            if output.stopped:
                return
        if container.removed:
            raise WorkloadGone(workload.name)

    def wait(self, workload: Workload) -> None:
        container = self._call("wait", workload)
        assert container is not None
        container.ended.wait()
        if container.removed:
            raise WorkloadGone(workload.name)

    def read_exit(self, workload: Workload) -> ExitReport:
        container = self._call("read_exit", workload)
        assert container is not None and container.exit is not None
        return container.exit

    def usage(self, workload: Workload) -> Usage | None:
        """The script's readings in turn (the last one again), None once it has ended."""
        self.usage_reads += 1
        if (exc := self.fail.pop("usage", None)) is not None:
            raise exc
        with self._lock:
            container = self.containers.get(workload.id)
            if container is None:
                raise WorkloadGone(workload.name)
            readings = container.script.usage
            if container.ended.is_set() or not readings:
                return None
            return readings.pop(0) if len(readings) > 1 else readings[0]

    def unread_usage(self) -> str | None:
        return self.unread

    def stop(self, workload: Workload, grace: int, note: Callable[[str], None]) -> None:
        container = self._call("stop", workload)
        assert container is not None
        if workload.labels.get(LABEL_CONTROL) == "stdin" and container.script.cancellable:
            note(f"asking Prefect's engine in container {workload.name} to cancel")
            self.finish(container, exit_code=0, state=StateType.CANCELLED)
        else:
            note(f"stopping container {workload.name} (SIGTERM)")
            self.finish(container, exit_code=143, state=None)

    def remove(self, workload: Workload) -> None:
        self.calls.append(("remove", workload.name))
        with self._lock:
            container = self.containers.get(workload.id)
        if container is not None:
            self._drop(container)

    def removed_meanwhile(self, workload: Workload) -> bool:
        with self._lock:
            return workload.id not in self.containers

    def last_output(self, workload: Workload) -> list[str]:
        with self._lock:
            container = self.containers.get(workload.id)
        return [] if container is None else [text for _, text in container.script.lines]

    def is_running(self, workload: Workload) -> bool:
        with self._lock:
            container = self.containers.get(workload.id)
        return container is not None and container.workload.status == "running"

    def wait_ready(self, workload: Workload, timeout: float) -> bool:
        """Ready at once (boot_at_once), or when the test sets the container's `ready`;
        never once it ended."""
        container = self._call("wait_ready", workload)
        assert container is not None
        if self.boot_at_once:
            container.ready.set()
        deadline = time.monotonic() + timeout
        while not container.ready.wait(0.005):
            if container.ended.is_set() or time.monotonic() > deadline:
                return False
        return not container.ended.is_set()

    def inspect(self, workload_id: str) -> Workload:
        self._call("inspect")
        with self._lock:
            container = self.containers.get(workload_id)
        if container is None:
            raise WorkloadGone(workload_id)
        w = container.workload
        return Workload(w.id, w.name, dict(w.labels), w.status, dict(w.env))

    def starts_elsewhere(self, worker: str, window: float) -> dict[str, float]:
        self._call("starts_elsewhere")
        now = datetime.now(UTC)
        with self._lock:
            ages = {key: (now - c.started).total_seconds() for key, c in self.containers.items()
                    if not c.ended.is_set() and not c.removed
                    and c.workload.labels.get(LABEL_WORKER) != worker}
        return {key: age for key, age in ages.items() if age < window}

    def list_workloads(self, pool: str, **labels: str) -> list[Workload]:
        self._call("list_workloads")
        wanted = {LABEL_POOL: pool, LABEL_MANAGED: "true", **labels}
        with self._lock:
            found = [c.workload for c in self.containers.values()
                     if all(c.workload.labels.get(k) == v for k, v in wanted.items())]
        return [Workload(w.id, w.name, dict(w.labels), w.status) for w in found]

    def take_over(self, workload: Workload, pool: str, owner: Owner) -> bool:
        self._call("take_over")
        name = owner_record_name(workload.id, owner.generation)
        with self._lock:
            if workload.id not in self.containers:
                raise WorkloadGone(workload.name)
            if name in self.records:
                return False
            self.records[name] = (workload.id, owner)
        return True

    def owners(self, pool: str) -> dict[str, Owner]:
        self._call("owners")
        found: dict[str, Owner] = {}
        with self._lock:
            for workload_id, owner in self.records.values():
                if owner.generation > found.get(workload_id, Owner("", -1)).generation:
                    found[workload_id] = owner
        return found

    def forget_owners(self, pool: str, keep: set[str]) -> int:
        self._call("forget_owners")
        with self._lock:
            gone = [name for name, (wid, _) in self.records.items() if wid not in keep]
            for name in gone:
                del self.records[name]
        return len(gone)


class FakeBuilder:
    """Builds nothing; `fail` makes the next build fail, `gate` holds it."""

    def __init__(self) -> None:
        self.fail: str | None = None
        self.gate: threading.Event | None = None
        self.builds: list[str] = []

    def ensure(self, base: str, plan: Any, deployment: str,
               on_line: Callable[[str], None], limits: Any = None) -> BuildResult:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise BuildFailed(self.fail)
        on_line("Step 1/2 : FROM " + base)
        self.builds.append(deployment)
        return BuildResult(f"dockerworker.invalid/{deployment}:abc", built=True, seconds=0.1)

    def release_locks(self) -> int:
        return 0


def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `condition` every few milliseconds; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


STARTED: list[Worker] = []  # stopped after each test (conftest.py)


def make_worker(api: FakeAPI, runtime: FakeRuntime, /, *, start: bool = True,
                **settings: Any) -> Worker:
    """A worker on the fakes, started up (pool, recovery, adoption) but not looping."""
    values = {"pool": api.pool.name, "name": "w1", "api_url": "http://127.0.0.1:4200/api",
              **settings}
    worker = Worker(WorkerSettings.model_validate(values), api,  # type: ignore[arg-type]
                    runtime=runtime, builder=FakeBuilder())  # type: ignore[arg-type]
    worker.shipper.start()
    STARTED.append(worker)
    if start:
        worker.start_up()
    return worker


def settle(worker: Worker, timeout: float = 5.0) -> None:
    """Until every supervisor of `worker` has ended."""
    wait_until(lambda: not len(worker.admission), timeout)


__all__ = ["FakeAPI", "FakeBuilder", "FakeRuntime", "RuntimeTrouble", "Script", "wait_until"]
