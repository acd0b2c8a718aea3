"""What the server says of this worker's runs: Running frees a start slot, CANCELLING
stops a run.

`StateChecks` is the part of `Worker` (worker.py) that hears the event stream's Running and
Cancelling events and, as a net for events it missed (while it reconnected, or without a
stream at all), asks the server at an interval: often without the stream, every 15 s with it.
"""

from __future__ import annotations

import logging
import threading
import time
from uuid import UUID

from . import metrics
from .admission import Admission
from .api import PrefectAPI, StateType
from .events import CANCELLING_EVENT, ENDED_EVENTS, RUNNING_EVENT, EventListener
from .recovery import LOOP_PATIENCE
from .runs import RunSupervisor
from .settings import WorkerSettings

log = logging.getLogger("dockerworker.worker")
CANCEL_CHECK_SECONDS = 2.0
CANCEL_CHECK_WITH_EVENTS = 15.0  # the event stream reports Cancelling at once; this is a net


class StateChecks:
    """Running and Cancelling, from events and checks (a part of `Worker`)."""

    settings: WorkerSettings
    api: PrefectAPI
    admission: Admission[RunSupervisor]
    events: EventListener | None
    held_back: bool  # the last poll left runs scheduled for want of a slot (worker.py)

    def _cancel_check_interval(self) -> float:
        """Check often only when the event stream is not there to report Cancelling (and
        Running, for start slots) as it happens; with it, the check is a net for events the
        stream missed (while it reconnected)."""
        if self.events is not None and self.events.connected.is_set():
            return CANCEL_CHECK_WITH_EVENTS
        return CANCEL_CHECK_SECONDS

    def _on_event(self, name: str, resource_id: str) -> None:
        """A flow run of this pool was scheduled: poll now; is cancelling: check now.
        One of ours is running: it frees a start slot; has ended: its state is known."""
        log.debug("event %s of %s", name, resource_id)
        if name in (RUNNING_EVENT, *ENDED_EVENTS):
            try:
                run_id = UUID(resource_id.removeprefix("prefect.flow-run."))
            except ValueError:
                return
            if name == RUNNING_EVENT:
                self._seen_running(run_id)
            elif (supervisor := self.admission.supervisors().get(run_id)) is not None:
                supervisor.ended_as(StateType(ENDED_EVENTS[name]))
            return
        self._nudge("cancellations" if name == CANCELLING_EVENT else "poll")

    def _nudge(self, *rounds: str) -> None:
        raise NotImplementedError  # the worker's (worker.py)

    def _seen_running(self, run_id: UUID) -> None:
        """The run reached RUNNING: it no longer counts as starting; take the next one, if
        the last poll left runs behind for want of a slot (else a poll finds nothing new:
        a run scheduled meanwhile has its own Scheduled event)."""
        supervisor = self.admission.supervisors().get(run_id)
        if supervisor is not None and supervisor.started_at is not None:
            metrics.START_TO_RUNNING_SECONDS.observe(time.monotonic() - supervisor.started_at)
        if self.admission.running(run_id) and self.held_back:
            self._nudge("poll")

    def check_cancellations(self) -> None:
        """One request for all runs in flight: those moved to CANCELLING (UI or API) are
        stopped, in a thread each; starting ones that are RUNNING now free their start slots
        (checked even while the event stream is connected: a Running event it missed must not
        hold a slot until the boot patience runs out)."""
        supervisors = self.admission.supervisors()
        if not supervisors:
            return
        booting = set(self.admission.booting()) if self.admission.max_starting else set()
        states = [StateType.CANCELLING] + ([StateType.RUNNING] if booting else [])
        found = self.api.filter_flow_runs(self.settings.pool, states, ids=list(supervisors),
                                          patience=LOOP_PATIENCE)  # raises: a failed round
        for flow_run in found:
            state = flow_run.state.type if flow_run.state is not None else None
            if state == StateType.RUNNING and flow_run.id in booting:
                self._seen_running(flow_run.id)
            supervisor = supervisors.get(flow_run.id)
            if (state == StateType.CANCELLING and supervisor is not None
                    and not supervisor.cancel_requested.is_set()):
                threading.Thread(target=supervisor.cancel, daemon=True).start()
