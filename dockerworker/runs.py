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

import logging
import sys
import threading
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from .api import (
    Deployment,
    Flow,
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    StateType,
    WorkPool,
)
from .builds import Builder, BuildFailed, BuildPlan
from .containers import ContainerSpec, WatchOptions, build_spec
from .images import ImageUnavailable
from .jobs import InvalidJobVariables, JobVariables, merge_job_variables, resolve_job
from .logs import LogShipper, ResumePoint, RunOutput, log_entry, resume_point
from .policy import Masker
from .runtime import (
    EngineError,
    EngineUnavailable,
    Runtime,
    RuntimeTrouble,
    Workload,
    WorkloadGone,
    infrastructure_pid,
)
from .settings import WorkerSettings
from .verdict import (
    ClaimLost,
    Detached,
    Outcome,
    RunCancelled,
    RunCrashed,
    RunEnded,
    Verdict,
    cancelled_verdict,
    judge,
)
from .warm import WarmPool

log = logging.getLogger(__name__)
_console_lock = threading.Lock()
MAX_STATE_MESSAGE = 2000
DOCKER_PATIENCE = 600.0  # how long a run waits for a restarting Docker engine
T = TypeVar("T")


def echo(prefix: str, line: str) -> None:
    """A container's line on the worker's console, prefixed with its flow run's name."""
    with _console_lock:
        sys.stdout.write(f"{prefix} | {line}\n")
        sys.stdout.flush()


def claim_message(worker_name: str) -> str:
    """The PENDING state's message: who holds the claim, so a restarted worker knows its own."""
    return f"claimed by dockerworker {worker_name}"


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
    ) -> None:
        self.api = api
        self.runtime = runtime
        self.settings = settings
        self.pool = pool
        self.flow_run = flow_run
        self.shipper = shipper
        self.builder = builder
        self.on_done = on_done
        self.warm = warm
        self.label = f"flow run {flow_run.name!r} ({flow_run.id})"
        self.phase = Phase.CLAIMING
        self.claimed = False
        self.container: Workload | None = None
        self.output: RunOutput | None = None
        self.options = WatchOptions()
        self.cancel_requested = threading.Event()
        self._engine_trouble = False
        self.mask = Masker(settings.secrets())

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
            if workload.status == "created":  # the worker died between create and start
                self.runtime.resume(workload)
            return self._watch(workload, resume_point(self.api, self.flow_run.id))

        self._guard(body)

    # --- the one handler -----------------------------------------------------------------
    def _guard(self, body: Callable[[], Verdict]) -> None:
        """Run the steps; report how the run ended; free the slot, whatever raises."""
        try:
            verdict = self._verdict_of(body)
            if verdict is not None:
                self._report(verdict)
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
            return self._with_context(Verdict(Outcome.CRASHED, end.message, end.force,
                                              end.container))
        except RunCancelled as end:
            if end.message is not None:
                return Verdict(Outcome.CANCELLED, end.message, force=True)
            return self._cancelled()
        except RunEnded:  # ClaimLost, Detached: the run is not ours to judge
            return None
        except Exception as exc:
            log.exception("%s: unexpected worker error", self.label)
            if not self.claimed:  # an unclaimed run is left for the next poll, untouched
                return None
            return Verdict(Outcome.CRASHED,
                           f"dockerworker failed while running this flow run: {exc}")

    def _report(self, verdict: Verdict) -> None:
        """The verdict as the run's state: CRASHED, CANCELLED, or left as it is."""
        if verdict.outcome is Outcome.CRASHED:
            self._report_crash(verdict.message, verdict.force)
        elif verdict.outcome is Outcome.CANCELLED:
            self.api.set_state(self.flow_run.id, StateType.CANCELLED, verdict.message,
                               force=verdict.force)
        elif verdict.message:
            log.info("%s: %s", self.label, verdict.message)

    # --- called from the worker's loop ---------------------------------------------------
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

    def stop_following(self) -> None:
        """The worker is leaving: stop shipping output (a later worker resumes from the server)."""
        if self.output is not None:
            self.output.stop()

    # --- the steps -----------------------------------------------------------------------
    def _run(self) -> Verdict:
        deployment = self._read_deployment()
        self._claim()
        self.phase = Phase.PREPARING
        job = self._resolve_job(deployment)
        self._check_policy(job)
        job = self._ensure_image(job)
        flow = self.api.read_flow(self.flow_run.flow_id)
        job = self._build_dependencies(job, build_name(flow, deployment))
        spec = self._container_spec(job, deployment, flow)
        workload = self._start(spec)
        return self._watch(workload, None)

    def _read_deployment(self) -> Deployment | None:
        """The run's deployment; a run whose deployment is gone is cancelled, as Prefect does."""
        if not self.flow_run.deployment_id:
            return None
        try:
            return self.api.read_deployment(self.flow_run.deployment_id)
        except NotFound:
            message = (
                f"Deployment {self.flow_run.deployment_id} no longer exists, cancelled run."
            )
            log.warning("%s: %s", self.label, message)
            raise RunCancelled(message) from None

    def _claim(self) -> None:
        """Propose PENDING: the server accepts exactly one proposer, so no run starts twice."""
        result = self.api.set_state(self.flow_run.id, StateType.PENDING,
                                    claim_message(self.settings.name))
        if result.status != "ACCEPT" or (result.state and result.state.type != StateType.PENDING):
            log.info(
                "%s: not claimed (server said %s%s)",
                self.label,
                result.status,
                f": {result.reason}" if result.reason else "",
            )
            raise ClaimLost(result.status)
        self.claimed = True
        self.say(f"claimed by worker {self.settings.name}")

    def _resolve_job(self, deployment: Deployment | None) -> JobVariables:
        """The pool's template as it is now (an operator's edit counts at once) ⊕ values."""
        self.pool = self.api.read_work_pool(self.pool.name)
        values = merge_job_variables(
            deployment.job_variables if deployment else None, self.flow_run.job_variables
        )
        raw_env = values.get("env") if isinstance(values.get("env"), dict) else {}
        self.mask = Masker.for_env(
            {str(k): v for k, v in raw_env.items() if isinstance(v, str)}, self.settings.secrets()
        )
        try:
            job = resolve_job(self.pool.base_job_template, values)
        except InvalidJobVariables as exc:
            raise RunCrashed(str(exc)) from None
        secrets = self.settings.secrets()
        if job.registry_credentials:
            secrets.add(job.registry_credentials.password)
        self.mask = Masker.for_env({**job.env, **self.settings.auth_env()}, secrets)
        self.options = WatchOptions.from_job(job)
        return job

    def _check_policy(self, job: JobVariables) -> None:
        """The worker's policy may refuse the job (issue 12 extends what it looks at)."""
        if refused := self.settings.policy.violations(job):
            raise RunCrashed("refused by the worker's policy: " + "; ".join(refused))

    def _ensure_image(self, job: JobVariables) -> JobVariables:
        """The job's image on the engine, by its pull policy (a cancellation stops waiting)."""
        trusted = self.settings.policy.trusts_credentials_for(job.image)
        try:
            how = self._unless_cancelled(lambda: self.runtime.ensure_image(job, trusted))
        except ImageUnavailable as exc:
            raise RunCrashed(str(exc)) from None
        self.say(f"image {job.image} {how}")
        return job

    def _build_dependencies(self, job: JobVariables, deployment: str) -> JobVariables:
        """Run from the per-deployment image when the job asks for dependencies (built once,
        cached by content); EXTRA_PIP_PACKAGES is built in, not installed at run time."""
        plan = BuildPlan.from_job(job)
        if plan is None:
            return job
        self.say(f"dependencies ({plan.describe()}) on {job.image}")
        try:
            result = self._unless_cancelled(
                lambda: self.builder.ensure(job.image, plan, deployment, self._build_line)
            )
        except BuildFailed as exc:
            raise RunCrashed(str(exc)) from None
        if result.built:
            self.say(f"built image {result.tag} in {result.seconds:.0f} s")
        else:
            self.say(f"image {result.tag} cached, no build")
        env = {k: v for k, v in job.env.items() if k != "EXTRA_PIP_PACKAGES"}
        return job.model_copy(update={"image": result.tag, "env": env})

    def _build_line(self, line: str) -> None:
        line = self.mask(line)
        if not self.cancel_requested.is_set():
            echo(f"{self.flow_run.name} [build]", line)
            self.shipper.submit(log_entry(self.flow_run.id, line, name="dockerworker.build"))

    def _container_spec(self, job: JobVariables, deployment: Deployment | None,
                        flow: Flow) -> ContainerSpec:
        spec = build_spec(
            job,
            flow_run=self.flow_run,
            deployment=deployment,
            flow=flow,
            pool=self.pool,
            worker_name=self.settings.name,
            api_url=self.settings.api_url,
            auth_env=self.settings.auth_env(),
        )
        spec.create_kwargs = self.settings.policy.harden(spec.create_kwargs)
        return spec

    def _start(self, spec: ContainerSpec) -> Workload:
        """A warm container handed the run, or a new one; then it is the run's container."""
        if self.cancel_requested.is_set():
            raise RunCancelled
        workload = self._take_warm(spec) or self._start_cold(spec)
        self.container = workload
        self.phase = Phase.RUNNING
        if self.cancel_requested.is_set():  # cancelled while the container was being created
            self.cancel_requested.clear()
            self.cancel()
        return workload

    def _start_cold(self, spec: ContainerSpec) -> Workload:
        try:
            workload = self.runtime.start(spec)
        except (EngineError, EngineUnavailable) as exc:
            image = spec.create_kwargs.get("image")
            raise RunCrashed(f"could not start the flow run's container from {image!r}: "
                             f"{exc}") from None
        self.say(f"container {workload.name} started")
        self._record_infrastructure(workload)
        return workload

    def _take_warm(self, spec: ContainerSpec) -> Workload | None:
        """A warm container for this run, handed the run's identity; None: start cold.
        The run is recorded as its infrastructure first: a restarted worker finds it so."""
        if self.warm is None or (workload := self.warm.take(spec)) is None:
            return None
        try:
            self._record_infrastructure(workload)
            self.runtime.hand_over(workload, spec)
        except RuntimeTrouble as exc:
            log.warning("%s: warm container %s failed (%s); starting cold", self.label,
                        workload.name, exc)
            self._remove(workload)
            return None
        self.say(f"warm container {workload.name} took over the run (Prefect already loaded)")
        return workload

    def _record_infrastructure(self, workload: Workload) -> None:
        """infrastructure_pid = `<engine id>:<container id>`, as Prefect's workers do."""
        try:
            self.api.set_infrastructure_pid(
                self.flow_run.id, infrastructure_pid(self.runtime.host_id(), workload.id)
            )
        except PrefectAPIError as exc:
            log.warning("%s: could not record infrastructure_pid: %s", self.label, exc)

    def _unless_cancelled(self, work: Callable[[], T]) -> T:
        """Run `work` (a pull, a build) in a helper thread; give up on it if the run is
        cancelled meanwhile (the pull or build finishes on its own and is simply cached)."""
        result: dict[str, object] = {}

        def target() -> None:
            try:
                result["value"] = work()
            except Exception as exc:  # noqa: BLE001 - handed over to the supervisor's thread
                result["error"] = exc

        helper = threading.Thread(target=target, name=f"{threading.current_thread().name}-prep",
                                  daemon=True)
        helper.start()
        while helper.is_alive():
            helper.join(0.05)  # returns as soon as the work is done
            if self.cancel_requested.is_set():
                raise RunCancelled
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]  # type: ignore[return-value]

    def _watch(self, workload: Workload, resume: ResumePoint | None) -> Verdict:
        """Follow the container's output to its end, then judge. If the engine goes away
        meanwhile, wait for it and resume from the server's cursor."""
        options = self.options
        self.output = RunOutput(
            self.shipper,
            self.flow_run.id,
            max_bytes=options.max_log_bytes,
            echo=(lambda text: echo(self.flow_run.name, text)) if options.stream_output else None,
            skip_engine_records=options.skip_engine_records,
            mask=self.mask,
        )
        try:
            self._with_engine(lambda: self._follow(workload, resume))
            if self.output.stopped:
                raise Detached  # the worker is leaving; whoever adopts the container judges it
            self._with_engine(lambda: self.runtime.wait(workload))
            report = self._with_engine(lambda: self.runtime.read_exit(workload))
            if self._engine_trouble:  # the output stream may have ended early: catch up
                self._with_engine(lambda: self._follow(workload, None))
        except WorkloadGone:
            report = None
        if report is not None:
            self.say(f"container {workload.name} {report.describe(options.mem_limit)}; "
                     f"{self.output.close()}")
        if self.cancel_requested.is_set():
            raise RunCancelled
        state = self.api.read_flow_run(self.flow_run.id).state
        removed = (report is not None and not (state is not None and state.is_final)
                   and self.runtime.removed_meanwhile(workload))
        verdict = self._with_context(judge(report, state, cancelled=False, removed=removed,
                                           workload=workload, mem_limit=options.mem_limit))
        if options.auto_remove and report is not None and not removed:
            self._remove(workload)
        return verdict

    def _follow(self, workload: Workload, resume: ResumePoint | None) -> None:
        """Follow the output; after trouble with the engine, resume from the server's cursor."""
        assert self.output is not None
        if self._engine_trouble:
            self.shipper.flush(timeout=30)
            resume = resume_point(self.api, self.flow_run.id)
        self.runtime.follow(workload, self.output, resume)

    def _with_engine(self, call: Callable[[], T]) -> T:
        """`call`, retried while the container engine is unreachable (restarting)."""

        def note(state: object) -> None:
            self._engine_trouble = True
            log.warning("%s: Docker engine unreachable; retrying", self.label)

        retrying = Retrying(
            retry=retry_if_exception_type(EngineUnavailable),
            wait=wait_exponential_jitter(multiplier=1, max=15),
            stop=stop_after_delay(DOCKER_PATIENCE),
            before_sleep=note,
            reraise=True,
        )
        return retrying(call)

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
        return verdict

    def _remove(self, workload: Workload) -> None:
        try:
            self.runtime.remove(workload)
        except RuntimeTrouble as exc:
            log.warning("%s: could not remove container %s: %s", self.label, workload.name, exc)

    # --- reporting ----------------------------------------------------------------------
    def say(self, message: str, level: int = logging.INFO) -> None:
        """A step of this run: on the worker's console and in the run's logs (secrets masked)."""
        message = self.mask(message)
        log.log(level, "%s: %s", self.label, message)
        self.shipper.submit(log_entry(self.flow_run.id, message, level))

    def _with_context(self, verdict: Verdict) -> Verdict:
        """A crash verdict with what the container printed last (read before it is removed)."""
        if verdict.outcome is not Outcome.CRASHED or verdict.workload is None:
            return verdict
        message = verdict.message
        if context := self.runtime.crash_context(verdict.workload):
            message = f"{message}\n{context}"
        return Verdict(verdict.outcome, message, verdict.force)

    def _report_crash(self, message: str, force: bool = False) -> None:
        """End the run CRASHED with a reason, unless it already reached a final state
        (`force`: replace a CRASHED whose reason we know better)."""
        message = self.mask(f"{message[:MAX_STATE_MESSAGE]}\n(reported by dockerworker)")
        self.say(f"crashed: {message}", logging.ERROR)
        try:
            result = self.api.set_state(self.flow_run.id, StateType.CRASHED, message, force=force)
        except PrefectAPIError as exc:
            log.error("%s: could not report the crash: %s", self.label, exc)
            return
        if result.status != "ACCEPT":
            log.info("%s: crash not recorded (server said %s)", self.label, result.status)


def build_name(flow: Flow, deployment: Deployment | None) -> str:
    """What a per-deployment image is named after."""
    return f"{flow.name}-{deployment.name}" if deployment else flow.name
