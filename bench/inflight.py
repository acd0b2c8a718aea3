"""Many runs in flight (issue 19, goal 4): the worker's memory, threads and CPU while quiet,
long-running flow runs run, at growing numbers in flight (1, then 10, then 50 by default).

Each level adds runs whose container only sleeps (the job's `command`: `sleep`), marks them
RUNNING as a flow's engine would, waits until the worker has settled, then measures the
worker's process tree over a window: RSS (VmRSS sum), threads, and CPU as a share of one core.
The runs are cancelled at the end. Why not a Prefect flow that sleeps: 50 Prefect engines at
once wedge the bench's SQLite server (it stopped answering /api/health, 600+ connections
open), which measures the server, not the worker. Only the worker is measured: its CPU counts
in its own process time, so other load on the machine changes wall times, not these numbers.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from procmon import cpu_seconds, descendants, rss_mib
from testrig.prefect_rig import PrefectRig

SLEEP_SECONDS = 3600  # long enough never to end by itself during a bench


def threads(root: int) -> int:
    """Threads of the process tree (the Threads: line of each /proc/<pid>/status)."""
    total = 0
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def wait_running(rig: PrefectRig, run_ids: list[str], timeout: float) -> float:
    """Seconds until every run is RUNNING: each is marked so once the worker has started its
    container (PENDING, infrastructure_pid set); raises if one ends or time runs out."""
    started = time.monotonic()
    pending = set(run_ids)
    while pending:
        for run_id in list(pending):
            run = rig.read_flow_run(run_id)
            state = (run.get("state") or {}).get("type")
            if state == "PENDING" and run.get("infrastructure_pid"):
                rig.set_state(run_id, "RUNNING")
            elif state == "RUNNING":
                pending.discard(run_id)
            elif state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                raise RuntimeError(f"run {run_id} ended ({state}) before the measurement")
        if pending and time.monotonic() - started > timeout:
            raise RuntimeError(f"{len(pending)} of {len(run_ids)} runs not RUNNING "
                               f"after {timeout:.0f} s")
        if pending:
            time.sleep(1.0)
    return time.monotonic() - started


def inflight_workload(pid: int, rig: PrefectRig, pool: str, job_variables: dict[str, Any],
                      levels: tuple[int, ...], window: float, settle: float
                      ) -> dict[str, Any]:
    """The worker (`pid`) at each number of runs in flight; every run cancelled at the end."""
    deployment = rig.create_deployment(
        pool, "flows.py:sleepy", {**job_variables, "command": f"sleep {SLEEP_SECONDS}"})
    run_ids: list[str] = []
    result: dict[str, Any] = {"levels": list(levels), "window_s": window, "settle_s": settle}
    try:
        for level in levels:
            new = [rig.create_flow_run(deployment) for _ in range(level - len(run_ids))]
            run_ids += new
            boot = wait_running(rig, run_ids, timeout=60 + 10 * len(new))
            time.sleep(settle)  # the runs age: the worker reads an old run's usage less often
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            rss_samples, thread_samples = [], []
            while time.monotonic() - t0 < window:
                rss_samples.append(rss_mib(pid))
                thread_samples.append(threads(pid))
                time.sleep(1.0)
            cpu = cpu_seconds(pid) - cpu0
            result[str(level)] = {
                "rss_mib": max(rss_samples),
                "threads": max(thread_samples),
                "cpu_pct_of_core": 100 * cpu / (time.monotonic() - t0),
                "all_running_after_s": boot,
            }
            print(f"  {level} in flight: {result[str(level)]}", flush=True)
    finally:
        for run_id in run_ids:  # best effort: the pool's containers are removed anyway
            with contextlib.suppress(Exception):
                rig.set_state(run_id, "CANCELLING", force=True)
    return result
