"""After a restart, and now and then: adoption and reconciliation.

Labels and infrastructure_pid are the worker's memory. A restarted worker (same name) takes
back the containers it started; a run whose container vanished from this engine is CRASHED;
a run claimed before a restart that never got a container goes back to the pool; exited
containers of finished runs that asked for auto_remove are removed. A worker only ever touches
containers of its own pool on its own engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from uuid import UUID

from .api import FlowRun, NotFound, PrefectAPI, PrefectAPIError, StateType
from .containers import LABEL_FLOW_RUN_ID, LABEL_WORKER, WatchOptions
from .runs import claim_message
from .runtime import Runtime, RuntimeTrouble, Workload, WorkloadGone, parse_infrastructure_pid
from .warm import LABEL_WARM, is_waiting

log = logging.getLogger(__name__)
LOOP_PATIENCE = 2.0  # the loop's own calls retry briefly; the next round tries again anyway


class Recovery:
    """Adoption and reconciliation for one worker of one pool on one engine."""

    def __init__(self, api: PrefectAPI, runtime: Runtime, pool: str, worker_name: str,
                 host_id: str) -> None:
        self.api = api
        self.runtime = runtime
        self.pool = pool
        self.worker_name = worker_name
        self.host_id = host_id

    def _remove(self, workload: Workload) -> None:
        try:
            self.runtime.remove(workload)
        except RuntimeTrouble as exc:
            log.warning("could not remove container %s: %s", workload.name, exc)

    # --- adoption ---------------------------------------------------------------------
    def adopt(self, ours: Collection[UUID],
              start: Callable[[FlowRun, Workload], object]) -> None:
        """Take back the containers this worker started before it restarted (same name);
        remove its warm containers that were still waiting for a run. `start(run, workload)`
        gives an adopted container its supervisor."""
        handed_over: dict[str, FlowRun] | None = None
        for workload in self.runtime.list_workloads(self.pool, **{LABEL_WORKER: self.worker_name}):
            if LABEL_WARM in workload.labels and is_waiting(workload):
                self._remove(workload)
                continue
            if LABEL_FLOW_RUN_ID in workload.labels:
                flow_run = self._run_of(workload)
            else:  # a warm container: its run names it as infrastructure
                if handed_over is None:
                    handed_over = self._runs_by_container()
                flow_run = handed_over.get(workload.id)  # None: its run is over (or gone)
            if flow_run is None or flow_run.id in ours:
                continue
            if flow_run.state is not None and flow_run.state.is_final and (
                workload.status != "running"
            ):
                if WatchOptions.from_labels(workload.labels).auto_remove:
                    self._remove(workload)
                continue
            try:
                full = self.runtime.inspect(workload.id)  # env and config, for the supervisor
            except WorkloadGone:
                continue
            log.info("adopting container %s of flow run %r (%s)", full.name,
                     flow_run.name, full.status)
            start(flow_run, full)

    def _run_of(self, workload: Workload) -> FlowRun | None:
        """The run a container's label names; a container of a deleted run is removed."""
        try:
            return self.api.read_flow_run(UUID(workload.labels[LABEL_FLOW_RUN_ID]))
        except NotFound:
            log.info("container %s serves a deleted flow run; removing it", workload.name)
            self._remove(workload)
            return None

    def _runs_by_container(self) -> dict[str, FlowRun]:
        """Unfinished runs of this pool on this engine, by their container's id."""
        states = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
        found = {}
        for flow_run in self.api.filter_flow_runs(self.pool, states):
            host, workload_id = parse_infrastructure_pid(flow_run.infrastructure_pid)
            if host == self.host_id:
                found[workload_id] = flow_run
        return found

    # --- reconciliation ---------------------------------------------------------------
    def reconcile(self, ours: Collection[UUID]) -> None:
        """Runs of this pool whose container on this engine vanished → CRASHED; exited
        containers of final runs that asked for auto_remove → removed."""
        try:
            runs = self.api.filter_flow_runs(
                self.pool, [StateType.PENDING, StateType.RUNNING], patience=LOOP_PATIENCE,
            )
        except PrefectAPIError as exc:
            log.warning("reconciliation failed: %s", exc)
            return
        for flow_run in runs:
            if flow_run.id in ours:
                continue
            if not flow_run.infrastructure_pid:
                self._reschedule_if_abandoned(flow_run)
                continue
            host, workload_id = parse_infrastructure_pid(flow_run.infrastructure_pid)
            if host != self.host_id:
                continue
            try:
                self.runtime.inspect(workload_id)
            except WorkloadGone:
                message = (f"container vanished: {workload_id[:12]} no longer exists on the "
                           "Docker host (reported by dockerworker's reconciliation)")
                log.warning("flow run %r (%s): %s", flow_run.name, flow_run.id, message)
                self.api.set_state(flow_run.id, StateType.CRASHED, message)
        self._remove_finished(ours)

    def _remove_finished(self, ours: Collection[UUID]) -> None:
        """Exited containers of runs that are over and asked for auto_remove."""
        for workload in self.runtime.list_workloads(
            self.pool, **{"io.dockerworker.auto-remove": "true"}
        ):
            if workload.status not in ("exited", "dead"):
                continue
            if LABEL_FLOW_RUN_ID not in workload.labels:
                continue  # a warm container: removed by its run, or by adoption
            run_id = UUID(workload.labels[LABEL_FLOW_RUN_ID])
            if run_id in ours:
                continue
            try:
                state = self.api.read_flow_run(run_id).state
            except NotFound:
                state = None
            if state is None or state.is_final:
                self._remove(workload)

    def _reschedule_if_abandoned(self, flow_run: FlowRun) -> None:
        """A run this worker claimed before it restarted, without a container yet: give it
        back to the pool (any container it got would have been adopted already)."""
        state = flow_run.state
        if state is None or state.type != StateType.PENDING:
            return
        if state.message != claim_message(self.worker_name):
            return
        if self.runtime.list_workloads(self.pool, **{LABEL_FLOW_RUN_ID: str(flow_run.id)}):
            return
        log.warning("flow run %r (%s) was claimed before a restart and never got a "
                    "container; rescheduling it", flow_run.name, flow_run.id)
        self.api.set_state(
            flow_run.id, StateType.SCHEDULED,
            f"rescheduled: dockerworker {self.worker_name} restarted before starting its "
            "container", force=True,
        )
