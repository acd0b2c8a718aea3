"""From a run's job to its started container: the job, the image, the dependencies, the
spec, and a container (a warm one handed the run, or a new one).

The slow parts (a pull, a build) run in a helper thread, so a cancellation stops the wait at
once; the pull or build finishes on its own and is simply cached for the next run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from . import metrics
from .api import Deployment, Flow, FlowRun, PrefectAPI, PrefectAPIError, WorkPool
from .builds import Builder, BuildFailed, BuildPlan, PushFailed
from .containers import ContainerSpec, build_spec
from .flowcode import run_secrets
from .images import ImageUnavailable
from .jobs import InvalidJobVariables, JobVariables, merge_job_variables, resolve_job
from .logformat import echo, run_label
from .logs import LogShipper, log_entry
from .policy import Masker
from .references import References, UnresolvedReference
from .runtime import (
    EngineError,
    EngineUnavailable,
    Runtime,
    RuntimeTrouble,
    Workload,
    infrastructure_pid,
)
from .settings import WorkerSettings
from .verdict import RunCancelled, RunCrashed
from .warm import WarmPool, handed_name

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_SECRET_BYTES = 500 * 1024  # as Swarm's limit for a secret
_PUSHED = {  # BuildResult.push -> what the run's logs say
    "pushed": "pushed image {0} to registry {1}",
    "present": "image {0} already in registry {1}, not pushed again",
    "known": "image {0} pushed to registry {1} before, not pushed again",
}


class Preparation:
    """The preparing steps of one run; each raises the run's verdict when it cannot go on."""

    def __init__(
        self,
        api: PrefectAPI,
        runtime: Runtime,
        builder: Builder,
        settings: WorkerSettings,
        flow_run: FlowRun,
        shipper: LogShipper,
        warm: WarmPool | None,
        say: Callable[[str], None],
        mask: Callable[[str], str],
        cancelled: threading.Event,
        read_pool: Callable[[str], WorkPool] | None = None,
        on_unrecorded: Callable[[], None] = lambda: None,
    ) -> None:
        """`read_pool`: the pool by name (the worker's short-lived copy; default: ask);
        `on_unrecorded`: the server did not take the infrastructure_pid (the worker's
        reconciliation takes it from here)."""
        self.api = api
        self.read_pool = read_pool or (lambda name: self.api.read_work_pool(name))
        self.runtime = runtime
        self.builder = builder
        self.settings = settings
        self.flow_run = flow_run
        self.shipper = shipper
        self.warm = warm
        self.unrecorded: Workload | None = None  # the container the server has not recorded
        self.on_unrecorded = on_unrecorded
        self.say = say
        self.mask = mask
        self.cancelled = cancelled
        self.label = run_label(flow_run.name, flow_run.id)

    def resolve_job(self, pool_name: str, deployment: Deployment | None
                    ) -> tuple[WorkPool, JobVariables, Masker]:
        """The pool's template as it is now (an operator's edit counts within seconds:
        cache.py) ⊕ the deployment's and the run's values; and the masker for the job's
        secrets."""
        pool = self.read_pool(pool_name)
        values = merge_job_variables(
            deployment.job_variables if deployment else None, self.flow_run.job_variables
        )
        raw_env = values.get("env") if isinstance(values.get("env"), dict) else {}
        early = Masker.for_env(
            {str(k): v for k, v in raw_env.items() if isinstance(v, str)}, self.settings.secrets()
        )
        references = References(self.api)
        try:
            job = resolve_job(pool.base_job_template, values, references.resolve)
        except (InvalidJobVariables, UnresolvedReference) as exc:
            raise RunCrashed(early(str(exc)), reason="invalid") from None
        if job.infra_retries is None:  # the operator's default
            job = job.model_copy(update={"infra_retries": self.settings.policy.infra_retries})
        if job.secrets and self.settings.runtime == "swarm" and not job.auto_remove:
            # Swarm keeps a secret while any service refers to it, and updating a job's
            # service would run it again: the job goes once it ends, and its secrets with it
            job = job.model_copy(update={"auto_remove": True})
            self.say("a Swarm job given secrets is removed when it ends (with its secrets)")
        secrets = (self.settings.secrets() | references.secrets
                   | run_secrets(self.api, deployment, job.env))
        if job.registry_credentials:
            secrets.add(job.registry_credentials.password)
        return pool, job, Masker.for_env({**job.env, **self.settings.auth_env()}, secrets)

    def read_secrets(self, job: JobVariables) -> dict[str, bytes]:
        """The job's secrets (the policy allowed them) from the worker's secrets directory,
        read now: a rotated file counts from the next run. Refused before any container
        when one cannot be read, or the job runs its own command (only the entry script
        receives them)."""
        if not job.secrets:
            return {}
        if job.command is not None:
            raise RunCrashed("secrets: a job with its own `command` cannot receive secrets "
                             "(dockerworker's entry script writes them to /run/secrets)",
                             reason="invalid")
        found: dict[str, bytes] = {}
        for name in job.secrets:
            path = self.settings.secrets_dir / name
            try:
                if path.stat().st_size > MAX_SECRET_BYTES:
                    raise RunCrashed(f"secrets: {path} is larger than {MAX_SECRET_BYTES} "
                                     "bytes", reason="invalid")
                found[name] = path.read_bytes()
            except OSError as exc:
                raise RunCrashed(f"secrets: cannot read {name!r} from the worker's secrets "
                                 f"directory ({path}: {exc.strerror or exc})",
                                 reason="invalid") from None
            if found[name].decode("utf-8", errors="replace").strip() in self.settings.secrets():
                raise RunCrashed(
                    f"secrets: {name!r} holds one of the worker's own credentials (its API "
                    "key or auth string, or an index token): the worker never gives those to "
                    "a flow; narrow the policy's allowed_secrets so it cannot match them",
                    reason="invalid")
        return found

    def ensure_image(self, job: JobVariables) -> JobVariables:
        """The job's image on the engine, by its pull policy."""
        trusted = self.settings.policy.trusts_credentials_for(job.image)
        started = time.monotonic()
        try:
            how = self._unless_cancelled(lambda: self.runtime.ensure_image(job, trusted))
        except ImageUnavailable as exc:
            metrics.PULLS.labels("failed").inc()
            raise RunCrashed(str(exc), infrastructure=exc.transient, reason="image") from None
        pulled = how == "pulled"
        metrics.PULLS.labels("pulled" if pulled else "present").inc()
        if pulled:
            metrics.PULL_SECONDS.observe(time.monotonic() - started)
        self.say(f"image {job.image} {how}")
        return job

    def build_dependencies(self, job: JobVariables, deployment: str) -> JobVariables:
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
        except PushFailed as exc:
            metrics.BUILDS.labels("failed").inc()
            raise RunCrashed(str(exc), infrastructure=exc.transient, reason="push") from None
        except BuildFailed as exc:
            metrics.BUILDS.labels("failed").inc()
            raise RunCrashed(str(exc), infrastructure=exc.transient, reason="build") from None
        metrics.BUILDS.labels("built" if result.built else "cached").inc()
        if result.built:
            metrics.BUILD_SECONDS.observe(result.seconds)
            self.say(f"built image {result.tag} in {result.seconds:.0f} s")
        else:
            self.say(f"image {result.tag} cached, no build")
        if result.push:
            self.say(_PUSHED[result.push].format(result.reference, self.settings.build_push))
        env = {k: v for k, v in job.env.items() if k != "EXTRA_PIP_PACKAGES"}
        return job.model_copy(update={"image": result.reference, "env": env})

    def container_spec(self, job: JobVariables, deployment: Deployment | None, flow: Flow,
                       pool: WorkPool, secrets: dict[str, bytes] | None = None
                       ) -> ContainerSpec:
        """The container for the run, hardened by the worker's policy; `secrets` are
        written to it once it runs."""
        spec = build_spec(
            job,
            flow_run=self.flow_run,
            deployment=deployment,
            flow=flow,
            pool=pool,
            worker_name=self.settings.name,
            api_url=self.settings.api_url,
            auth_env=self.settings.auth_env(),
        )
        spec.create_kwargs = self.settings.policy.harden(spec.create_kwargs)
        spec.secret_files = secrets or {}
        return spec

    def launch(self, spec: ContainerSpec) -> Workload:
        """A warm container handed the run, or a new one."""
        if (workload := self._take_warm(spec)) is not None:
            metrics.RUNS_STARTED.labels("warm").inc()
            metrics.WARM_HANDOVERS.inc()
            return workload
        if self.warm is not None:
            metrics.WARM_MISSES.inc()
        workload = self._start_cold(spec)
        metrics.RUNS_STARTED.labels("cold").inc()
        return workload

    def _start_cold(self, spec: ContainerSpec) -> Workload:
        try:
            workload = self.runtime.start(spec)
        except (EngineError, EngineUnavailable) as exc:
            image = spec.create_kwargs.get("image")
            raise RunCrashed(f"could not start the flow run's container from {image!r}: "
                             f"{exc}", infrastructure=isinstance(exc, EngineUnavailable),
                             reason="start") from None
        self.say(f"container {workload.name} started")
        self._record_infrastructure(workload)
        return workload

    def _take_warm(self, spec: ContainerSpec) -> Workload | None:
        """A warm container for this run, handed the run's identity; None: start cold.
        The run is recorded as its infrastructure first: a restarted worker finds it so.
        The pool holds it until the supervisor does (`WarmPool.handed`, runs.py)."""
        if self.warm is None or (workload := self.warm.take(spec)) is None:
            return None
        try:
            self._record_infrastructure(workload)
            self.runtime.hand_over(workload, replace(
                spec, name=handed_name(spec.name, self.flow_run.id)))
        except RuntimeTrouble as exc:
            log.warning("%s: warm container %s failed (%s); starting cold", self.label,
                        workload.name, exc)
            with contextlib.suppress(RuntimeTrouble):
                self.runtime.remove(workload)
            self.warm.handed(workload)
            return None
        except BaseException:
            self.warm.handed(workload)  # left to recovery, as any container nobody holds
            raise
        self.say(f"warm container {workload.name} took over the run (Prefect already loaded)")
        return workload

    def _record_infrastructure(self, workload: Workload) -> None:
        """infrastructure_pid = `<engine id>:<container id>`, as Prefect's workers do."""
        self.unrecorded = workload
        self.record_infrastructure()
        if self.unrecorded is not None:
            self.on_unrecorded()

    def record_infrastructure(self, patience: float | None = None) -> None:
        """Record the container as the run's infrastructure, if the server has not taken it
        yet: the worker's reconciliation tries again until it has. Recovery needs it: a
        restarted worker finds a warm container's run only by it, and a claim without it
        looks abandoned once its worker is gone."""
        workload = self.unrecorded
        if workload is None:
            return
        try:
            self.api.set_infrastructure_pid(
                self.flow_run.id, infrastructure_pid(self.runtime.host_id(), workload.id),
                patience=patience,
            )
        except PrefectAPIError as exc:
            log.warning("%s: could not record infrastructure_pid (tried again at the next "
                        "reconciliation): %s", self.label, exc)
            return
        if self.unrecorded is workload:
            self.unrecorded = None

    def _build_line(self, line: str) -> None:
        line = self.mask(line)
        if not self.cancelled.is_set():
            echo(f"{self.flow_run.name} [build]", line, str(self.flow_run.id))
            self.shipper.submit(log_entry(self.flow_run.id, line, name="dockerworker.build"))

    def _unless_cancelled(self, work: Callable[[], T]) -> T:
        """Run `work` (a pull, a build) in a helper thread; give up on it if the run is
        cancelled meanwhile."""
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
            if self.cancelled.is_set():
                raise RunCancelled
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]  # type: ignore[return-value]


def secret_texts(files: dict[str, bytes]) -> set[str]:
    """What to mask of a run's secret files: each value as text, and each longer line of it
    (a key printed line by line)."""
    found = set()
    for value in files.values():
        text = value.decode("utf-8", errors="replace").strip()
        found.add(text)
        found.update(line.strip() for line in text.splitlines() if len(line.strip()) >= 8)
    return found - {""}


def build_name(flow: Flow, deployment: Deployment | None) -> str:
    """What a per-deployment image is named after."""
    return f"{flow.name}-{deployment.name}" if deployment else flow.name
