"""How a run ends, decided in one place.

The steps of a run (runs.py) raise a small exception when the run ends early: `RunCrashed`,
`RunCancelled`, `ClaimLost`, `Detached`. When the container ends, `judge()` — a pure function
of what the engine and the server say — gives the `Verdict`. One handler in the supervisor
turns either into a state on the server and frees the run's slot.

Prefect's engine inside the container reports the final state itself; the verdict only fills
in what it could not: a container that died (out of memory, a signal, an exit before the
engine reported), a CRASHED whose reason Docker knows better, a cancellation, a container
removed behind our back. A paused (suspended) run was left so by the engine on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .api import State, StateType
from .containers import ExitReport
from .runtime import Workload

SIGTERM_EXIT = 128 + 15  # a process ended by SIGTERM
TERMINATED = "aborted by a termination signal"  # Prefect's engine's Crashed message on one
STOPPED_OUTSIDE = ("The container was stopped from outside (a SIGTERM that was no cancellation: "
                   "the Docker engine shutting down, or `docker stop`): ")


class Outcome(StrEnum):
    LEAVE = "leave"  # the run's state on the server stands
    CRASHED = "crashed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Verdict:
    """What to report: CRASHED or CANCELLED with a message, or nothing (LEAVE)."""

    outcome: Outcome
    message: str = ""
    force: bool = False  # replace the run's state even if final (a CRASHED we know better)
    workload: Workload | None = None  # its last output goes into a crash message
    infrastructure: bool = False  # the infrastructure failed, not the flow: worth a retry
    reason: str = "flow"  # a bounded word for metrics: flow, oom, signal, exit_code, vanished…
    state: str = ""  # LEAVE: the state the run is left in (completed, failed, paused…)


class RunEnded(Exception):
    """A step of the run decided how it ends; the supervisor's handler reports it."""


class RunCrashed(RunEnded):
    """The run cannot go on: CRASHED with this message (and the container's last output)."""

    def __init__(self, message: str, container: Workload | None = None,
                 force: bool = False, infrastructure: bool = False,
                 reason: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.container = container
        self.force = force
        self.infrastructure = infrastructure
        self.reason = reason  # invalid, refused, image, build, start, engine, server, error


class RunCancelled(RunEnded):
    """The run was cancelled (or must be): CANCELLED, with `message` or with what happened
    to its container."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "cancelled")
        self.message = message


class ClaimLost(RunEnded):
    """Another worker (or the server) has the run: nothing to report, nothing to clean."""


class Unjudged(RunEnded):
    """The container has ended but the server could not be asked how the run ended: the
    container is kept, and the worker judges the run again once the server answers
    (reconciliation adopts it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Detached(RunEnded):
    """The worker is leaving; the container runs on and whoever adopts it judges it."""


def cancelled_verdict(state: State | None, workload: Workload | None, exit: ExitReport | None,
              mem_limit: str | None = None) -> Verdict:
    """After a cancellation: CANCELLED with what happened to the container, unless Prefect's
    engine already reported it."""
    if workload is None:
        message = "Cancelled before its container started; no container was created."
    elif exit is None:
        message = f"Cancelled: container {workload.name} is gone."
    else:
        message = (f"Cancelled: container {workload.name} was stopped "
                   f"({exit.describe(mem_limit)}).")
    if state is not None and state.type == StateType.CANCELLED:
        return Verdict(Outcome.LEAVE, message, reason="cancelled", state="cancelled")
    return Verdict(Outcome.CANCELLED, message, force=True, reason="cancelled")


def vanished(workload: Workload) -> str:
    return (f"container vanished: {workload.name} ({workload.short_id}) was removed from the "
            "Docker host while the flow run was in progress")


def judge(
    exit: ExitReport | None,
    state: State | None,
    *,
    cancelled: bool,
    removed: bool,
    workload: Workload,
    mem_limit: str | None = None,
    engine_restarted: bool = False,
) -> Verdict:
    """The verdict on an ended container. `exit` None: it vanished before its exit could be
    read; `removed`: it was removed right after it ended; `state`: the run's state now;
    `engine_restarted`: the engine went away while the container ran (a kill then is the
    infrastructure's doing, not the flow's)."""
    if cancelled:
        return cancelled_verdict(state, workload, exit, mem_limit)
    final = state is not None and state.is_final
    if exit is None or (removed and not final):
        if final:
            return _left(state)  # type: ignore[arg-type]
        return Verdict(Outcome.CRASHED, vanished(workload), infrastructure=True,
                       reason="vanished")
    reason = f"Flow run container {workload.name} {exit.describe(mem_limit)}"
    if state is None or not state.is_final:
        if state is not None and state.type == StateType.PAUSED:
            return Verdict(Outcome.LEAVE, "flow run is PAUSED (suspended); left as it is",
                           reason="suspended", state="paused")
        current = state.type.value if state else "without a state"
        outside = _infrastructure_lead(exit, None, engine_restarted)
        lead, why = outside or ("", exit_reason(exit))
        return Verdict(Outcome.CRASHED, f"{lead}{reason} while the flow run was {current}.",
                       workload=workload, infrastructure=outside is not None, reason=why)
    if state.type == StateType.CRASHED and "dockerworker" not in (state.message or ""):
        # Prefect's engine saw its flow process die, not why; Docker and the output know.
        if (outside := _infrastructure_lead(exit, state, engine_restarted)) is not None:
            # Prefect reports CRASHED on any SIGTERM: this one was not the flow's failure
            lead, why = outside
            return Verdict(Outcome.CRASHED, f"{lead}{reason}. {state.message}", force=True,
                           workload=workload, infrastructure=True, reason=why)
        lead = f"{reason}. " if exit.oom_killed else ""
        return Verdict(Outcome.CRASHED, f"{lead}{state.message}", force=True, workload=workload,
                       reason=exit_reason(exit))
    return _left(state)


def _infrastructure_lead(exit: ExitReport, crashed: State | None,
                         engine_restarted: bool) -> tuple[str, str] | None:
    """The container's end was the infrastructure's doing, not the flow's (worth an
    infrastructure retry): the message's lead and the reason (a metrics label); None: the
    flow's own end. A SIGTERM the worker did not send (its cancellations reach the engine
    as such) comes from outside: the engine shutting down, or `docker stop`."""
    if exit.by_infrastructure:  # a Swarm task the cluster ended: its error says how
        return "", "engine"
    if exit.oom_killed:
        return None
    if engine_restarted and (exit.exit_code != 0 or crashed is not None):
        return "The Docker engine restarted under the run: ", "engine"
    if exit.exit_code == SIGTERM_EXIT or (
            crashed is not None and TERMINATED in (crashed.message or "")):
        return STOPPED_OUTSIDE, "stopped"
    return None


def _left(state: State) -> Verdict:
    """The run's final state, as Prefect's engine reported it, stands."""
    return Verdict(Outcome.LEAVE, f"flow run is {state.type.value}", reason="flow",
                   state=state.type.value.lower())


def exit_reason(exit: ExitReport) -> str:
    """How a container ended, in a word (a bounded metrics label)."""
    if exit.oom_killed:
        return "oom"
    if exit.error:
        return "engine"
    return "signal" if exit.exit_code > 128 else "exit_code"
