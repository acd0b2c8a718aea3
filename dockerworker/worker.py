"""The worker loop: wait for the server, ensure the pool, adopt, heartbeat, poll, claim,
cancel, reconcile, and stop gracefully.

Each run gets a RunSupervisor thread; `--limit` bounds how many are in flight (adopted runs
count), and a slot is freed the moment its supervisor ends (a rejected claim ends it at once).
`--max-starting` bounds how many are starting (claimed, not yet RUNNING): a container booting
Prefect is CPU-heavy, and a burst booted all at once reaches RUNNING later for every run.
Runs over the bound stay SCHEDULED, for this worker's next poll or another replica.
A worker only ever touches containers of its own pool on its own Docker engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID

import docker
import docker.errors
import requests
from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from .api import (
    AuthRejected,
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    ServerUnreachable,
    StateType,
    WorkPool,
)
from .builds import Builder
from .containers import (
    LABEL_FLOW_RUN_ID,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_WORKER,
    WatchOptions,
    docker_host_id,
    remove_quietly,
)
from .events import RUNNING_EVENT, EventListener
from .jobs import default_base_job_template
from .logs import LogShipper
from .runs import Phase, RunSupervisor, claim_message
from .settings import WorkerSettings
from .warm import LABEL_WARM, WarmPool, is_waiting, listed_name

log = logging.getLogger(__name__)
LOOP_PATIENCE = 2.0  # the loop's own calls retry briefly; the next round tries again anyway
CANCEL_CHECK_SECONDS = 2.0
CANCEL_CHECK_WITH_EVENTS = 15.0  # the event stream reports Cancelling at once; this is a net
RECONCILE_SECONDS = 60.0
BOOT_PATIENCE = 120.0  # a run stops counting as starting after this long, RUNNING or not


class Worker:
    def __init__(
        self, settings: WorkerSettings, api: PrefectAPI, docker_client: docker.DockerClient
    ) -> None:
        self.settings = settings
        self.api = api
        self.docker = docker_client
        self.stop_event = threading.Event()
        self.pool: WorkPool | None = None
        self.shipper = LogShipper(api)
        self.builder = Builder(docker_client, settings.build_options(), holder=settings.name)
        self.last_poll: float | None = None  # monotonic time of the last successful poll
        self._supervisors: dict[UUID, RunSupervisor] = {}
        self._threads: dict[UUID, threading.Thread] = {}
        self._lock = threading.Lock()
        self._host_id: str | None = None
        self._nudged = threading.Event()  # set by the event stream, or to stop: act now
        self.events: EventListener | None = None
        self.warm = WarmPool(docker_client, settings.warm) if settings.warm else None

    # --- start-up -----------------------------------------------------------------------
    def wait_for_server(self) -> None:
        """Keep trying until the server answers and accepts us; say clearly what is wrong."""

        def explain(state) -> None:  # tenacity's before_sleep hook
            log.warning(
                "%s; retrying in %.0fs", state.outcome.exception(), state.next_action.sleep
            )

        for attempt in Retrying(
            retry=retry_if_exception_type((ServerUnreachable, AuthRejected)),
            wait=wait_exponential_jitter(multiplier=1, max=10),
            before_sleep=explain,
            reraise=True,
        ):
            with attempt:
                if self.stop_event.is_set():
                    return
                self.api.health(patience=0)
                try:  # /health needs no credentials; a protected read proves the key works
                    self.api.read_work_pool(self.settings.pool, patience=0)
                except NotFound:
                    pass
        log.info("Prefect server at %s is up", self.settings.api_url)

    def ensure_pool(self) -> WorkPool:
        """Use the pool as it is; create it (type docker, our template) when it is missing."""
        try:
            pool = self.api.read_work_pool(self.settings.pool)
        except NotFound:
            try:
                pool = self.api.create_work_pool(
                    self.settings.pool, "docker", default_base_job_template()
                )
                log.info("created work pool %r (type docker)", pool.name)
            except PrefectAPIError:  # another replica may have created it meanwhile
                pool = self.api.read_work_pool(self.settings.pool)
        if pool.type != "docker":
            log.warning(
                "work pool %r is of type %r, not docker; its template is used as it is",
                pool.name,
                pool.type,
            )
        return pool

    # --- loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.shipper.start()
        try:
            return self._loop()
        finally:
            self._leave()

    def _loop(self) -> int:
        self.wait_for_server()
        if self.stop_event.is_set():
            return 0
        self.pool = self.ensure_pool()
        self._host_id = docker_host_id(self.docker)
        if stale := self.builder.release_locks():
            log.info("removed %d build locks left from this worker's previous run", stale)
        self.adopt()
        self.events = EventListener(
            self.settings.api_url, self.settings.pool, self.settings.stream_token(),
            self.settings.auth_headers(), self._on_event, self.stop_event,
        ).start()
        log.info(
            "worker %s polling pool %r%s every %.1fs (limit %s, starting at once %s%s)",
            self.settings.name,
            self.pool.name,
            f" queues {self.settings.work_queues}" if self.settings.work_queues else "",
            self.settings.poll_interval,
            self.settings.limit or "none",
            self.settings.max_starting or "any",
            f", {self.settings.warm} warm" if self.settings.warm else "",
        )
        due = {"heartbeat": 0.0, "poll": 0.0, "cancel": 0.0, "reconcile": 0.0}
        rounds: dict[str, tuple[Callable[[], float], Callable[[], None]]] = {
            "heartbeat": (lambda: self.settings.heartbeat_interval, self._heartbeat),
            "poll": (lambda: self.settings.poll_interval, self.poll),
            "cancel": (self._cancel_check_interval, self.check_cancellations),
            "reconcile": (lambda: RECONCILE_SECONDS, self.reconcile),
        }
        while not self.stop_event.is_set():
            for name, (interval, action) in rounds.items():
                if time.monotonic() >= due[name]:
                    try:
                        action()
                    except (requests.RequestException, docker.errors.DockerException) as exc:
                        log.warning("%s: Docker engine trouble: %s", name, exc)
                    due[name] = time.monotonic() + interval()
            if self.settings.run_once:
                self.wait_for_runs()
                return 0
            self._nudged.wait(max(0.05, min(due.values()) - time.monotonic()))
            if self._nudged.is_set():
                self._nudged.clear()
                due["poll"] = due["cancel"] = 0.0
        return 0

    def _cancel_check_interval(self) -> float:
        """Check often only when the event stream is not there to report Cancelling (and
        Running, for start slots) as it happens."""
        if self.events is not None and self.events.connected.is_set():
            return CANCEL_CHECK_WITH_EVENTS
        return CANCEL_CHECK_SECONDS

    def _on_event(self, name: str, resource_id: str) -> None:
        """A flow run of this pool was scheduled or is cancelling: poll and check now.
        One of ours is running: it frees a start slot."""
        log.debug("event %s of %s", name, resource_id)
        if name == RUNNING_EVENT:
            try:
                self._seen_running(UUID(resource_id.removeprefix("prefect.flow-run.")))
            except ValueError:
                pass
            return
        self._nudged.set()

    def stop(self) -> None:
        """Stop claiming (from a signal handler): the loop ends at once."""
        self.stop_event.set()
        self._nudged.set()

    def _heartbeat(self) -> None:
        try:
            self.api.heartbeat(
                self.settings.pool,
                self.settings.name,
                self.settings.heartbeat_interval,
                patience=LOOP_PATIENCE,
            )
            self.pool = self.api.read_work_pool(self.settings.pool, patience=LOOP_PATIENCE)
        except NotFound:
            log.warning("work pool %r is gone; creating it again", self.settings.pool)
            self.pool = self.ensure_pool()
        except PrefectAPIError as exc:
            log.warning("heartbeat failed: %s", exc)

    def poll(self) -> None:
        """Ask for what is due (now + prefetch) and start a supervisor per run, within --limit."""
        free = self.free_slots()
        if free is not None and free <= 0:
            self.last_poll = time.monotonic()  # full, not stuck: healthy, nothing to ask for
            return
        before = datetime.now(UTC) + timedelta(seconds=self.settings.prefetch_seconds)
        try:
            runs = self.api.get_scheduled_flow_runs(
                self.settings.pool, before, free, self.settings.work_queues,
                patience=LOOP_PATIENCE,
            )
        except NotFound:
            log.warning("work pool %r not found; it is created again at the next heartbeat",
                        self.settings.pool)
            return
        except PrefectAPIError as exc:
            log.warning("poll failed: %s", exc)
            return
        self.last_poll = time.monotonic()
        for flow_run in runs:
            self._start(flow_run, lambda supervisor: supervisor.run())

    def free_slots(self) -> int | None:
        """How many more runs to take now: within --limit and --max-starting (None: any)."""
        bounds = []
        with self._lock:
            if self.settings.limit is not None:
                bounds.append(self.settings.limit - len(self._threads))
            if self.settings.max_starting and not self.settings.run_once:
                bounds.append(self.settings.max_starting - len(self._booting()))
        return min(bounds) if bounds else None

    def _booting(self) -> list[RunSupervisor]:
        """Supervisors whose run has not been seen RUNNING yet (within BOOT_PATIENCE)."""
        now = time.monotonic()
        return [s for s in self._supervisors.values()
                if s.booting and now - s.created < BOOT_PATIENCE]

    def _seen_running(self, run_id: UUID) -> None:
        """The run reached RUNNING: it no longer counts as starting; take the next one."""
        supervisor = self._supervisors.get(run_id)
        if supervisor is not None and supervisor.booting:
            supervisor.booting = False
            if self.settings.max_starting:
                self._nudged.set()

    def _start(self, flow_run: FlowRun, body: Callable[[RunSupervisor], None]) -> bool:
        assert self.pool is not None
        with self._lock:
            if flow_run.id in self._threads:
                return False
            if self.settings.limit is not None and len(self._threads) >= self.settings.limit:
                return False
            supervisor = RunSupervisor(
                self.api, self.docker, self.settings, self.pool, flow_run, self.shipper,
                self.builder, on_done=self._done, warm=self.warm,
            )
            thread = threading.Thread(
                target=body, args=(supervisor,), name=f"run-{flow_run.id.hex[:8]}", daemon=True
            )
            self._supervisors[flow_run.id] = supervisor
            self._threads[flow_run.id] = thread
        thread.start()
        return True

    def _done(self, flow_run: FlowRun) -> None:
        with self._lock:
            self._threads.pop(flow_run.id, None)
            self._supervisors.pop(flow_run.id, None)

    def active_runs(self) -> list[RunSupervisor]:
        with self._lock:
            return list(self._supervisors.values())

    # --- cancellation -------------------------------------------------------------------
    def check_cancellations(self) -> None:
        """Runs of ours moved to CANCELLING (UI or API): stop them, in a thread each.
        Without the event stream, also look for starting runs that are RUNNING now."""
        supervisors = {s.flow_run.id: s for s in self.active_runs()}
        if not supervisors:
            return
        booting = [s.flow_run.id for s in supervisors.values() if s.booting]
        if booting and self.settings.max_starting and not (
            self.events is not None and self.events.connected.is_set()
        ):
            try:
                for flow_run in self.api.filter_flow_runs(
                    self.settings.pool, [StateType.RUNNING], ids=booting, patience=LOOP_PATIENCE
                ):
                    self._seen_running(flow_run.id)
            except PrefectAPIError as exc:
                log.warning("checking for started runs failed: %s", exc)
        try:
            cancelling = self.api.filter_flow_runs(
                self.settings.pool, [StateType.CANCELLING], ids=list(supervisors),
                patience=LOOP_PATIENCE,
            )
        except PrefectAPIError as exc:
            log.warning("checking for cancellations failed: %s", exc)
            return
        for flow_run in cancelling:
            supervisor = supervisors.get(flow_run.id)
            if supervisor is not None and not supervisor.cancel_requested.is_set():
                threading.Thread(target=supervisor.cancel, daemon=True).start()

    # --- restarts: adoption and reconciliation ------------------------------------------
    def _pool_containers(self, **filters: str) -> list:
        labels = [f"{LABEL_POOL}={self.settings.pool}", f"{LABEL_MANAGED}=true"]
        labels += [f"{k}={v}" for k, v in filters.items()]
        # sparse (labels in attrs["Labels"]): no inspect per container, which would race
        # with removals by other replicas
        return self.docker.containers.list(all=True, sparse=True, filters={"label": labels})

    def adopt(self) -> None:
        """Take back the containers this worker started before it restarted (same name);
        remove its warm containers that were still waiting for a run."""
        containers = self._pool_containers(**{LABEL_WORKER: self.settings.name})
        handed_over: dict[str, FlowRun] | None = None
        for container in containers:
            labels = container.attrs["Labels"]
            if LABEL_WARM in labels and is_waiting(container):
                remove_quietly(container)
                continue
            if LABEL_FLOW_RUN_ID in labels:
                run_id = UUID(labels[LABEL_FLOW_RUN_ID])
                try:
                    flow_run = self.api.read_flow_run(run_id)
                except NotFound:
                    log.info("container %s serves a deleted flow run; removing it",
                             listed_name(container))
                    remove_quietly(container)
                    continue
            else:  # a warm container: its run names it as infrastructure
                if handed_over is None:
                    handed_over = self._runs_by_container()
                if (found := handed_over.get(container.id)) is None:
                    continue  # its run is over (or gone): nothing to watch
                flow_run = found
            if flow_run.id in self._threads:
                continue
            if flow_run.state is not None and flow_run.state.is_final and (
                container.status != "running"
            ):
                if WatchOptions.from_labels(labels).auto_remove:
                    remove_quietly(container)
                continue
            try:
                container.reload()  # the full attributes (env, config) for the supervisor
            except docker.errors.NotFound:
                continue
            log.info("adopting container %s of flow run %r (%s)", container.name,
                     flow_run.name, container.status)
            self._start(flow_run, lambda supervisor, c=container: supervisor.adopt(c))

    def _runs_by_container(self) -> dict[str, FlowRun]:
        """Unfinished runs of this pool on this engine, by their container's id."""
        states = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
        found = {}
        for flow_run in self.api.filter_flow_runs(self.settings.pool, states):
            host, _, container_id = (flow_run.infrastructure_pid or "").rpartition(":")
            if host == self._host_id:
                found[container_id] = flow_run
        return found

    def reconcile(self) -> None:
        """Runs of this pool whose container on this engine vanished → CRASHED; exited
        containers of final runs that asked for auto_remove → removed."""
        try:
            runs = self.api.filter_flow_runs(
                self.settings.pool, [StateType.PENDING, StateType.RUNNING],
                patience=LOOP_PATIENCE,
            )
        except PrefectAPIError as exc:
            log.warning("reconciliation failed: %s", exc)
            return
        mine = set(self._threads)
        for flow_run in runs:
            if flow_run.id in mine:
                continue
            if not flow_run.infrastructure_pid:
                self._reschedule_if_abandoned(flow_run)
                continue
            host, _, container_id = flow_run.infrastructure_pid.rpartition(":")
            if host != self._host_id:
                continue
            try:
                self.docker.containers.get(container_id)
            except docker.errors.NotFound:
                message = (f"container vanished: {container_id[:12]} no longer exists on the "
                           "Docker host (reported by dockerworker's reconciliation)")
                log.warning("flow run %r (%s): %s", flow_run.name, flow_run.id, message)
                self.api.set_state(flow_run.id, StateType.CRASHED, message)
        if self.warm is not None:
            self.warm.expire()
        for container in self._pool_containers(**{"io.dockerworker.auto-remove": "true"}):
            if container.status not in ("exited", "dead"):
                continue
            if LABEL_FLOW_RUN_ID not in container.attrs["Labels"]:
                continue  # a warm container: removed by its run, or by adoption
            run_id = UUID(container.attrs["Labels"][LABEL_FLOW_RUN_ID])
            if run_id in mine:
                continue
            try:
                state = self.api.read_flow_run(run_id).state
            except NotFound:
                state = None
            if state is None or state.is_final:
                remove_quietly(container)

    def _reschedule_if_abandoned(self, flow_run: FlowRun) -> None:
        """A run this worker claimed before it restarted, without a container yet: give it
        back to the pool (any container it got would have been adopted already)."""
        state = flow_run.state
        if state is None or state.type != StateType.PENDING:
            return
        if state.message != claim_message(self.settings.name):
            return
        if self._pool_containers(**{LABEL_FLOW_RUN_ID: str(flow_run.id)}):
            return
        log.warning("flow run %r (%s) was claimed before a restart and never got a "
                    "container; rescheduling it", flow_run.name, flow_run.id)
        self.api.set_state(
            flow_run.id, StateType.SCHEDULED,
            f"rescheduled: dockerworker {self.settings.name} restarted before starting its "
            "container", force=True,
        )

    # --- stopping -----------------------------------------------------------------------
    def wait_for_runs(self, phases: tuple[Phase, ...] | None = None) -> None:
        """Block until no supervisor is in `phases` (default: until all have finished)."""
        while True:
            waiting = [s for s in self.active_runs() if phases is None or s.phase in phases]
            if not waiting:
                return
            time.sleep(0.2)

    def _leave(self) -> None:
        """Graceful stop: claims in flight get their containers; running containers keep
        running (the next worker adopts them); with --drain, wait for every run; flush logs."""
        if self.settings.drain:
            log.info("draining: waiting for %d runs to finish", len(self.active_runs()))
            self.wait_for_runs()
        else:
            self.wait_for_runs((Phase.CLAIMING, Phase.PREPARING))
            for supervisor in self.active_runs():
                supervisor.stop_following()
        if self.warm is not None:
            self.warm.close()
        try:
            self.builder.release_locks()  # builds abandoned by cancelled runs
        except (requests.RequestException, docker.errors.DockerException) as exc:
            log.warning("could not release build locks: %s", exc)
        self.shipper.stop(timeout=30)
