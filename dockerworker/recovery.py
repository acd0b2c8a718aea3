"""Adoption, orphans and reconciliation: no run is lost when a worker restarts or dies.

Labels, infrastructure_pid and the takeover records (ownership.py) are the workers' memory.
A restarted worker takes back the containers it owns; a worker on the same engine takes over
the containers of one that is gone (exactly one does: the takeover is atomic). A run whose
container vanished from this engine is CRASHED; a claim without a container whose worker is
gone goes back to the pool; exited containers that asked for auto_remove are removed by their
owner. A worker only ever touches containers of its own pool on its own engine, and never a
container another live worker owns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar
from uuid import UUID

from .api import FlowRun, NotFound, PrefectAPI, StateType
from .containers import LABEL_FLOW_RUN_ID, LABEL_MANAGED, LABEL_POOL, LABEL_WORKER, WatchOptions
from .ownership import Claim, Liveness, Owner, claimant, owner_of
from .report import retry_note
from .runtime import Runtime, RuntimeTrouble, Workload, WorkloadGone, parse_infrastructure_pid
from .warm import LABEL_WARM, is_waiting, serves

log = logging.getLogger(__name__)
LOOP_PATIENCE = 2.0  # the loop's own calls retry briefly; the next round tries again anyway
UNFINISHED = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
ENDED = ("exited", "dead")  # a container's status once its process is over
T = TypeVar("T")
Start = Callable[[FlowRun, Workload], object]


def current_attempt(workload: Workload, flow_run: FlowRun) -> bool:
    """Whether the container serves the run's current attempt: the one its infrastructure_pid
    names (when recorded) and, while the run is claimed and not yet started, made by the
    worker whose claim it is. An earlier attempt's container (kept: auto_remove off) is not
    the run any more: judging it would end the attempt under way."""
    if flow_run.infrastructure_pid:
        _, named = parse_infrastructure_pid(flow_run.infrastructure_pid)
        if named != workload.id:
            return False
    claim = Claim.of(flow_run.state)
    return claim is None or claim.holder == workload.labels.get(LABEL_WORKER)


class RoundIncomplete(Exception):
    """Some items of a round failed (the others were done); the round is tried again."""


def _each(what: str, items: Sequence[T], action: Callable[[T], object]) -> None:
    """`action` for every item, one failure never skipping the others; RoundIncomplete after."""
    failed: list[Exception] = []
    for item in items:
        try:
            action(item)
        except Exception as exc:  # one container or run never stops the round
            log.warning("%s: %s", what, exc, exc_info=not isinstance(exc, RuntimeTrouble))
            failed.append(exc)
    if failed:
        raise RoundIncomplete(f"{what}: {len(failed)} of {len(items)} failed ({failed[0]})")


class Recovery:
    """Adoption, orphans and reconciliation for one worker of one pool on one engine."""

    def __init__(self, api: PrefectAPI, runtime: Runtime, pool: str, worker_name: str,
                 host_id: str, heartbeat_interval: float = 30.0,
                 busy: Callable[[], set[str]] = set, infra_retries: int = 1) -> None:
        """`busy()`: ids of the containers this worker holds now (supervised, warm);
        `infra_retries`: the policy's, for runs whose container vanished meanwhile."""
        self.api = api
        self.runtime = runtime
        self.pool = pool
        self.worker_name = worker_name
        self.host_id = host_id
        self.busy = busy
        self.infra_retries = infra_retries
        self.liveness = Liveness(api, pool, heartbeat_interval, LOOP_PATIENCE)

    def _remove(self, workload: Workload) -> None:
        try:
            self.runtime.remove(workload)
        except RuntimeTrouble as exc:
            log.warning("could not remove container %s: %s", workload.name, exc)

    def _owned(self) -> tuple[list[tuple[Workload, Owner]], list[Workload]]:
        """This pool's containers with their owners, and all of them."""
        records = self.runtime.owners(self.pool)
        workloads = self.runtime.list_workloads(self.pool)
        return [(w, owner_of(w, records)) for w in workloads], workloads

    # --- adoption ---------------------------------------------------------------------
    def adopt(self, ours: Collection[UUID], start: Start) -> None:
        """Take back the containers this worker owns (from before a restart), and remove its
        warm containers that were still waiting for a run."""
        mine = [(w, o) for w, o in self._owned()[0] if o.name == self.worker_name]
        _each("adoption", mine, lambda item: self._take_back(*item, ours, start))

    def adopt_orphans(self, ours: Collection[UUID], start: Start) -> None:
        """Take over the containers of workers that are gone (exactly one worker does)."""
        theirs = [(w, o) for w, o in self._owned()[0] if o.name != self.worker_name]
        gone = self.liveness.gone({o.name for _, o in theirs})
        orphans = [(w, o) for w, o in theirs if o.name in gone]

        def take(item: tuple[Workload, Owner]) -> None:
            workload, owner = item
            if not self._own(workload, owner):
                return
            log.info("worker %r is gone; took over its container %s", owner.name, workload.name)
            self._take_back(workload, owner, ours, start, owned=True)

        _each("orphans", orphans, take)

    def _own(self, workload: Workload, owner: Owner) -> bool:
        """The atomic step: this worker owns the container from the next generation on, or
        another worker got there first (False). A restarted worker takes its own containers
        the same way: a worker that found it gone meanwhile cannot adopt them too."""
        if self.runtime.take_over(workload, self.pool,
                                  Owner(self.worker_name, owner.generation + 1)):
            return True
        log.info("container %s: another worker took it over first", workload.name)
        return False

    def _take_back(self, workload: Workload, owner: Owner, ours: Collection[UUID],
                   start: Start, owned: bool = False) -> None:
        """One container this worker owns (`owned`: taken over just now): a supervisor if
        its run is not over; removed if it is over (or never got a run) and asked for
        auto_remove."""
        if workload.id in self.busy():
            return
        if LABEL_WARM in workload.labels and is_waiting(workload):
            self._remove(workload)
            return
        flow_run = self._run_of(workload)
        if flow_run is not None and flow_run.id in ours:
            return
        over = flow_run is None or (flow_run.state is not None and flow_run.state.is_final)
        if over:
            if workload.status != "running" and _auto_remove(workload):
                self._remove(workload)
            return
        assert flow_run is not None
        if not current_attempt(workload, flow_run):
            log.info("container %s is of an earlier attempt of flow run %r; left as it is",
                     workload.name, flow_run.name)
            return
        if not owned and not self._own(workload, owner):
            return
        try:
            full = self.runtime.inspect(workload.id)  # env and config, for the supervisor
        except WorkloadGone:
            return
        log.info("adopting container %s of flow run %r (%s)", full.name, flow_run.name,
                 full.status)
        start(flow_run, full)

    def _run_of(self, workload: Workload) -> FlowRun | None:
        """The run a container serves: by its label, or (a warm container) by the unfinished
        run naming it as infrastructure whose id the container's name carries (anyone may
        write an infrastructure_pid: warm.serves). None: over, deleted, or never handed one."""
        if LABEL_FLOW_RUN_ID not in workload.labels:
            return _handed(workload, self._runs_by_container())
        try:
            return self.api.read_flow_run(UUID(workload.labels[LABEL_FLOW_RUN_ID]))
        except NotFound:
            log.info("container %s serves a deleted flow run; removing it", workload.name)
            self._remove(workload)
            return None

    def _runs_by_container(self) -> dict[str, list[FlowRun]]:
        """Unfinished runs of this pool on this engine, by the container their
        infrastructure_pid names (several may name one: anyone may write it)."""
        found: dict[str, list[FlowRun]] = {}
        for flow_run in self.api.filter_flow_runs(self.pool, UNFINISHED,
                                                  patience=LOOP_PATIENCE):
            host, workload_id = parse_infrastructure_pid(flow_run.infrastructure_pid)
            if host == self.host_id:
                found.setdefault(workload_id, []).append(flow_run)
        return found

    # --- reconciliation ---------------------------------------------------------------
    def reconcile(self, ours: Collection[UUID], start: Start) -> None:
        """Runs of this pool whose container on this engine vanished → CRASHED; claims
        without a container whose worker is gone → SCHEDULED; a container of this worker
        that has ended while nobody judged its unfinished run (the server did not answer at
        its verdict) → adopted (`start`): a supervisor judges it again; CANCELLING runs whose
        container has stopped → CANCELLED."""
        runs = self.api.filter_flow_runs(self.pool, UNFINISHED, patience=LOOP_PATIENCE)
        records: dict[str, Owner] | None = None
        gone: dict[str, bool] = {}  # who is gone, asked once per round and worker

        def is_gone(name: str) -> bool:
            if name not in gone:
                gone[name] = name in self.liveness.gone({name})
            return gone[name]

        def owners() -> dict[str, Owner]:
            nonlocal records
            if records is None:
                records = self.runtime.owners(self.pool)
            return records

        def judge_if_unjudged(workload: Workload, flow_run: FlowRun) -> None:
            """Ended, ours, the run's current attempt: nobody gives its verdict (one a
            supervisor of ours holds is left by _take_back)."""
            if workload.status not in ENDED:
                return
            owner = owner_of(workload, owners())
            if owner.name == self.worker_name and current_attempt(workload, flow_run):
                log.info("container %s ended and flow run %r has no verdict yet; judging it",
                         workload.name, flow_run.name)
                self._take_back(workload, owner, ours, start)

        def check(flow_run: FlowRun) -> None:
            if flow_run.state is not None and flow_run.state.type == StateType.CANCELLING:
                self._finish_cancellation(flow_run, owners, is_gone)
                return
            if not flow_run.infrastructure_pid:  # not recorded (yet), or never started
                for workload in self._reschedule_if_abandoned(flow_run, is_gone):
                    judge_if_unjudged(workload, flow_run)
                return
            host, workload_id = parse_infrastructure_pid(flow_run.infrastructure_pid)
            if host != self.host_id:
                return
            try:
                workload = self.runtime.inspect(workload_id)
                if self._of_this_pool(workload, flow_run):
                    judge_if_unjudged(workload, flow_run)
                return
            except WorkloadGone:
                pass
            if self._vanished_under_us(flow_run, owners().get(workload_id), is_gone):
                self._crash_vanished(flow_run, workload_id)

        # a run a supervisor of this worker holds is its supervisor's to judge (the rounds
        # and the starts of supervisors share one thread: none starts during a round)
        _each("reconciliation", [r for r in runs if r.id not in ours], check)

    def _of_this_pool(self, workload: Workload, flow_run: FlowRun) -> bool:
        """Whether the container a run's infrastructure_pid names is one of this pool's:
        anyone who may write to the API may write that field, and a worker touches only its
        own pool's containers (another pool's, or one dockerworker did not make, is left)."""
        labels = workload.labels
        if labels.get(LABEL_POOL) == self.pool and labels.get(LABEL_MANAGED) == "true":
            return True
        log.warning("flow run %r (%s) names container %s as its infrastructure, which is not "
                    "one of pool %r's; left alone", flow_run.name, flow_run.id, workload.name,
                    self.pool)
        return False

    def _vanished_under_us(self, flow_run: FlowRun, record: Owner | None,
                           is_gone: Callable[[str], bool]) -> bool:
        """The container is gone; judge the run only if it is still unfinished and its owner
        is this worker or gone (a live owner judges its own run: it may be removing the
        container between its verdict and the report)."""
        now = self.api.read_flow_run(flow_run.id)
        if (now.state is not None and now.state.is_final) or (
                now.infrastructure_pid != flow_run.infrastructure_pid):
            return False
        owner = record.name if record is not None else _holder(claimant(self.api, flow_run.id))
        if owner is None or owner == self.worker_name:
            return True
        return is_gone(owner)

    def _crash_vanished(self, flow_run: FlowRun, workload_id: str) -> None:
        """An infrastructure failure like any other: rescheduled while retries are left."""
        message = (f"container vanished: {workload_id[:12]} no longer exists on the "
                   "Docker host (reported by dockerworker's reconciliation)")
        log.warning("flow run %r (%s): %s", flow_run.name, flow_run.id, message)
        if (note := retry_note(self.api, flow_run.id, message, self.infra_retries)) is not None:
            self.api.set_state(flow_run.id, StateType.SCHEDULED, note, force=True)
            return
        used = f"{self.infra_retries} of {self.infra_retries} used"
        self.api.set_state(flow_run.id, StateType.CRASHED,
                           f"{message}\n(no infrastructure retries left ({used}))")

    def _finish_cancellation(self, flow_run: FlowRun, owners: Callable[[], dict[str, Owner]],
                             is_gone: Callable[[str], bool]) -> None:
        """A CANCELLING run nobody stops any more: its container on this engine has ended or
        is gone (or it never had one), and its owner is this worker or a gone one. Its
        CANCELLED state was lost (the server did not answer then): set it now."""
        owner: str | None
        if flow_run.infrastructure_pid:
            host, workload_id = parse_infrastructure_pid(flow_run.infrastructure_pid)
            if host != self.host_id:
                return
            try:
                workload = self.runtime.inspect(workload_id)
            except WorkloadGone:
                workload = None
            if workload is not None and not self._of_this_pool(workload, flow_run):
                return
            if workload is not None and workload.status not in ENDED:
                return  # still stopping
            record = owner_of(workload, owners()) if workload else owners().get(workload_id)
            owner = record.name if record else _holder(claimant(self.api, flow_run.id))
        else:
            found = self.runtime.list_workloads(self.pool,
                                                **{LABEL_FLOW_RUN_ID: str(flow_run.id)})
            if any(w.status not in ENDED for w in found):
                return
            claim = claimant(self.api, flow_run.id)
            if claim is None or not claim.seen_from(self.host_id):
                return  # its container, if any, is on an engine this worker cannot see
            owner = claim.holder
        if owner is None or (owner != self.worker_name and not is_gone(owner)):
            return
        now = self.api.read_flow_run(flow_run.id).state
        if now is None or now.type != StateType.CANCELLING:  # its supervisor just said so
            return
        log.warning("flow run %r (%s) is CANCELLING and its container has stopped; "
                    "setting it CANCELLED", flow_run.name, flow_run.id)
        self.api.set_state(flow_run.id, StateType.CANCELLED,
                           "cancelled: the container had stopped (reported by dockerworker's "
                           "reconciliation)", force=True)

    def _reschedule_if_abandoned(self, flow_run: FlowRun,
                                 is_gone: Callable[[str], bool]) -> list[Workload]:
        """A run claimed on this engine by this worker before it restarted, or by a worker
        that is gone, without a container: give it back to the pool. The run's containers,
        if it has. A claim on another engine is left to the workers that see it."""
        claim = Claim.of(flow_run.state)
        if claim is None or not claim.seen_from(self.host_id):
            return []  # not a claim, or its container is on an engine this worker cannot see
        holder = claim.holder
        if holder != self.worker_name and not is_gone(holder):
            return []
        if found := self.runtime.list_workloads(self.pool,
                                                **{LABEL_FLOW_RUN_ID: str(flow_run.id)}):
            return found
        why = ("restarted, or could not report why," if holder == self.worker_name
               else "is gone")
        log.warning("flow run %r (%s) was claimed by %s, which %s and never started its "
                    "container; rescheduling it", flow_run.name, flow_run.id, holder, why)
        self.api.set_state(
            flow_run.id, StateType.SCHEDULED,
            f"rescheduled: dockerworker {holder} {why} before starting its container",
            force=True,
        )
        return []

    # --- removal ----------------------------------------------------------------------
    def remove_finished(self, ours: Collection[UUID]) -> None:
        """Exited containers this worker owns whose runs are over and that asked for
        auto_remove; takeover records of containers that are gone."""
        owned, workloads = self._owned()
        self.runtime.forget_owners(self.pool, {w.id for w in workloads})
        busy = self.busy()
        done = [w for w, o in owned if o.name == self.worker_name and w.id not in busy
                and w.status in ENDED and _auto_remove(w)
                and not (LABEL_WARM in w.labels and is_waiting(w))]
        handed_over: dict[str, list[FlowRun]] | None = None

        def remove_if_over(workload: Workload) -> None:
            nonlocal handed_over
            if LABEL_FLOW_RUN_ID not in workload.labels:  # a warm container that took a run
                if handed_over is None:
                    handed_over = self._runs_by_container()
                if _handed(workload, handed_over) is None:
                    self._remove(workload)
                return
            run_id = UUID(workload.labels[LABEL_FLOW_RUN_ID])
            if run_id in ours:
                return
            try:
                state = self.api.read_flow_run(run_id).state
            except NotFound:
                state = None
            if state is None or state.is_final:
                self._remove(workload)

        _each("removal", done, remove_if_over)


def _handed(workload: Workload, runs: dict[str, list[FlowRun]]) -> FlowRun | None:
    """Of the unfinished runs naming a warm container, the one it was handed (warm.serves)."""
    return next((r for r in runs.get(workload.id, []) if serves(workload, r.id)), None)


def _holder(claim: Claim | None) -> str | None:
    return claim.holder if claim is not None else None


def _auto_remove(workload: Workload) -> bool:
    return WatchOptions.from_labels(workload.labels).auto_remove
