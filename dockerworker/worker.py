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
from datetime import datetime, timedelta

import docker
import docker.errors
import requests

from . import __version__, metrics
from .admission import Admission
from .ahead import WARM_LEAD, WarmAhead, spec_ahead
from .api import (
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    WorkPool,
)
from .builds import Builder
from .cache import CachedReads
from .checks import StateChecks
from .events import EventListener
from .logs import LogShipper
from .pacing import PollPacing
from .recovery import LOOP_PATIENCE, Recovery
from .resources import UsageWatch
from .rounds import RECONCILE_SECONDS, RecoveryRounds
from .runs import Phase, RunSupervisor
from .runtime import LocalEngine, Runtime, RuntimeTrouble
from .server import ensure_pool, wait_for_server
from .settings import WorkerSettings
from .swarmjobs import SwarmJobs
from .warm import WarmPool

log = logging.getLogger(__name__)
START_UP_RETRY = 5.0  # seconds between tries of start-up (pool, engine id, adoption)


class Worker(RecoveryRounds, StateChecks, PollPacing):
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
        super().__init__()
        self.settings = settings
        self.api = api
        if runtime is None:
            assert docker_client is not None, "a Docker client or a runtime"
            runtime = (SwarmJobs(docker_client, gpu_kind=settings.swarm_gpu_kind)
                       if settings.runtime == "swarm"
                       else LocalEngine(docker_client))
        self.runtime = runtime
        self.stop_event = threading.Event()
        self.pool: WorkPool | None = None
        self.shipper = LogShipper(api)
        self.reads = CachedReads(api)  # deployments, flows, the pool: shared by the runs
        self.builder = builder or Builder(docker_client, settings.build_options(),
                                          holder=settings.name)
        self.last_poll: float | None = None  # monotonic time of the last successful poll
        self.recovery: Recovery | None = None
        self._nudged = threading.Event()  # set by the event stream, or to stop: act now
        self._wanted: set[str] = set()  # the rounds a nudge asked for (_nudge)
        self._wanted_lock = threading.Lock()
        self.held_back = False  # the last poll left runs scheduled for want of a slot
        self.events: EventListener | None = None
        self._polled_once = False  # --run-once: its one poll is done
        warm = settings.warm if settings.runtime == "docker" else 0  # no warm Swarm jobs
        self.warm = WarmPool(runtime, warm) if warm else None
        self.ahead: WarmAhead | None = None  # warming for runs scheduled later (ahead.py)
        if self.warm is not None:
            self.ahead = WarmAhead(self.warm, lambda run, pool: spec_ahead(
                self.api, self.runtime, self.builder, self.settings, self.reads, self.shipper,
                run, pool))
        self.admission: Admission[RunSupervisor] = Admission(
            settings.limit, 0 if settings.run_once else settings.max_starting,
            also_starting=self._other_starts)
        self._foreign_starts: dict[str, float] = {}  # other workers' starts here, by age
        self.usage = UsageWatch(runtime)  # the runs' resource readings (resources.py)

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
                                 self.runtime.host_id(), self.settings.heartbeat_interval,
                                 busy=self._busy,
                                 infra_retries=self.settings.policy.infra_retries)
        if stale := self.builder.release_locks():
            log.info("removed %d build locks left from this worker's previous run", stale)
        _expose(self)
        self.adopt()

    def _loop(self) -> int:
        self.wait_for_server()
        if self.stop_event.is_set():
            return 0
        while not self._step("start-up", self.start_up):  # a blip now is no reason to exit
            if self.stop_event.wait(START_UP_RETRY):
                return 0
        if self.api.server.event_stream:  # else polling carries the work (api.ServerInfo)
            self.events = EventListener(
                self.settings.api_url, self.settings.pool,
                lambda: (self.settings.stream_token(), self.settings.auth_headers()),
                self._on_event, self.stop_event,
                # events missed while away: poll and check now
                on_connect=lambda: self._nudge("poll", "cancellations"),
                # events missed from now on: poll at the shorter interval, from now
                on_disconnect=lambda: self._nudge("poll", "cancellations"),
            ).start()
        log.info(
            "worker %s polling pool %r%s every %.1fs%s (limit %s, starting at once %s%s)",
            self.settings.name,
            self.pool.name,
            f" queues {self.settings.work_queues}" if self.settings.work_queues else "",
            self.settings.poll_interval,
            f", every {self.slowest_poll_interval():.1f}s while the event stream is connected"
            if self.events is not None else "",
            self.settings.limit or "none",
            self.settings.max_starting or "any",
            f", {self.settings.warm} warm" if self.settings.warm else "",
        )
        due = dict.fromkeys(self._rounds(), 0.0)
        while not self.stop_event.is_set():
            for name, (interval, action) in self._rounds().items():
                if time.monotonic() >= due[name]:
                    self._step(name, action)
                    due[name] = time.monotonic() + interval()
            pause = min(due[name] for name in self._rounds()) - time.monotonic()
            if self.settings.run_once:
                self._polled_once = True
                if not self.active_runs():  # the runs taken (and adopted) have ended
                    return 0
                pause = min(pause, 0.2)  # notice the last run's end at once
            self._nudged.wait(max(0.05, pause))
            if self._nudged.is_set():
                self._nudged.clear()
                with self._wanted_lock:
                    wanted, self._wanted = self._wanted, set()
                for name in wanted & due.keys():
                    due[name] = 0.0
        return 0

    def _rounds(self) -> dict[str, tuple[Callable[[], float], Callable[[], None]]]:
        """The loop's rounds, in order: (interval, action) each; each fails alone (`_step`).
        --run-once polls once; the other rounds (cancellations above all) go on."""
        every_beat = lambda: self.settings.heartbeat_interval
        every_minute = lambda: RECONCILE_SECONDS
        rounds = {
            "heartbeat": (every_beat, self._heartbeat),
            "poll": (self._poll_interval, self.poll),  # rare while events come (pacing.py)
            "cancellations": (self._cancel_check_interval, self.check_cancellations),
            "adoption": (every_beat, self._adopt_pending),
            "orphans": (every_beat, self.adopt_orphans),
            "ownership": (every_beat, self._leave_taken_over),
            "reconciliation": (self._reconcile_interval, self._reconcile_runs),
            "removal": (every_minute, self._remove_finished),
            "warm expiry": (every_minute, self._expire_warm),
        }
        if self.settings.run_once and self._polled_once:
            del rounds["poll"]
        return rounds

    def _nudge(self, *rounds: str) -> None:
        """Do these rounds (`poll`, `cancellations`) at once, not at their next turn: only
        those, so that an event costs the one request it calls for."""
        with self._wanted_lock:
            self._wanted.update(rounds)
        self._nudged.set()

    def stop(self) -> None:
        """Stop claiming (from a signal handler): the loop ends at once."""
        self.stop_event.set()
        self._nudged.set()

    def _heartbeat(self) -> None:
        """Tell the pool we are alive (other workers adopt our containers when we are not);
        a pool deleted meanwhile (the heartbeat's 404) is created again, as a step of its own.
        The pool itself is not read here: each run reads it as it starts."""
        try:
            self.api.heartbeat(
                self.settings.pool,
                self.settings.name,
                self.settings.heartbeat_interval,
                patience=LOOP_PATIENCE,
            )
        except NotFound:
            log.warning("work pool %r is gone; creating it again", self.settings.pool)
            self._step("pool re-creation", self._recreate_pool)

    def _recreate_pool(self) -> None:
        self.pool = self.ensure_pool()
        self.reads.pools.drop(self.settings.pool)  # the runs read the new one

    def poll(self) -> None:
        """Ask for what is due (now + prefetch; further ahead while polls are rare: pacing.py)
        and start a supervisor per run due now, within --limit."""
        free = self.free_slots()
        if free is not None and free <= 0:
            self.last_poll = time.monotonic()  # full, not stuck: healthy, nothing to ask for
            self.held_back = True
            self._next_due = None  # a freed slot nudges a poll, which looks again
            self._recheck_foreign_starts()  # or other workers' starts, as they age out
            return
        try:
            self.runtime.ping()
        except RuntimeTrouble as exc:  # a claim now could only crash: leave runs to others
            log.warning("Docker engine unreachable (%s); not claiming runs until it answers",
                        exc)
            return
        horizon = self._poll_horizon()
        # Runs still starting may still be SCHEDULED on the server (their claim is under way)
        # and come back first: ask for that many more, or the free slots would get only them.
        limit = None if free is None else free + len(self.admission.booting())
        try:
            runs, later = self._due_now(self.api.get_scheduled_flow_runs(
                self.settings.pool, horizon, limit, self.settings.work_queues,
                patience=LOOP_PATIENCE,
            ))
        except NotFound:
            log.warning("work pool %r not found; it is created again at the next heartbeat",
                        self.settings.pool)
            return
        self.last_poll = time.monotonic()
        held_back = limit is not None and len(runs) >= limit  # the server may hold more
        new = [flow_run for flow_run in runs if flow_run.id not in self.admission]
        if free is not None and len(new) > free:
            new, held_back = new[:free], True
        for flow_run in new:
            if not self._start(flow_run, lambda supervisor: supervisor.run()):
                held_back = True
        self.held_back = held_back
        if self.ahead is not None:
            self._warm_ahead(later, horizon)

    def _warm_ahead(self, later: list[FlowRun], horizon: datetime) -> None:
        """With --warm: warm for the runs due after this poll's horizon (another request, so
        that runs due later never take the places of due ones in the poll's limit) and for
        those the poll found not yet due (ahead.py). Nothing while the last round is at work:
        the next poll sees these runs again."""
        assert self.ahead is not None and self.warm is not None
        if self.ahead.busy():
            return
        try:
            further = self.api.get_scheduled_flow_runs(
                self.settings.pool, horizon + timedelta(seconds=WARM_LEAD), self.warm.size,
                self.settings.work_queues, patience=LOOP_PATIENCE, scheduled_after=horizon)
        except PrefectAPIError as exc:
            log.debug("could not look ahead for runs to warm for: %s", exc)
            further = []
        self.ahead.see(later + further, self.settings.pool)

    def free_slots(self) -> int | None:
        """How many more runs to take now: within --limit and --max-starting (None: any)."""
        return self.admission.free()

    def _start(self, flow_run: FlowRun, body: Callable[[RunSupervisor], None],
               booting: bool = True) -> bool:
        """A supervisor for the run in its own thread, if admission has a slot for it."""
        assert self.pool is not None
        pool = self.pool
        supervisor = self.admission.admit(flow_run.id, lambda: RunSupervisor(
            self.api, self.runtime, self.settings, pool, flow_run, self.shipper,
            self.builder, on_done=self._done, warm=self.warm, usage=self.usage,
            reads=self.reads, on_owed=lambda: self._nudge("reconciliation"),
        ), booting=booting)
        if supervisor is None:
            return False
        threading.Thread(target=body, args=(supervisor,), name=f"run-{flow_run.id.hex[:8]}",
                         daemon=True).start()
        return True

    def _done(self, flow_run: FlowRun) -> None:
        supervisor = self.admission.supervisors().get(flow_run.id)
        free = self.free_slots()
        full = free is not None and free <= 0
        self.admission.release(flow_run.id)
        if supervisor is not None and supervisor.unjudged:  # released first: not ours now
            self._owe_verdict()
        if full:  # the last poll may have left runs scheduled: take the next one now
            self._nudge("poll")

    def _other_starts(self) -> int:
        """Starts on this CPU that are not runs of ours: the containers other workers started
        on this engine within our typical start (admission.py)."""
        try:
            self._foreign_starts = self.runtime.starts_elsewhere(
                self.settings.name, self.admission.typical_start())
        except RuntimeTrouble:
            self._foreign_starts = {}  # the poll's ping says so; bound by our own starts
        return len(self._foreign_starts)

    def _recheck_foreign_starts(self) -> None:
        """Held back by other workers' starts: poll again when the oldest of them leaves the
        typical start, not at the next interval (no event of ours would say so)."""
        if self._foreign_starts:
            oldest = max(self._foreign_starts.values())
            wait = max(0.5, self.admission.typical_start() - oldest)
            self._next_due = time.monotonic() + wait

    def active_runs(self) -> list[RunSupervisor]:
        return list(self.admission.supervisors().values())

    # --- cancellation -------------------------------------------------------------------
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


def _expose(worker: Worker) -> None:
    """The worker's state as metrics, read at each scrape where it already lives."""
    metrics.BUILD_INFO.info({"version": __version__,
                             "prefect_server_version": worker.api.server.version,
                             "docker_engine_version": worker.runtime.engine_version()})
    metrics.watch(metrics.RUNS_IN_FLIGHT, lambda: len(worker.admission))
    metrics.watch(metrics.RUNS_STARTING, lambda: len(worker.admission.booting()))
    metrics.watch(metrics.WARM_WAITING,
                  lambda: worker.warm.waiting() if worker.warm is not None else 0)
    metrics.watch(metrics.WARM_READY,
                  lambda: worker.warm.ready() if worker.warm is not None else 0)
    if worker.settings.limit is not None:
        metrics.LIMIT.set(worker.settings.limit)
    metrics.MAX_STARTING.set(worker.settings.max_starting)

