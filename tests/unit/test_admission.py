"""Admission: --limit, --max-starting, the runs still starting, one registry."""

from __future__ import annotations

import threading
import uuid

from dockerworker.admission import FIRST_START_GUESS, Admission


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ids(n: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(n)]


def test_no_bounds_means_any() -> None:
    admission: Admission[str] = Admission(None, 0)
    assert admission.free() is None
    for run in ids(50):
        assert admission.admit(run, lambda: "s") == "s"
    assert len(admission) == 50


def test_limit_bounds_runs_in_flight_and_a_release_frees_a_slot() -> None:
    admission: Admission[str] = Admission(2, 0)
    a, b, c = ids(3)
    assert admission.admit(a, lambda: "a") and admission.admit(b, lambda: "b")
    assert admission.free() == 0
    assert admission.admit(c, lambda: "c") is None
    admission.release(a)
    assert admission.free() == 1
    assert admission.admit(c, lambda: "c") == "c"


def test_a_run_is_admitted_once() -> None:
    admission: Admission[str] = Admission(None, 0)
    run = uuid.uuid4()
    made = []
    assert admission.admit(run, lambda: made.append(1) or "x") == "x"
    assert admission.admit(run, lambda: made.append(2) or "y") is None
    assert made == [1]  # a refused run gets no supervisor made


def test_max_starting_bounds_runs_not_yet_running() -> None:
    admission: Admission[str] = Admission(10, 2)
    a, b = ids(2)
    admission.admit(a, lambda: "a")
    admission.admit(b, lambda: "b")
    assert admission.free() == 0  # two starting: the bound
    assert admission.running(a) is True  # frees a start slot: poll now
    assert admission.free() == 1
    assert admission.booting() == [b]


def test_running_twice_or_unknown_frees_nothing() -> None:
    admission: Admission[str] = Admission(None, 2)
    run = uuid.uuid4()
    admission.admit(run, lambda: "s")
    assert admission.running(run) is True
    assert admission.running(run) is False
    assert admission.running(uuid.uuid4()) is False


def test_running_says_nothing_to_do_without_max_starting() -> None:
    admission: Admission[str] = Admission(None, 0)
    run = uuid.uuid4()
    admission.admit(run, lambda: "s")
    assert admission.running(run) is False
    assert admission.free() is None


def test_a_run_stops_counting_as_starting_after_the_patience() -> None:
    clock = Clock()
    admission: Admission[str] = Admission(None, 1, patience=120, clock=clock)
    admission.admit(uuid.uuid4(), lambda: "s")
    assert admission.free() == 0
    clock.now += 119
    assert admission.free() == 0
    clock.now += 2
    assert admission.free() == 1
    assert admission.booting() == []


def test_adopted_runs_count_for_the_limit_but_are_not_starting() -> None:
    admission: Admission[str] = Admission(3, 1)
    admission.admit(uuid.uuid4(), lambda: "adopted", booting=False)
    admission.admit(uuid.uuid4(), lambda: "adopted", booting=False)
    assert admission.free() == 1  # the limit (3 - 2) and one start slot
    admission.admit(uuid.uuid4(), lambda: "new")
    assert admission.free() == 0


def test_concurrent_admissions_never_pass_the_limit() -> None:
    admission: Admission[int] = Admission(5, 0)
    barrier = threading.Barrier(40)
    admitted = []

    def claim(n: int) -> None:
        barrier.wait()
        if admission.admit(uuid.uuid4(), lambda: n) is not None:
            admitted.append(n)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5 and len(admission) == 5


def test_supervisors_is_a_snapshot() -> None:
    admission: Admission[str] = Admission(None, 0)
    run = uuid.uuid4()
    admission.admit(run, lambda: "s")
    snapshot = admission.supervisors()
    admission.release(run)
    assert snapshot == {run: "s"}
    assert run not in admission


def test_other_starts_count_against_max_starting_only() -> None:
    others = [2]
    admission: Admission[str] = Admission(10, 3, also_starting=lambda: others[0])
    admission.admit(uuid.uuid4(), lambda: "a")
    assert admission.free() == 0  # 3 - one run of ours starting - two of other workers
    others[0] = 0
    assert admission.free() == 2
    unbounded: Admission[str] = Admission(10, 0, also_starting=lambda: 5)
    assert unbounded.free() == 10  # no --max-starting: others' starts bound nothing


def test_the_typical_start_is_the_median_of_the_last_claim_to_running() -> None:
    clock = Clock()
    admission: Admission[str] = Admission(None, 2, clock=clock)
    assert admission.typical_start() == FIRST_START_GUESS  # none timed yet
    for seconds in (1.0, 9.0, 2.0):
        run = uuid.uuid4()
        admission.admit(run, lambda: "s")
        clock.now += seconds
        admission.running(run)
    assert admission.typical_start() == 2.0
