"""The loop's rounds that fail alone, and the recovery rounds of the worker.

`RecoveryRounds` is the part of `Worker` (worker.py) that runs one round whatever it raises
(`_step`: logged, counted, tried again at its next turn) and ties the worker to recovery.py:
adoption after a restart, orphans of gone workers, containers taken over while it was away,
reconciliation, removal of finished containers, warm expiry.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import docker.errors
import requests

from . import metrics
from .admission import Admission
from .api import FlowRun, PrefectAPIError
from .recovery import LOOP_PATIENCE, Recovery, RoundIncomplete
from .runs import RunSupervisor
from .runtime import Runtime, RuntimeTrouble, Workload
from .settings import WorkerSettings
from .warm import WarmPool

log = logging.getLogger("dockerworker.worker")
RECONCILE_SECONDS = 60.0
OWED_SECONDS = 5.0  # reconciliation's turn while a verdict or an infrastructure_pid is owed


class RecoveryRounds:
    """Rounds that fail alone, and the recovery rounds (a part of `Worker`)."""

    settings: WorkerSettings
    runtime: Runtime
    admission: Admission[RunSupervisor]
    recovery: Recovery | None
    warm: WarmPool | None

    def __init__(self) -> None:
        self.rounds: Counter[str] = Counter()  # rounds done, by name (see _step)
        self.failures: Counter[str] = Counter()  # rounds failed, by name
        self._adoption_due = False
        self._owed_since: float | None = None  # a run ended unjudged then (see _owe_verdict)

    def _step(self, name: str, action: Callable[[], object]) -> bool:
        """One round: whatever it raises is logged and counted, and it is tried again at its
        next turn; no round's failure skips another's or ends the loop."""
        try:
            action()
            self.rounds[name] += 1
            return True
        except Exception as exc:  # the loop outlives every round
            self.failures[name] += 1
            metrics.ROUND_FAILURES.labels(name).inc()
            expected = isinstance(exc, (PrefectAPIError, RuntimeTrouble, RoundIncomplete,
                                        requests.RequestException,
                                        docker.errors.DockerException))
            log.warning("%s failed (%d times so far; tried again at its next turn): %s",
                        name, self.failures[name], exc, exc_info=not expected)
            return False

    # --- adoption, orphans, ownership ---------------------------------------------------
    def adopt(self) -> None:
        """Take back this worker's containers from before a restart, a supervisor each; tried
        again each heartbeat until one pass has gone through."""
        self._adoption_due = True
        self._step("adoption", self._adopt_pending)

    def _adopt_pending(self) -> None:
        if self._adoption_due:
            assert self.recovery is not None
            self.recovery.adopt(self.admission, self._adopt)
            self._adoption_due = False

    def adopt_orphans(self) -> None:
        """Take over the containers of workers of this pool on this engine that are gone."""
        assert self.recovery is not None
        try:
            self.recovery.adopt_orphans(self.admission, self._adopt)
        except RoundIncomplete:
            self._adoption_due = True  # what was taken over is ours now: adoption finishes it
            raise

    def _leave_taken_over(self) -> None:
        """Containers another worker took over while this one was away (frozen longer than
        3 heartbeats): stop following them; their new owner judges them."""
        supervisors = [s for s in self.active_runs() if s.container is not None]
        if not supervisors:
            return
        records = self.runtime.owners(self.settings.pool)
        for supervisor in supervisors:
            assert supervisor.container is not None
            owner = records.get(supervisor.container.id)
            if owner is not None and owner.name != self.settings.name:
                log.warning("%s: container %s was taken over by %s while this worker was "
                            "away; leaving it to them", supervisor.label,
                            supervisor.container.name, owner.name)
                supervisor.stop_following()

    def _adopt(self, flow_run: FlowRun, workload: Workload) -> None:
        self._start(flow_run, lambda supervisor: supervisor.adopt(workload), booting=False)

    def _start(self, flow_run: FlowRun, body: Callable[[RunSupervisor], None],
               booting: bool = True) -> bool:
        raise NotImplementedError  # the worker's (worker.py)

    def active_runs(self) -> list[RunSupervisor]:
        raise NotImplementedError  # the worker's (worker.py)

    def _busy(self) -> set[str]:
        """The containers this worker holds now: its warm ones and its supervisors'. The
        pool first: a container handed over leaves it only once its supervisor holds it."""
        warm = self.warm.holds() if self.warm is not None else set()
        return warm | {s.container.id for s in self.active_runs() if s.container is not None}

    def reconcile(self) -> None:
        """The recovery rounds at once, each failing alone: vanished containers → CRASHED,
        finished ones that asked for it → removed, expired warm ones → removed."""
        for name, action in (("reconciliation", self._reconcile_runs),
                             ("removal", self._remove_finished),
                             ("warm expiry", self._expire_warm)):
            self._step(name, action)

    def _owe_verdict(self) -> None:
        """A run ended without a verdict the server took (it did not answer): reconciliation
        gives it, now and every few seconds until a round has gone through, not a minute
        after the server is back."""
        self._owed_since = time.monotonic()
        self._nudge("reconciliation")

    def _reconcile_interval(self) -> float:
        owed = self._owed_since is not None or any(
            s.owes_infrastructure() for s in self.active_runs())
        return OWED_SECONDS if owed else RECONCILE_SECONDS

    def _reconcile_runs(self) -> None:
        assert self.recovery is not None
        for supervisor in self.active_runs():
            if supervisor.owes_infrastructure():
                supervisor.record_infrastructure(LOOP_PATIENCE)
        began = time.monotonic()
        self.recovery.reconcile(set(self.admission.supervisors()), self._adopt)
        if self._owed_since is not None and self._owed_since < began:
            self._owed_since = None  # every run unjudged before this round was looked at

    def _nudge(self, *rounds: str) -> None:
        raise NotImplementedError  # the worker's (worker.py)

    def _remove_finished(self) -> None:
        assert self.recovery is not None
        self.recovery.remove_finished(set(self.admission.supervisors()))

    def _expire_warm(self) -> None:
        if self.warm is not None:
            self.warm.expire()
