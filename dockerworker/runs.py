"""RunSupervisor: one flow run, from claim (or adoption) to verdict, in its own thread.

The flow itself runs under Prefect's engine inside the container, which moves the run to
Running and to its final state. The supervisor owns everything around it: the claim, the
image, the container, its output, cancellation, and the verdict when the container ends
without a final state (exit code, signal, out of memory, the last lines it printed).

`_run` is the list of steps. A step that ends the run raises its verdict (verdict.py); one
handler (`_guard`) reports it and frees the slot, whatever else goes wrong. The container
engine is behind the runtime seam (runtime.py): nothing here knows Docker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from uuid import UUID

from . import metrics
from .api import (
    Deployment,
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    ServerUnreachable,
    State,
    StateType,
    WorkPool,
)
from .builds import Builder
from .cache import CachedReads
from .containers import ContainerSpec, ExitReport, WatchOptions
from .entry import SECRETS_ENV
from .flowcode import run_secrets
from .follow import Follower
from .jobs import JobVariables
from .logformat import run_label
from .logs import LogShipper, ResumePoint, RunOutput, resume_point
from .ownership import Claim
from .policy import Masker
from .prepare import Preparation, build_name, secret_texts
from .report import RunReporter
from .resources import UsageWatch, resource_line
from .runtime import (
    EngineUnavailable,
    Runtime,
    RuntimeTrouble,
    Workload,
    WorkloadGone,
)
from .settings import WorkerSettings
from .verdict import (
    ClaimLost,
    Outcome,
    RunCancelled,
    RunCrashed,
    RunEnded,
    Unjudged,
    Verdict,
    cancelled_verdict,
    judge,
)
from .warm import LABEL_WARM, WarmPool

log = logging.getLogger(__name__)


def _due(flow_run: FlowRun) -> datetime | None:
    """When the run could first have been picked up: created, or its scheduled time."""
    times = [t for t in (flow_run.created, flow_run.expected_start_time) if t is not None]
    return max(times) if times else None


@dataclass(frozen=True)
class Refusal:
    """A claim the server refused: its answer, and the run's state as it is."""

    answer: str
    state: State | None


def claim(api: PrefectAPI, flow_run_id: UUID, mine: Claim) -> Refusal | None:
    """Propose PENDING under `mine`; None when the run is ours, else the refusal.
    A refusal whose PENDING state is this worker's own claim is ours too: the answer to an
    earlier attempt was lost after the server applied it (a retried request). A refusal
    carries the run's state as it is (Prefect 2 and 3): read only when it does not."""
    result = api.set_state(flow_run_id, StateType.PENDING, mine.message)
    if result.status == "ACCEPT" and (result.state is None
                                      or result.state.type == StateType.PENDING):
        return None
    state = result.state
    if result.status == "ACCEPT" or state is None:
        state = api.read_flow_run(flow_run_id).state
    if (state is not None and state.type == StateType.PENDING
            and state.message == mine.message):
        return None
    return Refusal(result.status + (f": {result.reason}" if result.reason else ""), state)


class Phase(StrEnum):
    CLAIMING = "claiming"
    PREPARING = "preparing"  # job, image, build: no container yet
    RUNNING = "running"  # the container exists; following it
    DONE = "done"


class RunSupervisor:
    """Sees one flow run through; never raises, whatever goes wrong."""

    def __init__(
        self,
        api: PrefectAPI,
        runtime: Runtime,
        settings: WorkerSettings,
        pool: WorkPool,
        flow_run: FlowRun,
        shipper: LogShipper,
        builder: Builder,
        on_done: Callable[[FlowRun], None] = lambda run: None,
        warm: WarmPool | None = None,
        usage: UsageWatch | None = None,
        reads: CachedReads | None = None,
        on_owed: Callable[[], None] = lambda: None,
    ) -> None:
        """`reads`: the worker's deployments, flows and pool, shared by its runs;
        `on_owed`: something the server did not take is left to reconciliation."""
        self.api = api
        self.reads = reads or CachedReads(api)
        self.runtime = runtime
        self.settings = settings
        self.pool = pool
        self.flow_run = flow_run
        self.shipper = shipper
        self.builder = builder
        self.on_done = on_done
        self.warm = warm
        self.usage = usage or UsageWatch(runtime)  # the worker's one, shared by its runs
        self.label = run_label(flow_run.name, flow_run.id)
        self.phase = Phase.CLAIMING
        self.claimed = False
        self.unjudged = False  # ended without a verdict the server took: reconciliation owes it
        self.claimed_at: float | None = None  # monotonic: for the metrics' histograms
        self.started_at: float | None = None  # the container started (not for adopted runs)
        self.container: Workload | None = None
        self._ended: Workload | None = None  # its container, ended and still there
        # until the job is known: a failure before then is retried as the policy says
        self.options = WatchOptions(infra_retries=settings.policy.infra_retries)
        self.cancel_requested = threading.Event()
        self._ended_as: StateType | None = None  # a final state the event stream reported
        self.reporter = RunReporter(api, runtime, shipper, flow_run, self.label,
                                    Masker(settings.secrets()))
        self.prepare = Preparation(api, runtime, builder, settings, flow_run, shipper, warm,
                                   self.say, lambda text: self.mask(text), self.cancel_requested,
                                   read_pool=self.reads.pool, on_unrecorded=on_owed)
        self.follower = Follower(api, runtime, shipper, flow_run, self.label)

    @property
    def mask(self) -> Masker:
        """Secrets of the run (its job's and the worker's), masked in all it writes."""
        return self.reporter.mask

    @mask.setter
    def mask(self, masker: Masker) -> None:
        self.reporter.mask = masker

    def say(self, message: str, level: int = logging.INFO) -> None:
        """A step of this run: on the worker's console and in the run's logs (secrets masked)."""
        self.reporter.say(message, level)

    @property
    def output(self) -> RunOutput | None:
        """The container's output on its way to the server, once following has begun."""
        return self.follower.output

    # --- entry points (each in the supervisor's own thread) ------------------------------
    def run(self) -> None:
        """A scheduled run: claim, prepare, start, watch, judge."""
        self._guard(self._run)

    def adopt(self, workload: Workload) -> None:
        """A container this worker started before a restart: resume watching it."""
        self.claimed = True
        self.container = workload
        self.phase = Phase.RUNNING
        self.options = WatchOptions.from_labels(workload.labels)
        self.mask = Masker.for_env(workload.env, self.settings.secrets())

        def body() -> Verdict:
            self.mask = self._adopted_mask(workload.env)
            if workload.status == "created":  # the worker died between create and start
                self.runtime.resume(workload)
            return self._watch(workload, resume_point(self.api, self.flow_run.id))

        self._guard(body)

    def _adopted_mask(self, env: dict[str, str]) -> Masker:
        """The masker of an adopted run: its env's secrets and its pull steps' credentials,
        as when it started."""
        deployment = None
        if self.flow_run.deployment_id:
            with contextlib.suppress(PrefectAPIError):
                deployment = self.reads.deployment(self.flow_run.deployment_id)
        files = {}
        for name in filter(None, env.get(SECRETS_ENV, "").split(",")):  # its secret files
            with contextlib.suppress(OSError):
                files[name] = (self.settings.secrets_dir / name).read_bytes()
        try:
            pulled = run_secrets(self.api, deployment, env)
        except ServerUnreachable as exc:  # it runs already: watch it, masking what is known
            log.warning("%s: the pull steps' blocks could not be read (%s); their values are "
                        "not masked in this run's output", self.label, exc)
            pulled = set()
        return Masker.for_env(env, self.settings.secrets() | pulled | secret_texts(files))

    # --- the one handler -----------------------------------------------------------------
    def _guard(self, body: Callable[[], Verdict]) -> None:
        """Run the steps; report how the run ended; free the slot, whatever raises."""
        try:
            verdict = self._verdict_of(body)
            if verdict is not None:
                self.reporter.report(verdict, self.options.infra_retries)
                if self._ended is not None and self.options.auto_remove:  # the server has it
                    self._remove(self._ended)
        except ServerUnreachable as exc:  # the verdict stays with the container (if any)
            self._unjudged(f"could not report how the run ended: {exc}")
        except Exception:  # the last line of defence: one run never kills the worker
            log.exception("%s: could not report how the run ended", self.label)
        finally:
            self.phase = Phase.DONE
            self.on_done(self.flow_run)

    def _verdict_of(self, body: Callable[[], Verdict]) -> Verdict | None:
        """The steps' verdict, returned or raised; None: nothing to report."""
        try:
            return body()
        except RunCrashed as end:
            return self.reporter.with_context(Verdict(Outcome.CRASHED, end.message, end.force,
                                              end.container, end.infrastructure, end.reason))
        except RunCancelled as end:
            if end.message is not None:
                return Verdict(Outcome.CANCELLED, end.message, force=True)
            return self._cancelled()
        except Unjudged as end:
            self._unjudged(end.message)
            return None
        except RunEnded:  # ClaimLost, Detached: the run is not ours to judge
            return None
        except EngineUnavailable as exc:  # the engine went away before the container ran
            if not self.claimed:
                return None
            return Verdict(Outcome.CRASHED, f"the Docker engine did not answer: {exc}",
                           infrastructure=True, reason="engine")
        except Exception as exc:
            log.exception("%s: unexpected worker error", self.label)
            if not self.claimed:  # an unclaimed run is left for the next poll, untouched
                return None
            return Verdict(Outcome.CRASHED,
                           f"dockerworker failed while running this flow run: {exc}",
                           reason="worker_error")

    def _unjudged(self, why: str) -> None:
        """The server did not answer at the verdict: what happens to the run instead."""
        self.unjudged = True
        if self._ended is not None:  # it keeps the verdict (exit code, output) until then
            after = (f"container {self._ended.name} is kept and the run judged again once "
                     "the server answers")
        elif self.container is None:  # reconciliation gives the claim back
            after = "the run is given back to the pool once the server answers"
        else:
            after = "the run is judged again once the server answers"
        self.say(f"{why}; {after}", logging.WARNING)

    # --- called from the worker's loop ---------------------------------------------------
    def owes_infrastructure(self) -> bool:
        """Its container is not recorded as the run's infrastructure yet (the server did
        not answer then)."""
        return self.prepare.unrecorded is not None

    def record_infrastructure(self, patience: float) -> None:
        """Try again to record the container as the run's infrastructure (if owed)."""
        self.prepare.record_infrastructure(patience)

    def cancel(self) -> None:
        """The run is CANCELLING: stop what is under way (SIGTERM, then SIGKILL)."""
        if self.cancel_requested.is_set():
            return
        self.cancel_requested.set()
        self.say("cancellation requested")
        if self.container is not None:
            try:
                self.runtime.stop(self.container, self.options.stop_timeout, self.say)
            except WorkloadGone:
                pass
            except RuntimeTrouble as exc:
                log.warning("%s: could not stop container %s: %s", self.label,
                            self.container.name, exc)

    def ended_as(self, type_: StateType) -> None:
        """The event stream says the run reached this final state (of its type, only the
        verdict's concern): no need to read it after the container's exit. Heard only while
        its container runs: an event of the run's life before this claim never counts."""
        if self.phase == Phase.RUNNING:
            self._ended_as = type_

    def _state_now(self, report: ExitReport | None) -> State | None:
        """The run's state after the container's exit: as the event stream reported it when
        the container exited 0, else read. Anyone holding an API key may post an event (every
        flow does): a forged Completed must not cover a crash (found by an audit)."""
        if self._ended_as is not None and report is not None and report.exit_code == 0:
            return State(type=self._ended_as)
        return self.api.read_flow_run(self.flow_run.id).state

    def stop_following(self) -> None:
        """The worker is leaving: stop shipping output (a later worker resumes from the server)."""
        self.follower.stop()

    # --- the steps -----------------------------------------------------------------------
    def _run(self) -> Verdict:
        self._claim()  # first: replicas that lose the claim read nothing more
        self.phase = Phase.PREPARING
        try:
            spec = self._prepare()
        except RunCancelled:
            raise
        except Exception as exc:
            if self.cancel_requested.is_set():  # the run is CANCELLING: that, not a crash
                raise RunCancelled from exc
            if isinstance(exc, ServerUnreachable):  # past the client's patience
                raise RunCrashed(
                    f"the Prefect server did not answer while the run was prepared: {exc}",
                    infrastructure=True, reason="server") from exc
            raise
        workload = self._start(spec)
        return self._watch(workload, None)

    def _prepare(self) -> ContainerSpec:
        """Deployment, job, policy, secrets, image, dependencies: the container to start."""
        deployment = self._read_deployment()
        job = self._resolve_job(deployment)
        self._check_policy(job)
        secrets = self.prepare.read_secrets(job)  # allowed: read, and masked from here on
        self.mask = self.mask.with_secrets(secret_texts(secrets))
        job = self.prepare.ensure_image(job)
        flow = self.reads.flow(self.flow_run.flow_id)
        job = self.prepare.build_dependencies(job, build_name(flow, deployment))
        return self.prepare.container_spec(job, deployment, flow, self.pool, secrets)

    def _read_deployment(self) -> Deployment | None:
        """The run's deployment; a run whose deployment is gone is cancelled, as Prefect does."""
        if not self.flow_run.deployment_id:
            return None
        try:
            return self.reads.deployment(self.flow_run.deployment_id)
        except NotFound:
            message = (
                f"Deployment {self.flow_run.deployment_id} no longer exists, cancelled run."
            )
            log.warning("%s: %s", self.label, message)
            raise RunCancelled(message) from None

    def _claim(self) -> None:
        """Propose PENDING: the server accepts exactly one proposer, so no run starts twice."""
        mine = Claim(self.settings.name, self.runtime.host_id())
        refusal = claim(self.api, self.flow_run.id, mine)
        if refusal is not None:
            # Prefect 3 refuses to claim a run whose deployment is gone ("Deployment not
            # found."), leaving it SCHEDULED: such a run is cancelled here
            if refusal.state is not None and refusal.state.type == StateType.SCHEDULED:
                self._read_deployment()
            log.info("%s: not claimed (server said %s)", self.label, refusal.answer)
            metrics.CLAIMS_LOST.inc()
            raise ClaimLost(refusal.answer)
        self.claimed = True
        self.claimed_at = time.monotonic()
        metrics.RUNS_CLAIMED.inc()
        if due := _due(self.flow_run):
            metrics.PICKUP_SECONDS.observe(max(0.0, (datetime.now(UTC) - due).total_seconds()))
        self.say(f"claimed by worker {self.settings.name}")

    def _resolve_job(self, deployment: Deployment | None) -> JobVariables:
        """The job (the pool's template as it is now ⊕ values); from here on its secrets are
        masked and its options known."""
        self.pool, job, self.mask = self.prepare.resolve_job(self.pool.name, deployment)
        self.options = WatchOptions.from_job(job)
        return job

    def _check_policy(self, job: JobVariables) -> None:
        """The worker's policy may refuse the job, looking at the host as the engine will."""
        if refused := self.settings.policy.violations(job, self.runtime.host_view()):
            raise RunCrashed("refused by the worker's policy: " + "; ".join(refused),
                             reason="refused")

    def _start(self, spec: ContainerSpec) -> Workload:
        """A warm container handed the run, or a new one; then it is the run's container."""
        if self.cancel_requested.is_set():
            raise RunCancelled
        workload = self.prepare.launch(spec)
        self.container = workload
        if self.warm is not None:  # held here now: the pool's hold on a warm one ends
            self.warm.handed(workload)
        self.started_at = time.monotonic()
        if self.claimed_at is not None:
            metrics.CLAIM_TO_START_SECONDS.observe(self.started_at - self.claimed_at)
        self.phase = Phase.RUNNING
        if self.cancel_requested.is_set():  # cancelled while the container was being created
            self.cancel_requested.clear()
            self.cancel()
        return workload

    def _watch(self, workload: Workload, resume: ResumePoint | None) -> Verdict:
        """Follow the container to its end, then judge it (and remove it if it asked)."""
        unread = self.runtime.unread_usage()
        if unread is None:
            self.usage.watch(workload)
        try:
            report = self.follower.follow(workload, self.options, self.mask, resume)
        finally:
            seen = self.usage.release(workload)
        if self.started_at is not None and report is not None:
            metrics.CONTAINER_LIFETIME_SECONDS.observe(time.monotonic() - self.started_at)
        mem_limit = self.options.mem_limit
        if report is not None:
            self.say(f"container {workload.name} {report.describe(mem_limit)}; "
                     f"{self.follower.summary()}")
            self.say(resource_line(report, seen, warm=LABEL_WARM in workload.labels,
                                   unread=unread))
        if self.cancel_requested.is_set():
            raise RunCancelled
        try:
            state = self._state_now(report)
        except ServerUnreachable as exc:
            if report is not None and not self.runtime.removed_meanwhile(workload):
                self._ended = workload  # it keeps the verdict; else reconciliation has it
            raise Unjudged(f"the Prefect server did not answer after the container ended: "
                           f"{exc}") from exc
        removed = (report is not None and not (state is not None and state.is_final)
                   and self.runtime.removed_meanwhile(workload))
        verdict = self.reporter.with_context(judge(
            report, state, cancelled=False, removed=removed, workload=workload,
            mem_limit=mem_limit, engine_restarted=self.follower.engine_trouble))
        if report is not None and not removed:
            self._ended = workload  # removed (auto_remove) once the verdict is reported
        return verdict

    def _cancelled(self) -> Verdict:
        """After a cancellation: CANCELLED with what happened, and the container removed."""
        workload, report = self.container, None
        if workload is not None:
            try:
                report = self.runtime.read_exit(workload)
            except WorkloadGone:
                pass
            self._remove(workload)
        state = self.api.read_flow_run(self.flow_run.id).state
        verdict = cancelled_verdict(state, workload, report, self.options.mem_limit)
        self.say(verdict.message)
        if verdict.outcome is Outcome.LEAVE:  # Prefect's engine reported it; said already
            return Verdict(Outcome.LEAVE, reason=verdict.reason, state=verdict.state)
        return verdict

    def _remove(self, workload: Workload) -> None:
        try:
            self.runtime.remove(workload)
        except RuntimeTrouble as exc:
            log.warning("%s: could not remove container %s: %s", self.label, workload.name, exc)
