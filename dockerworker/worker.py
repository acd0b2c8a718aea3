"""The worker loop: wait for the server, ensure the pool, adopt, heartbeat, poll, claim,
cancel, reconcile, and stop gracefully.

Each run gets a RunSupervisor thread, admitted by `Admission` (admission.py: `--limit`,
`--max-starting`, the runs still starting); a slot is freed the moment its supervisor ends.
Runs over the bound stay SCHEDULED, for this worker's next poll or another replica.
Adoption and reconciliation after a restart are recovery.py's; the container engine is behind
the runtime seam (runtime.py). A worker only ever touches containers of its own pool on its
own engine.
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

from .admission import Admission
from .api import (
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    StateType,
    WorkPool,
)
from .builds import Builder
from .events import RUNNING_EVENT, EventListener
from .logs import LogShipper
from .recovery import LOOP_PATIENCE, Recovery
from .runs import Phase, RunSupervisor
from .runtime import LocalEngine, Runtime, RuntimeTrouble, Workload
from .server import ensure_pool, wait_for_server
from .settings import WorkerSettings
from .warm import WarmPool

log = logging.getLogger(__name__)
CANCEL_CHECK_SECONDS = 2.0
CANCEL_CHECK_WITH_EVENTS = 15.0  # the event stream reports Cancelling at once; this is a net
RECONCILE_SECONDS = 60.0


class Worker:
    """One worker of one pool: the loop, and the supervisors it admits."""

    def __init__(
        self,
        settings: WorkerSettings,
        api: PrefectAPI,
        docker_client: docker.DockerClient | None = None,
        *,
        runtime: Runtime | None = None,
        builder: Builder | None = None,
    ) -> None:
        """`docker_client` for the machine's engine; tests pass a `runtime` (and `builder`)."""
        self.settings = settings
        self.api = api
        if runtime is None:
            assert docker_client is not None, "a Docker client or a runtime"
            runtime = LocalEngine(docker_client)
        self.runtime = runtime
        self.stop_event = threading.Event()
        self.pool: WorkPool | None = None
        self.shipper = LogShipper(api)
        self.builder = builder or Builder(docker_client, settings.build_options(),
                                          holder=settings.name)
        self.last_poll: float | None = None  # monotonic time of the last successful poll
        self.admission: Admission[RunSupervisor] = Admission(
            settings.limit, 0 if settings.run_once else settings.max_starting)
        self.recovery: Recovery | None = None
        self._nudged = threading.Event()  # set by the event stream, or to stop: act now
        self.events: EventListener | None = None
        self.warm = WarmPool(runtime, settings.warm) if settings.warm else None

    # --- start-up -----------------------------------------------------------------------
    def wait_for_server(self) -> None:
        """Keep trying until the server answers and accepts us (server.py)."""
        wait_for_server(self.api, self.settings.pool, self.settings.api_url, self.stop_event)

    def ensure_pool(self) -> WorkPool:
        """Use the pool as it is; create it (type docker, our template) when it is missing."""
        return ensure_pool(self.api, self.settings.pool)

    # --- loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.shipper.start()
        try:
            return self._loop()
        finally:
            self._leave()

    def start_up(self) -> None:
        """The pool, the engine's identity, stale build locks, and this worker's containers
        from before a restart."""
        self.pool = self.ensure_pool()
        self.recovery = Recovery(self.api, self.runtime, self.settings.pool, self.settings.name,
                                 self.runtime.host_id())
        if stale := self.builder.release_locks():
            log.info("removed %d build locks left from this worker's previous run", stale)
        self.adopt()

    def _loop(self) -> int:
        self.wait_for_server()
        if self.stop_event.is_set():
            return 0
        self.start_up()
        self.events = EventListener(
            self.settings.api_url, self.settings.pool, self.settings.stream_token(),
            self.settings.auth_headers(), self._on_event, self.stop_event,
            on_connect=self._nudged.set,  # events missed while away: poll and check now
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
                    except (RuntimeTrouble, requests.RequestException,
                            docker.errors.DockerException) as exc:
                        log.warning("%s: Docker engine trouble: %s", name, exc)
                    due[name] = time.monotonic() + interval()
            pause = min(due.values()) - time.monotonic()
            if self.settings.run_once:
                if self._once_done(rounds, due):
                    return 0
                pause = min(pause, 0.2)  # notice the last run's end at once
            self._nudged.wait(max(0.05, pause))
            if self._nudged.is_set():
                self._nudged.clear()
                for name in ("poll", "cancel"):
                    if name in due:
                        due[name] = 0.0
        return 0

    def _once_done(self, rounds: dict[str, object], due: dict[str, float]) -> bool:
        """--run-once: one poll only; the other rounds (cancellations above all) go on until
        the runs taken (and adopted) have ended."""
        rounds.pop("poll", None)
        due.pop("poll", None)
        return not self.active_runs()

    def _cancel_check_interval(self) -> float:
        """Check often only when the event stream is not there to report Cancelling (and
        Running, for start slots) as it happens; with it, the check is a net for events the
        stream missed (while it reconnected)."""
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
        return self.admission.free()

    def _seen_running(self, run_id: UUID) -> None:
        """The run reached RUNNING: it no longer counts as starting; take the next one."""
        if self.admission.running(run_id):
            self._nudged.set()

    def _start(self, flow_run: FlowRun, body: Callable[[RunSupervisor], None],
               booting: bool = True) -> bool:
        """A supervisor for the run in its own thread, if admission has a slot for it."""
        assert self.pool is not None
        pool = self.pool
        supervisor = self.admission.admit(flow_run.id, lambda: RunSupervisor(
            self.api, self.runtime, self.settings, pool, flow_run, self.shipper,
            self.builder, on_done=self._done, warm=self.warm,
        ), booting=booting)
        if supervisor is None:
            return False
        threading.Thread(target=body, args=(supervisor,), name=f"run-{flow_run.id.hex[:8]}",
                         daemon=True).start()
        return True

    def _done(self, flow_run: FlowRun) -> None:
        self.admission.release(flow_run.id)

    def active_runs(self) -> list[RunSupervisor]:
        return list(self.admission.supervisors().values())

    # --- cancellation -------------------------------------------------------------------
    def check_started(self) -> None:
        """Starting runs that are RUNNING now free their start slots. Checked even while the
        event stream is connected: a Running event it missed must not hold a slot until
        the boot patience runs out."""
        booting = self.admission.booting()
        if not booting or not self.admission.max_starting:
            return
        try:
            for flow_run in self.api.filter_flow_runs(
                self.settings.pool, [StateType.RUNNING], ids=booting, patience=LOOP_PATIENCE
            ):
                self._seen_running(flow_run.id)
        except PrefectAPIError as exc:
            log.warning("checking for started runs failed: %s", exc)

    def check_cancellations(self) -> None:
        """Runs of ours moved to CANCELLING (UI or API): stop them, in a thread each.
        Also look for starting runs that are RUNNING now (check_started)."""
        supervisors = self.admission.supervisors()
        if not supervisors:
            return
        self.check_started()
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

    # --- restarts: adoption and reconciliation (recovery.py) ------------------------------
    def adopt(self) -> None:
        """Take back this worker's containers from before a restart, a supervisor each."""
        assert self.recovery is not None
        self.recovery.adopt(self.admission, self._adopt)

    def _adopt(self, flow_run: FlowRun, workload: Workload) -> None:
        self._start(flow_run, lambda supervisor: supervisor.adopt(workload), booting=False)

    def reconcile(self) -> None:
        """Vanished containers → CRASHED; finished ones that asked for it → removed."""
        assert self.recovery is not None
        ours = set(self.admission.supervisors())
        self.recovery.reconcile(ours)
        if self.warm is not None:
            self.warm.expire()

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
