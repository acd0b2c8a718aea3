"""RunSupervisor: one claimed flow run, from claim to verdict, in its own thread.

The flow itself runs under Prefect's engine inside the container, which moves the run to
Running and to its final state. The supervisor owns everything around it, and when the
container ends without a final state it says why: exit code, signal, out of memory, and the
last lines the container printed.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

import docker
import docker.errors
from docker.models.containers import Container

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
    build_spec,
    crash_context,
    create_and_start,
    infrastructure_pid,
    read_exit,
    remove_quietly,
)
from .images import ImageUnavailable, ensure_image
from .jobs import InvalidJobVariables, JobVariables, merge_job_variables, resolve_job
from .logs import LogShipper, RunOutput, log_entry
from .settings import WorkerSettings

log = logging.getLogger(__name__)
_console_lock = threading.Lock()
MAX_STATE_MESSAGE = 2000


def echo(prefix: str, line: str) -> None:
    """A container's line on the worker's console, prefixed with its flow run's name."""
    with _console_lock:
        sys.stdout.write(f"{prefix} | {line}\n")
        sys.stdout.flush()


class RunSupervisor:
    """Claims one flow run and sees it through; never raises, whatever goes wrong."""

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
    ) -> None:
        self.api = api
        self.shipper = shipper
        self.builder = builder
        self.docker = docker_client
        self.settings = settings
        self.pool = pool
        self.flow_run = flow_run
        self.on_done = on_done
        self.label = f"flow run {flow_run.name!r} ({flow_run.id})"
        self.claimed = False

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the last line of defence: one run never kills the worker
            log.exception("%s: unexpected worker error", self.label)
            if self.claimed:  # an unclaimed run is left for the next poll, untouched
                self.crash(f"dockerworker failed while running this flow run: {exc}")
        finally:
            self.on_done(self.flow_run)

    # --- steps --------------------------------------------------------------------------
    def _run(self) -> None:
        deployment = self._read_deployment()
        if deployment is None and self.flow_run.deployment_id:
            return
        if not self._claim():
            return
        job = self._resolve_job(deployment)
        if job is None:
            return
        try:
            how = ensure_image(self.docker, job)
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
        try:
            container = create_and_start(self.docker, spec)
        except docker.errors.APIError as exc:
            reason = exc.explanation or str(exc)
            self.crash(f"could not start the flow run's container from {job.image!r}: {reason}")
            return
        self.say(f"container {container.name} started")
        try:
            self.api.set_infrastructure_pid(
                self.flow_run.id, infrastructure_pid(self.docker, container)
            )
        except PrefectAPIError as exc:
            log.warning("%s: could not record infrastructure_pid: %s", self.label, exc)
        self._watch(container, job)

    def _build_dependencies(self, job: JobVariables, deployment: str) -> JobVariables | None:
        """Run from the per-deployment image when the job asks for dependencies (built once,
        cached by content); EXTRA_PIP_PACKAGES is built in, not installed at run time."""
        plan = BuildPlan.from_job(job)
        if plan is None:
            return job
        self.say(f"dependencies ({plan.describe()}) on {job.image}")
        try:
            result = self.builder.ensure(job.image, plan, deployment, self._build_line)
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
        result = self.api.set_state(self.flow_run.id, StateType.PENDING)
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
        values = merge_job_variables(
            deployment.job_variables if deployment else None, self.flow_run.job_variables
        )
        try:
            return resolve_job(self.pool.base_job_template, values)
        except InvalidJobVariables as exc:
            self.crash(str(exc))
            return None

    def _watch(self, container: Container, job: JobVariables) -> None:
        """Follow the container's output to its end, then give the verdict and clean up."""
        to_api = job.env.get("PREFECT_LOGGING_TO_API_ENABLED") or "true"
        output = RunOutput(
            self.shipper,
            self.flow_run.id,
            max_bytes=job.max_log_bytes,
            echo=(lambda text: echo(self.flow_run.name, text)) if job.stream_output else None,
            skip_engine_records=to_api.lower() not in ("false", "0", "no"),
        )
        output.follow(container)
        container.wait(timeout=None)
        report = read_exit(container)
        self.say(f"container {container.name} {report.describe(job.mem_limit)}; "
                 f"{output.close()}")
        state = self.api.read_flow_run(self.flow_run.id).state
        reason = f"Flow run container {container.name} {report.describe(job.mem_limit)}"
        if state is None or not state.is_final:
            current = state.type.value if state else "without a state"
            self.crash(f"{reason} while the flow run was {current}.", container)
        elif state.type == StateType.CRASHED:
            # Prefect's engine saw its flow process die, not why; Docker and the output know.
            lead = f"{reason}. " if report.oom_killed else ""
            self.crash(f"{lead}{state.message}", container, force=True)
        else:
            log.info("%s: flow run is %s", self.label, state.type.value)
        if job.auto_remove:
            remove_quietly(container)

    # --- reporting ----------------------------------------------------------------------
    def say(self, message: str, level: int = logging.INFO) -> None:
        """A step of this run: on the worker's console and in the run's logs."""
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
        message = message[:MAX_STATE_MESSAGE]
        self.say(f"crashed: {message}", logging.ERROR)
        try:
            result = self.api.set_state(self.flow_run.id, StateType.CRASHED, message, force=force)
        except PrefectAPIError as exc:
            log.error("%s: could not report the crash: %s", self.label, exc)
            return
        if result.status != "ACCEPT":
            log.info("%s: crash not recorded (server said %s)", self.label, result.status)
