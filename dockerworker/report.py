"""Reporting a run's end: its verdict as a state on the server, and its steps in its logs.

A crash carries what the container printed last; an infrastructure failure is rescheduled
while the run has retries left (counted from its state history, so they hold across worker
restarts and replicas); everything written is masked.
"""

from __future__ import annotations

import logging
import re
from uuid import UUID

from . import metrics
from .api import FlowRun, PrefectAPI, PrefectAPIError, ServerUnreachable, StateType
from .flowcode import explain
from .logs import LogShipper, log_entry
from .policy import Masker
from .runtime import Runtime
from .verdict import Outcome, Verdict

log = logging.getLogger(__name__)
MAX_STATE_MESSAGE = 2000
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit): ")
RETRY_MESSAGE = "Rescheduled by dockerworker after an infrastructure failure"


def crash_context(lines: list[str], tail: int = 10, max_chars: int = 1500) -> str:
    """For a crash message: the exception lines in the output (where a traceback names its
    cause) and the last `tail` lines, bounded."""
    errors = list(dict.fromkeys(line for line in lines if _EXCEPTION_LINE.match(line)))[-5:]
    parts = []
    if errors:
        parts.append("Errors in the output:\n" + "\n".join(errors))
    if lines:
        parts.append("Last output:\n" + "\n".join(lines[-tail:]))
    return "\n".join(parts)[-max_chars:]


def retry_note(api: PrefectAPI, flow_run_id: UUID, message: str, allowed: int) -> str | None:
    """The SCHEDULED state's message for the next infrastructure retry of the run, or None
    when its `allowed` retries are used (counted from its state history)."""
    used = sum(1 for state in api.read_flow_run_states(flow_run_id)
               if state.type == StateType.SCHEDULED
               and (state.message or "").startswith(RETRY_MESSAGE))
    if used >= allowed:
        return None
    return f"{RETRY_MESSAGE} (retry {used + 1} of {allowed}): {message[:MAX_STATE_MESSAGE]}"


class RunReporter:
    """What one run's supervisor writes: log lines and the final verdict."""

    def __init__(self, api: PrefectAPI, runtime: Runtime, shipper: LogShipper,
                 flow_run: FlowRun, label: str, mask: Masker) -> None:
        self.api = api
        self.runtime = runtime
        self.shipper = shipper
        self.flow_run = flow_run
        self.label = label
        self.mask = mask

    def say(self, message: str, level: int = logging.INFO) -> None:
        """A step of this run: on the worker's console and in the run's logs (secrets masked)."""
        message = self.mask(message)
        log.log(level, "%s: %s", self.label, message)
        self.shipper.submit(log_entry(self.flow_run.id, message, level))

    def report(self, verdict: Verdict, infra_retries: int) -> None:
        """The verdict as the run's state: CRASHED (or rescheduled), CANCELLED, or left.
        Raises ServerUnreachable when the server did not take it."""
        state = verdict.state or "unknown"
        if verdict.outcome is Outcome.CRASHED and verdict.infrastructure:
            retried = self._retry_or_crash(verdict.message, infra_retries)
            state = "rescheduled" if retried else "crashed"
        elif verdict.outcome is Outcome.CRASHED:
            self._crash(verdict.message, verdict.force)
            state = "crashed"
        elif verdict.outcome is Outcome.CANCELLED:
            self.api.set_state(self.flow_run.id, StateType.CANCELLED, verdict.message,
                               force=verdict.force)
            state = "cancelled"
        elif verdict.message:
            log.info("%s: %s", self.label, verdict.message)
        metrics.RUNS_FINISHED.labels(state, verdict.reason).inc()

    def with_context(self, verdict: Verdict) -> Verdict:
        """A crash verdict with what the container printed last (read before it is removed)."""
        if verdict.outcome is not Outcome.CRASHED or verdict.workload is None:
            return verdict
        lines = self.runtime.last_output(verdict.workload)
        message = verdict.message
        if cause := explain(lines):  # a failed pull step: the one line that says why, first
            message = f"{cause[:1].upper()}{cause[1:]}\n{message}"
        if context := crash_context(lines):
            message = f"{message}\n{context}"
        return Verdict(verdict.outcome, message, verdict.force,
                       infrastructure=verdict.infrastructure, reason=verdict.reason)

    def _retry_or_crash(self, message: str, allowed: int) -> bool:
        """An infrastructure failure: rescheduled while retries are left (the flow has not
        failed, its infrastructure has), CRASHED with the reason otherwise. True: retried."""
        if (note := retry_note(self.api, self.flow_run.id, message, allowed)) is None:
            used = f"{allowed} of {allowed} used"
            self._crash(f"{message}\n(no infrastructure retries left ({used}))")
            return False
        note = self.mask(note)
        self.say(note, logging.WARNING)
        self.api.set_state(self.flow_run.id, StateType.SCHEDULED, note, force=True)
        return True

    def _crash(self, message: str, force: bool = False) -> None:
        """End the run CRASHED with a reason, unless it already reached a final state
        (`force`: replace a CRASHED whose reason we know better)."""
        message = self.mask(f"{message[:MAX_STATE_MESSAGE]}\n(reported by dockerworker)")
        self.say(f"crashed: {message}", logging.ERROR)
        try:
            result = self.api.set_state(self.flow_run.id, StateType.CRASHED, message, force=force)
        except ServerUnreachable:
            raise  # the supervisor keeps the container: the run is judged again later
        except PrefectAPIError as exc:  # refused for good (the run deleted, say)
            log.error("%s: could not report the crash: %s", self.label, exc)
            return
        if result.status != "ACCEPT":
            log.info("%s: crash not recorded (server said %s)", self.label, result.status)
