"""Each run's resource report (resources.py): the readings, the sampler's life, the line."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from dockerworker import metrics
from dockerworker.api import StateType
from dockerworker.containers import LABEL_FLOW_RUN_ID, LABEL_WORKER, ExitReport
from dockerworker.resources import Seen, Usage, UsageWatch, parse_stats, resource_line
from dockerworker.runtime import EngineUnavailable, Workload

from .fakes import Script, make_worker, settle, wait_until

MIB = 1024 * 1024
T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def reading(seconds: float, peak_mib: float, cpu_s: float, limit_mib: int = 512) -> Usage:
    return Usage(read_at=at(seconds), memory=int(peak_mib * MIB) // 2, peak=int(peak_mib * MIB),
                 limit=limit_mib * MIB, cpu_ns=int(cpu_s * 1e9))


# --- the engine's answer ---------------------------------------------------------------------
def test_a_cgroup_v1_answer_is_a_reading_with_the_cgroup_s_own_peak() -> None:
    usage = parse_stats({
        "read": "2026-11-30T03:53:57.961249401Z",
        "memory_stats": {"usage": 116797440, "max_usage": 169517056, "limit": 536870912},
        "cpu_stats": {"cpu_usage": {"total_usage": 484510886}},
    })
    assert usage == Usage(read_at=datetime(2026, 11, 30, 3, 53, 57, 961249, tzinfo=UTC),
                          memory=116797440, peak=169517056, limit=536870912,
                          cpu_ns=484510886)


def test_the_answer_for_a_container_that_is_not_running_is_no_reading() -> None:
    assert parse_stats({"read": "0001-01-01T00:00:00Z", "memory_stats": {},
                        "cpu_stats": {"cpu_usage": {"total_usage": 0}}}) is None


def test_a_cgroup_v2_answer_has_no_peak_and_the_highest_reading_is_a_lower_bound() -> None:
    seen = Seen()
    for usage_mib in (50, 120, 80):
        seen.add(parse_stats({"read": "2026-11-30T03:53:57Z",
                              "memory_stats": {"usage": usage_mib * MIB, "limit": 512 * MIB},
                              "cpu_stats": {"cpu_usage": {"total_usage": 10}}}))
    assert seen.peak == 120 * MIB and not seen.peak_is_cgroup
    report = ExitReport(0, False, "", started=at(0), finished=at(3), memory_limit=512 * MIB)
    line = resource_line(report, seen)
    assert "memory at least 120.0 MiB of 512 MiB limit (23 %)" in line
    assert "the engine gives no peak" in line


# --- the line ----------------------------------------------------------------------------------
def test_the_line_gives_peak_against_limit_cpu_wall_exit_and_image() -> None:
    seen = Seen()
    seen.add(reading(2.0, 150.0, 1.0))
    seen.add(reading(4.7, 212.4, 3.2))
    report = ExitReport(0, False, "", started=at(0), finished=at(5.1),
                        image="dockerworker/prefect:3.9.1-local", memory_limit=512 * MIB)
    before = metrics.sample("dockerworker_run_peak_memory_ratio_count")
    assert resource_line(report, seen) == (
        "resources: peak memory 212.4 MiB of 512 MiB limit (41 %), CPU 3.2 s, wall 5.1 s, "
        "exit 0, image dockerworker/prefect:3.9.1-local; memory and CPU as read 0.4 s before "
        "the end")
    assert metrics.sample("dockerworker_run_peak_memory_ratio_count") == before + 1


def test_a_run_without_a_limit_or_readings_says_what_is_unknown() -> None:
    report = ExitReport(137, True, "", started=at(0), finished=at(0.3), image="busybox")
    line = resource_line(report, Seen())
    assert line == ("resources: peak memory unknown, CPU unknown, wall 0.3 s, "
                    "exit 137 (out of memory), image busybox; the container ended before "
                    "its usage could be read")
    seen = Seen()
    seen.add(reading(0.2, 10, 0.1))
    assert "peak memory 10.0 MiB (no mem_limit)" in resource_line(
        ExitReport(0, False, ""), seen)
    assert "wall unknown" in resource_line(ExitReport(0, False, ""), seen)


def test_a_warm_container_s_figures_say_they_count_from_its_start() -> None:
    line = resource_line(ExitReport(0, False, ""), Seen(), warm=True)
    assert line.endswith("a warm container: counted from its start, before the hand-over")


# --- the sampler ---------------------------------------------------------------------------------
class Readings:
    """A runtime with only `usage`: each container's scripted readings, in turn."""

    def __init__(self, readings: dict[str, list[Usage | Exception]],
                 gate: threading.Event | None = None) -> None:
        self.readings = readings
        self.gate = gate
        self.calls: list[str] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self._lock = threading.Lock()

    def usage(self, workload: Workload) -> Usage | None:
        with self._lock:
            self.calls.append(workload.id)
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            if self.gate is not None:
                self.gate.wait(5)
            queue = self.readings.get(workload.id) or [None]
            item = queue.pop(0) if len(queue) > 1 else queue[0]
            if isinstance(item, Exception):
                raise item
            return item
        finally:
            with self._lock:
                self.concurrent -= 1


def fast_watch(runtime) -> UsageWatch:
    return UsageWatch(runtime, first=0.0, every_min=0.01, every_max=0.01, rate=1000)


def test_the_readings_add_up_to_the_peak_and_the_latest_cpu() -> None:
    runtime = Readings({"a": [reading(1, 100, 1.0), EngineUnavailable("restarting"),
                              reading(2, 180, 2.5), reading(3, 180, 4.0)]})
    watch = fast_watch(runtime)
    workload = Workload("a", "a")
    watch.watch(workload)
    wait_until(lambda: len(runtime.calls) >= 5)
    seen = watch.release(workload)
    assert seen.peak == 180 * MIB and seen.peak_is_cgroup
    assert seen.cpu_ns == int(4.0e9) and seen.last_read == at(3)
    wait_until(lambda: not watch.active)  # no thread is left behind


def test_no_thread_while_nothing_is_watched_and_one_again_when_needed() -> None:
    runtime = Readings({})
    watch = fast_watch(runtime)
    assert not watch.active
    for name in ("a", "b"):
        workload = Workload(name, name)
        watch.watch(workload)
        assert watch.active
        wait_until(lambda: runtime.calls)
        watch.release(workload)
        wait_until(lambda: not watch.active)
        runtime.calls.clear()
    assert not any(t.name.startswith("usage-") for t in threading.enumerate())


def test_readings_due_together_are_taken_together() -> None:
    """The engine's stats collector answers readings that wait together at one tick."""
    gate = threading.Event()
    runtime = Readings({}, gate)
    watch = UsageWatch(runtime, first=0.2, every_min=5, every_max=5)
    workloads = [Workload(str(n), str(n)) for n in range(4)]
    for workload in workloads:
        watch.watch(workload)
    wait_until(lambda: runtime.concurrent == 4)
    gate.set()
    for workload in workloads:
        watch.release(workload)
    assert runtime.most_concurrent == 4
    wait_until(lambda: not watch.active)


def test_release_waits_for_a_reading_under_way() -> None:
    gate = threading.Event()
    runtime = Readings({"a": [reading(1, 64, 0.5)]}, gate)
    watch = fast_watch(runtime)
    workload = Workload("a", "a")
    watch.watch(workload)
    wait_until(lambda: runtime.concurrent == 1)
    threading.Timer(0.1, gate.set).start()
    assert watch.release(workload).peak == 64 * MIB


def test_young_containers_are_read_often_old_ones_at_a_tenth_of_their_age() -> None:
    watch = UsageWatch(Readings({}))
    assert watch._interval(2) == 1.0
    assert watch._interval(30) == 3.0
    assert watch._interval(120) == 12.0
    assert watch._interval(3600) == 30.0  # a long run: a reading costs CPU, 50 runs add up


def test_all_readings_together_keep_to_the_budget_however_many_young_runs_are_watched() -> None:
    """50 young runs read every second each would be 50 readings a second (~17 % of a core):
    the budget holds them all to `rate`, and every container still gets its readings."""
    runtime = Readings({})
    watch = UsageWatch(runtime, first=0.0, every_min=0.01, every_max=0.01, batch=8, rate=20)
    workloads = [Workload(str(n), str(n)) for n in range(30)]
    began = time.monotonic()
    for workload in workloads:
        watch.watch(workload)
    wait_until(lambda: set(runtime.calls) == {w.id for w in workloads})
    time.sleep(0.5)
    calls, elapsed = len(runtime.calls), time.monotonic() - began
    assert calls <= 8 + 20 * elapsed + 1  # the bucket's 8, then 20 a second
    for workload in workloads:
        watch.release(workload)
    wait_until(lambda: not watch.active)


def test_a_container_never_read_is_read_before_those_read_already() -> None:
    """Under the budget, a new container's first reading waits for no other: without one its
    line says "unknown" (a short run's only chance)."""
    runtime = Readings({str(n): [reading(1, 64, 0.5)] for n in range(5)})
    watch = UsageWatch(runtime, first=0.0, every_min=0.01, every_max=0.01, batch=1, rate=5)
    old = [Workload(str(n), str(n)) for n in range(5)]
    for workload in old:
        watch.watch(workload)
    wait_until(lambda: all(watch._watched[w.id].seen.readings for w in old))  # overdue again
    with watch._cond:
        before = len(runtime.calls)
        watch.watch(new := Workload("new", "new"))
    wait_until(lambda: "new" in runtime.calls)
    assert runtime.calls.index("new") <= before + 1  # at most the one already under way
    for workload in [*old, new]:
        watch.release(workload)
    wait_until(lambda: not watch.active)


# --- in a run -----------------------------------------------------------------------------------
def test_a_run_s_log_carries_its_resource_line(api, runtime) -> None:
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(
        hold=hold, usage=[reading(1, 100, 0.5), reading(2, 150, 1.5)],
        image="flows/etl:2", memory_limit=512 * MIB)
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: runtime.usage_reads >= 2)
    hold.set()
    settle(worker)
    assert worker.shipper.flush(5)
    lines = [m for m in api.messages(run.id) if m.startswith("resources:")]
    assert len(lines) == 1
    assert lines[0].startswith("resources: peak memory 150.0 MiB of 512 MiB limit (29 %), "
                               "CPU 1.5 s, wall ")
    assert ", exit 0, image flows/etl:2; memory and CPU as read " in lines[0]
    wait_until(lambda: not worker.usage.active)


def test_a_run_too_short_to_be_read_still_gets_its_line(api, runtime) -> None:
    runtime.script_for = lambda spec: Script(exit_code=2, final_state=StateType.FAILED)
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    assert worker.shipper.flush(5)
    line = next(m for m in api.messages(run.id) if m.startswith("resources:"))
    assert "peak memory unknown, CPU unknown" in line and "exit 2" in line
    assert "the container ended before its usage could be read" in line


def test_a_runtime_that_reads_no_usage_says_so_and_blames_no_short_run(api, runtime) -> None:
    """Swarm jobs (the task's node has the figures): nothing is sampled, and the line says
    why rather than "the container ended before its usage could be read"."""
    runtime.unread = "memory and CPU are not read for Swarm jobs (the task's node has them)"
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold, usage=[reading(1, 100, 0.5)],
                                             image="flows/etl:2")
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: runtime.of_run(run.id) is not None)
    time.sleep(0.5)  # a sampler would have read it by now (its first reading is at 0.25 s)
    hold.set()
    settle(worker)
    assert worker.shipper.flush(5)
    line = next(m for m in api.messages(run.id) if m.startswith("resources:"))
    assert line.startswith("resources: peak memory unknown, CPU unknown, wall ")
    assert line.endswith("; memory and CPU are not read for Swarm jobs (the task's node has "
                         "them)"), line
    assert "ended before its usage could be read" not in line
    assert runtime.usage_reads == 0 and not worker.usage.active


def test_an_adopted_container_s_line_covers_its_whole_run(api, runtime) -> None:
    """The cgroup's peak and CPU count from the container's start: a worker that adopts it
    after a restart reports the whole run."""
    run = api.add_run(state=StateType.RUNNING)
    hold = threading.Event()
    runtime.add("etl-1", {LABEL_WORKER: "w1", LABEL_FLOW_RUN_ID: str(run.id)},
                Script(hold=hold, usage=[reading(40, 300, 35.0, limit_mib=1024)],
                       memory_limit=1024 * MIB), run_id=run.id)
    worker = make_worker(api, runtime)
    wait_until(lambda: runtime.usage_reads >= 1)
    hold.set()
    settle(worker)
    assert worker.shipper.flush(5)
    line = next(m for m in api.messages(run.id) if m.startswith("resources:"))
    assert line.startswith("resources: peak memory 300.0 MiB of 1024 MiB limit (29 %), CPU 35.0 s")


def test_the_line_is_masked(api, runtime) -> None:
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold, image="registry/s3cr3t-token:1")
    run = api.add_run()
    worker = make_worker(api, runtime, api_key="s3cr3t-token")
    worker.poll()
    hold.set()
    settle(worker)
    assert worker.shipper.flush(5)
    line = next(m for m in api.messages(run.id) if m.startswith("resources:"))
    assert "s3cr3t-token" not in line and "image registry/" in line
