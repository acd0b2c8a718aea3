"""judge(): the verdict on an ended container, as a table."""

from __future__ import annotations

import pytest

from dockerworker.api import State, StateType
from dockerworker.containers import ExitReport
from dockerworker.runtime import Workload
from dockerworker.verdict import Outcome, cancelled_verdict, judge

W = Workload(id="0123456789abcdef" * 4, name="etl-1234abcd")
EXIT_0 = ExitReport(0, False, "")
EXIT_1 = ExitReport(1, False, "")
OOM = ExitReport(137, True, "")
SIGKILL = ExitReport(137, False, "")
SIGTERM = ExitReport(143, False, "")
ODD_SIGNAL = ExitReport(128 + 90, False, "")
ENGINE_ERROR = ExitReport(127, False, "exec format error")


def state(type_: StateType, message: str | None = None) -> State:
    return State(type=type_, message=message)


# (case, exit, state, removed, outcome, force, in the message, context attached)
TABLE = [
    ("completed", EXIT_0, state(StateType.COMPLETED), False, Outcome.LEAVE, False,
     "COMPLETED", False),
    ("failed by the flow", EXIT_1, state(StateType.FAILED), False, Outcome.LEAVE, False,
     "FAILED", False),
    ("cancelled by the engine", EXIT_0, state(StateType.CANCELLED), False, Outcome.LEAVE,
     False, "CANCELLED", False),
    ("exit code while running", EXIT_1, state(StateType.RUNNING), False, Outcome.CRASHED,
     False, "exited with code 1 while the flow run was RUNNING", True),
    ("exit 0 while pending", EXIT_0, state(StateType.PENDING), False, Outcome.CRASHED, False,
     "exited with code 0 while the flow run was PENDING", True),
    ("no state at all", EXIT_1, None, False, Outcome.CRASHED, False,
     "while the flow run was without a state", True),
    ("out of memory", OOM, state(StateType.RUNNING), False, Outcome.CRASHED, False,
     "killed: out of memory (mem_limit 256m), exit code 137", True),
    ("sigkill", SIGKILL, state(StateType.RUNNING), False, Outcome.CRASHED, False,
     "killed by SIGKILL (exit code 137)", True),
    ("sigterm", SIGTERM, state(StateType.RUNNING), False, Outcome.CRASHED, False,
     "killed by SIGTERM (exit code 143)", True),
    ("a signal without a name", ODD_SIGNAL, state(StateType.RUNNING), False, Outcome.CRASHED,
     False, "killed by signal 90", True),
    ("engine-reported error", ENGINE_ERROR, state(StateType.RUNNING), False, Outcome.CRASHED,
     False, "Docker reported an error: exec format error", True),
    ("crashed by Prefect's engine", EXIT_1,
     state(StateType.CRASHED, "Flow run process exited with code 1"), False, Outcome.CRASHED,
     True, "Flow run process exited with code 1", True),
    ("crashed by Prefect's engine, out of memory", OOM,
     state(StateType.CRASHED, "process died"), False, Outcome.CRASHED, True,
     "out of memory (mem_limit 256m), exit code 137. process died", True),
    ("crashed by dockerworker already", EXIT_1,
     state(StateType.CRASHED, "... (reported by dockerworker)"), False, Outcome.LEAVE, False,
     "CRASHED", False),
    ("paused (suspended)", EXIT_0, state(StateType.PAUSED), False, Outcome.LEAVE, False,
     "PAUSED", False),
    ("vanished while running", None, state(StateType.RUNNING), False, Outcome.CRASHED, False,
     "container vanished: etl-1234abcd (0123456789ab) was removed", False),
    ("vanished without a state", None, None, False, Outcome.CRASHED, False,
     "container vanished", False),
    ("vanished after the engine finished", None, state(StateType.COMPLETED), False,
     Outcome.LEAVE, False, "COMPLETED", False),
    ("removed right after its exit", SIGKILL, state(StateType.RUNNING), True, Outcome.CRASHED,
     False, "container vanished", False),
    ("removed after a final state", EXIT_0, state(StateType.COMPLETED), True, Outcome.LEAVE,
     False, "COMPLETED", False),
]


@pytest.mark.parametrize(
    "exit_, state_, removed, outcome, force, needle, context",
    [row[1:] for row in TABLE], ids=[row[0] for row in TABLE],
)
def test_judge(exit_, state_, removed, outcome, force, needle, context) -> None:
    verdict = judge(exit_, state_, cancelled=False, removed=removed, workload=W,
                    mem_limit="256m")
    assert verdict.outcome is outcome
    assert verdict.force is force
    assert needle in verdict.message
    assert (verdict.workload is not None) is context


CANCELS = [
    ("stopped", W, SIGTERM, state(StateType.CANCELLING), Outcome.CANCELLED,
     "Cancelled: container etl-1234abcd was stopped (killed by SIGTERM (exit code 143))."),
    ("gone", W, None, state(StateType.CANCELLING), Outcome.CANCELLED,
     "Cancelled: container etl-1234abcd is gone."),
    ("before a container", None, None, state(StateType.CANCELLING), Outcome.CANCELLED,
     "Cancelled before its container started; no container was created."),
    ("the engine reported it", W, EXIT_0, state(StateType.CANCELLED), Outcome.LEAVE,
     "Cancelled: container etl-1234abcd was stopped (exited with code 0)."),
]


@pytest.mark.parametrize("workload, exit_, state_, outcome, message",
                         [row[1:] for row in CANCELS], ids=[row[0] for row in CANCELS])
def test_cancelled(workload, exit_, state_, outcome, message) -> None:
    verdict = cancelled_verdict(state_, workload, exit_)
    assert verdict.outcome is outcome
    assert verdict.message == message
    assert verdict.force is (outcome is Outcome.CANCELLED)


def test_cancelled_wins_over_whatever_the_exit_says() -> None:
    verdict = judge(OOM, state(StateType.CANCELLING), cancelled=True, removed=False,
                    workload=W, mem_limit="1g")
    assert verdict.outcome is Outcome.CANCELLED
    assert "out of memory (mem_limit 1g)" in verdict.message


def test_a_task_the_cluster_ended_is_an_infrastructure_crash_and_a_flow_s_exit_is_not() -> None:
    """A Swarm task rejected by its node (an image it cannot pull) or orphaned (its node lost)
    never ran the flow to its end by the flow's doing: CRASHED, worth an infrastructure retry;
    the same exit code from the flow itself is not."""
    lost = ExitReport(-1, False, "No such image: flows:1", by_infrastructure=True)
    for run_state in (state(StateType.PENDING), state(StateType.RUNNING)):
        verdict = judge(lost, run_state, cancelled=False, removed=False, workload=W)
        assert verdict.outcome == Outcome.CRASHED and verdict.infrastructure
        assert "No such image: flows:1" in verdict.message
        assert not verdict.message.startswith("The Docker engine restarted")
    flow_exit = judge(ExitReport(-1, False, "No such image: flows:1"), state(StateType.PENDING),
                      cancelled=False, removed=False, workload=W)
    assert flow_exit.outcome == Outcome.CRASHED and not flow_exit.infrastructure


def test_a_sigterm_from_outside_that_prefect_reported_crashed_is_an_infrastructure_crash(
) -> None:
    """A restarting dockerd stops its containers with SIGTERM; Prefect's engine in a flow
    container reports the run CRASHED itself ("aborted by a termination signal"). The flow
    did not fail: the verdict replaces that state and is worth an infrastructure retry, as
    for a container left RUNNING; so is the same SIGTERM from `docker stop` or a host's
    shutdown (the worker's own cancellations reach the engine as cancellations). Out of
    memory, an exit code or a SIGKILL stay the flow's own crash."""
    aborted = state(StateType.CRASHED, "Execution was aborted by a termination signal.")
    for exit_ in (SIGTERM, EXIT_0, SIGKILL):
        verdict = judge(exit_, aborted, cancelled=False, removed=False, workload=W,
                        engine_restarted=True)
        assert verdict.outcome is Outcome.CRASHED and verdict.infrastructure and verdict.force
        assert verdict.message.startswith("The Docker engine restarted under the run")
        assert "aborted by a termination signal" in verdict.message
    for exit_ in (SIGTERM, EXIT_0):  # the same SIGTERM from `docker stop`, or a shutdown
        verdict = judge(exit_, aborted, cancelled=False, removed=False, workload=W)
        assert verdict.outcome is Outcome.CRASHED and verdict.infrastructure and verdict.force
        assert verdict.message.startswith("The container was stopped from outside")
        assert verdict.reason == "stopped"
    flows_own = state(StateType.CRASHED, "Flow run process exited with code 1")
    for exit_, run_state, restarted in ((OOM, aborted, True), (EXIT_1, flows_own, False),
                                        (SIGKILL, flows_own, False)):
        kept = judge(exit_, run_state, cancelled=False, removed=False, workload=W,
                     mem_limit="256m", engine_restarted=restarted)
        assert kept.outcome is Outcome.CRASHED and not kept.infrastructure
