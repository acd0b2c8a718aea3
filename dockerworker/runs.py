"""RunSupervisor: one flow run, from claim (or adoption) to verdict, in its own thread.

The flow itself runs under Prefect's engine inside the container, which moves the run to
Running and to its final state. The supervisor owns everything around it: the claim, the
image, the container, its output, cancellation, and the verdict when the container ends
without a final state (exit code, signal, out of memory, the last lines it printed).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

import docker
import docker.errors
import requests
from docker.models.containers import Container
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from .api import (
    Deployment,
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    StateType,
    WorkPool,
)
from .builds import Builder, BuildFailed, BuildPlan
from .containers import (
    ContainerSpec,
    WatchOptions,
    build_spec,
    crash_context,
    create_and_start,
    infrastructure_pid,
    read_exit,
    remove_quietly,
)
from .entry import CANCEL_LINE, LABEL_CONTROL, write_line
from .hostview import HostView
from .images import ImageUnavailable, ensure_image
from .jobs import InvalidJobVariables, JobVariables, merge_job_variables, resolve_job
from .logs import LogShipper, ResumePoint, RunOutput, log_entry, resume_point
from .policy import Masker
from .settings import WorkerSettings
from .warm import WarmPool, hand_over

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


def _docker_unavailable(exc: BaseException) -> bool:
    """The engine is away (restarting, socket gone), as opposed to an answer like 404."""
    if isinstance(exc, docker.errors.APIError):
        return exc.status_code is None or exc.status_code >= 500
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError))


class Phase(StrEnum):
    CLAIMING = "claiming"
    PREPARING = "preparing"  # job, image, build: no container yet
    RUNNING = "running"  # the container exists; following it
    DONE = "done"


class Cancelled(Exception):
    """The run was cancelled while the supervisor was waiting for something."""


class RunSupervisor:
    """Sees one flow run through; never raises, whatever goes wrong."""

    def __init__(
        self,
        api: PrefectAPI,
        docker_client: docker.DockerClient,
        settings: WorkerSettings,
        pool: WorkPool,
        flow_run: FlowRun,
        shipper: LogShipper,
        builder: Builder,
        on_done: Callable[[FlowRun], None] = lambda run: None,
        warm: WarmPool | None = None,
    ) -> None:
        self.api = api
        self.docker = docker_client
        self.settings = settings
        self.pool = pool
        self.flow_run = flow_run
        self.shipper = shipper
        self.builder = builder
        self.on_done = on_done
        self.warm = warm
        self.label = f"flow run {flow_run.name!r} ({flow_run.id})"
        self.phase = Phase.CLAIMING
        self.created = time.monotonic()
        self.booting = True  # claimed (or about to be), not seen RUNNING yet
        self.claimed = False
        self.container: Container | None = None
        self.output: RunOutput | None = None
        self.options = WatchOptions()
        self.cancel_requested = threading.Event()
        self._docker_trouble = False
        self.mask = Masker(settings.secrets())

    # --- entry points (each in the supervisor's own thread) ------------------------------
    def run(self) -> None:
        """A scheduled run: claim, prepare, start, watch, judge."""
        self._guard(self._run)

    def adopt(self, container: Container) -> None:
        """A container this worker started before a restart: resume watching it."""
        self.booting = False
        self.claimed = True
        self.container = container
        self.phase = Phase.RUNNING
        self.options = WatchOptions.from_labels(container.labels)
        env = dict(item.partition("=")[::2] for item in container.attrs["Config"]["Env"] or [])
        self.mask = Masker.for_env(env, self.settings.secrets())
        if container.status == "created":  # the worker died between create and start
            container.start()
        self._guard(lambda: self._watch(container, resume_point(self.api, self.flow_run.id)))

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except Cancelled:
            self._finish_cancelled()
        except Exception as exc:  # the last line of defence: one run never kills the worker
            log.exception("%s: unexpected worker error", self.label)
            if self.claimed:  # an unclaimed run is left for the next poll, untouched
                self.crash(f"dockerworker failed while running this flow run: {exc}")
        finally:
            self.phase = Phase.DONE
            self.on_done(self.flow_run)

    # --- called from the worker's loop ---------------------------------------------------
    def cancel(self) -> None:
        """The run is CANCELLING: stop what is under way (SIGTERM, then SIGKILL)."""
        if self.cancel_requested.is_set():
            return
        self.cancel_requested.set()
        self.say("cancellation requested")
        if self.container is not None:
            try:
                self._stop(self.container)
            except docker.errors.NotFound:
                pass

    def _stop(self, container: Container) -> None:
        """Prefect's engine behind our entry script is asked to cancel (it reports Cancelled
        and runs on_cancellation hooks); anything else gets SIGTERM. SIGKILL after the grace."""
        grace = self.options.stop_timeout
        if container.labels.get(LABEL_CONTROL) == "stdin":
            self.say(f"asking Prefect's engine in container {container.name} to cancel "
                     f"(SIGKILL after {grace} s)")
            try:
                write_line(container, CANCEL_LINE)
                container.wait(timeout=grace)
                return
            except docker.errors.NotFound:
                raise
            except (requests.RequestException, docker.errors.APIError) as exc:
                log.info("%s: no exit after the cancel request (%s); killing", self.label, exc)
            with contextlib.suppress(docker.errors.APIError):  # it may have ended meanwhile
                container.kill()
            return
        self.say(f"stopping container {container.name} (SIGTERM, SIGKILL after {grace} s)")
        container.stop(timeout=grace)

    def stop_following(self) -> None:
        """The worker is leaving: stop shipping output (a later worker resumes from the server)."""
        if self.output is not None:
            self.output.stop()

    # --- the steps -----------------------------------------------------------------------
    def _run(self) -> None:
        deployment = self._read_deployment()
        if deployment is None and self.flow_run.deployment_id:
            return
        if not self._claim():
            return
        self.phase = Phase.PREPARING
        job = self._resolve_job(deployment)
        if job is None:
            return
        self.options = WatchOptions.from_job(job)
        policy = self.settings.policy
        if refused := policy.violations(job, HostView(self.docker)):
            self.crash("refused by the worker's policy: " + "; ".join(refused))
            return
        trusted = policy.trusts_credentials_for(job.image)
        try:
            how = self._unless_cancelled(lambda: ensure_image(self.docker, job, trusted))
        except ImageUnavailable as exc:
            self.crash(str(exc))
            return
        self.say(f"image {job.image} {how}")
        flow = self.api.read_flow(self.flow_run.flow_id)
        name = f"{flow.name}-{deployment.name}" if deployment else flow.name
        job = self._build_dependencies(job, name)
        if job is None:
            return
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
        spec.create_kwargs = policy.harden(spec.create_kwargs)
        if self.cancel_requested.is_set():
            raise Cancelled
        container = self._take_warm(spec)
        if container is None:
            try:
                container = create_and_start(self.docker, spec)
            except docker.errors.APIError as exc:
                reason = exc.explanation or str(exc)
                self.crash(f"could not start the flow run's container from {job.image!r}: "
                           f"{reason}")
                return
            self.say(f"container {container.name} started")
            self._record_infrastructure(container)
        self.container = container
        self.phase = Phase.RUNNING
        if self.cancel_requested.is_set():  # cancelled while the container was being created
            self.cancel_requested.clear()
            self.cancel()
        self._watch(container, None)

    def _take_warm(self, spec: ContainerSpec) -> Container | None:
        """A warm container for this run, handed the run's identity; None: start cold.
        The run is recorded as its infrastructure first: a restarted worker finds it so."""
        if self.warm is None or (container := self.warm.take(spec)) is None:
            return None
        try:
            self._record_infrastructure(container)
            hand_over(container, spec)
        except docker.errors.APIError as exc:
            log.warning("%s: warm container %s failed (%s); starting cold", self.label,
                        container.name, exc)
            remove_quietly(container)
            return None
        self.say(f"warm container {container.name} took over the run (Prefect already loaded)")
        return container

    def _record_infrastructure(self, container: Container) -> None:
        """infrastructure_pid = `<docker host id>:<container id>`, as Prefect's workers do."""
        try:
            self.api.set_infrastructure_pid(
                self.flow_run.id, infrastructure_pid(self.docker, container)
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
                raise Cancelled
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]  # type: ignore[return-value]

    def _build_dependencies(self, job: JobVariables, deployment: str) -> JobVariables | None:
        """Run from the per-deployment image when the job asks for dependencies (built once,
        cached by content); EXTRA_PIP_PACKAGES is built in, not installed at run time."""
        plan = BuildPlan.from_job(job)
        if plan is None:
            return job
        self.say(f"dependencies ({plan.describe()}) on {job.image}")
        try:
            result = self._unless_cancelled(
                lambda: self.builder.ensure(job.image, plan, deployment, self._build_line,
                                            self.settings.policy.build_limits(job))
            )
        except BuildFailed as exc:
            self.crash(str(exc))
            return None
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
            self.api.set_state(self.flow_run.id, StateType.CANCELLED, message, force=True)
            return None

    def _claim(self) -> bool:
        """Propose PENDING: the server accepts exactly one proposer, so no run starts twice."""
        result = self.api.set_state(self.flow_run.id, StateType.PENDING, claim_message(self.settings.name))
        if result.status != "ACCEPT" or (result.state and result.state.type != StateType.PENDING):
            log.info(
                "%s: not claimed (server said %s%s)",
                self.label,
                result.status,
                f": {result.reason}" if result.reason else "",
            )
            return False
        self.claimed = True
        self.say(f"claimed by worker {self.settings.name}")
        return True

    def _resolve_job(self, deployment: Deployment | None) -> JobVariables | None:
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
            self.crash(str(exc))
            return None
        secrets = self.settings.secrets()
        if job.registry_credentials:
            secrets.add(job.registry_credentials.password)
        self.mask = Masker.for_env({**job.env, **self.settings.auth_env()}, secrets)
        return job

    def _watch(self, container: Container, resume: ResumePoint | None) -> None:
        """Follow the container's output to its end, then give the verdict and clean up.
        If the Docker engine goes away meanwhile, wait for it and resume from the server."""
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
            self._with_docker(lambda: self._follow(container, resume))
            if self.output.stopped:
                return  # the worker is leaving; whoever adopts the container judges it
            self._with_docker(lambda: container.wait(timeout=None))
            report = self._with_docker(lambda: read_exit(container))
            if self._docker_trouble:  # the output stream may have ended early: catch up
                self._with_docker(lambda: self._follow(container, None))
        except docker.errors.NotFound:
            self._vanished(container)
            return
        self.say(f"container {container.name} {report.describe(options.mem_limit)}; "
                 f"{self.output.close()}")
        if self.cancel_requested.is_set():
            self._finish_cancelled()
            return
        state = self.api.read_flow_run(self.flow_run.id).state
        reason = f"Flow run container {container.name} {report.describe(options.mem_limit)}"
        if (state is None or not state.is_final) and self._removed_meanwhile(container):
            self._vanished(container)
            return
        if state is None or not state.is_final:
            current = state.type.value if state else "without a state"
            self.crash(f"{reason} while the flow run was {current}.", container)
        elif state.type == StateType.CRASHED and "dockerworker" not in (state.message or ""):
            # Prefect's engine saw its flow process die, not why; Docker and the output know.
            lead = f"{reason}. " if report.oom_killed else ""
            self.crash(f"{lead}{state.message}", container, force=True)
        else:
            log.info("%s: flow run is %s", self.label, state.type.value)
        if options.auto_remove:
            remove_quietly(container)

    def _follow(self, container: Container, resume: ResumePoint | None) -> None:
        """Follow the output; after trouble with Docker, resume from the server's cursor."""
        assert self.output is not None
        if self._docker_trouble:
            self.shipper.flush(timeout=30)
            resume = resume_point(self.api, self.flow_run.id)
        self.output.follow(container, resume)

    def _with_docker(self, call: Callable[[], T]) -> T:
        """`call`, retried while the Docker engine is unreachable (restarting)."""

        def note(state: object) -> None:
            self._docker_trouble = True
            log.warning("%s: Docker engine unreachable; retrying", self.label)

        retrying = Retrying(
            retry=retry_if_exception(_docker_unavailable),
            wait=wait_exponential_jitter(multiplier=1, max=15),
            stop=stop_after_delay(DOCKER_PATIENCE),
            before_sleep=note,
            reraise=True,
        )
        return retrying(call)

    @staticmethod
    def _removed_meanwhile(container: Container) -> bool:
        """`docker rm -f` kills first and removes a moment later: tell that from a crash."""
        time.sleep(0.5)
        try:
            container.reload()
        except docker.errors.NotFound:
            return True
        return False

    def _vanished(self, container: Container) -> None:
        if self.cancel_requested.is_set():
            self._finish_cancelled()
            return
        self.crash(
            f"container vanished: {container.name} ({container.short_id}) was removed from "
            "the Docker host while the flow run was in progress"
        )

    def _finish_cancelled(self) -> None:
        """After a cancellation: CANCELLED with what happened, and the container removed."""
        container = self.container
        if container is None:
            message = "Cancelled before its container started; no container was created."
        else:
            try:
                report = read_exit(container)
                message = (f"Cancelled: container {container.name} was stopped "
                           f"({report.describe(self.options.mem_limit)}).")
            except docker.errors.NotFound:
                message = f"Cancelled: container {container.name} is gone."
            remove_quietly(container)
        self.say(message)
        state = self.api.read_flow_run(self.flow_run.id).state
        if state is None or state.type != StateType.CANCELLED:  # else the engine reported it
            self.api.set_state(self.flow_run.id, StateType.CANCELLED, message, force=True)

    # --- reporting ----------------------------------------------------------------------
    def say(self, message: str, level: int = logging.INFO) -> None:
        """A step of this run: on the worker's console and in the run's logs (secrets masked)."""
        message = self.mask(message)
        log.log(level, "%s: %s", self.label, message)
        self.shipper.submit(log_entry(self.flow_run.id, message, level))

    def crash(self, message: str, container: Container | None = None,
              force: bool = False) -> None:
        """End the run CRASHED with a reason and what the container printed last, unless it
        already reached a final state (`force`: replace a CRASHED whose reason we know better)."""
        if container is not None:
            context = crash_context(container)
            if context:
                message = f"{message}\n{context}"
        message = self.mask(f"{message[:MAX_STATE_MESSAGE]}\n(reported by dockerworker)")
        self.say(f"crashed: {message}", logging.ERROR)
        try:
            result = self.api.set_state(self.flow_run.id, StateType.CRASHED, message, force=force)
        except PrefectAPIError as exc:
            log.error("%s: could not report the crash: %s", self.label, exc)
            return
        if result.status != "ACCEPT":
            log.info("%s: crash not recorded (server said %s)", self.label, result.status)
