"""The floor of a burst on this machine, and where a burst's CPU goes (issue 19, goal 2).

The floor is the rate the machine allows when nothing but a run's unavoidable parts use its
CPU: the flow container (Prefect's engine), the Prefect server answering it and the Docker
engine starting it. `bare_burst` measures it with no worker at all: this process sets each
run PENDING (as a worker's claim would) and runs its container itself with the Docker SDK, as
dockerworker does by default (the entry script, host network for the loopback server, an
init process), `cores` at a time so no run waits on another's import. Its CPU per run is the
machine's busy time over the burst (/proc/stat) less this process's own; the floor is
`cores × 60 / CPU per run` runs/min. The same `CpuAccount` splits a worker's burst into the
worker, the server, the Docker daemons, the containers (their cgroup), the rest of the
machine and idle time: what a worker's burst loses against the floor.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
from procmon import cpu_seconds
from testrig.prefect_rig import FLOWS_IMAGE, PrefectRig

from dockerworker.entry import entry_command

T = TypeVar("T")
_TICK = os.sysconf("SC_CLK_TCK")
DOCKER_DAEMONS = ("dockerd", "containerd")  # their shims exit with their containers: "rest"
LABEL = "io.dockerworker.bench-floor"  # the bare burst's containers, for the clean-up
# All containers' CPU, removed ones included (a parent cgroup keeps its children's usage):
# cgroup v1 and v2 with Docker's cgroupfs driver. Under systemd's driver: None (in "rest").
CONTAINERS_CGROUP = (
    (Path("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage"), None, 1e-9),
    (Path("/sys/fs/cgroup/docker/cpu.stat"), "usage_usec", 1e-6),
)


def machine_busy_seconds() -> float:
    """CPU time every core spent not idle (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def containers_cpu_seconds() -> float | None:
    """CPU of all containers since the engine started, or None where it cannot be read."""
    for path, key, unit in CONTAINERS_CGROUP:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            text = path.read_text()
            if key is None:
                return int(text.split()[0]) * unit
            return next(int(v) for k, v in (ln.split() for ln in text.splitlines())
                        if k == key) * unit
    return None


def daemons_cpu_seconds() -> float:
    """Own CPU of the Docker daemons' processes (not their children: the containers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if (entry / "comm").read_text().strip() in DOCKER_DAEMONS:
                text = (entry / "stat").read_text()
                fields = text[text.rindex(")") + 2:].split()
                total += int(fields[11]) + int(fields[12])
    return total / _TICK


def own_cpu_seconds() -> float:
    """This bench process's CPU (all its threads): its requests, its polling."""
    times = os.times()
    return times.user + times.system


class CpuAccount:
    """CPU seconds by part of the machine over one measured stretch."""

    def __init__(self, server_pid: int, worker_pids: list[int]) -> None:
        self.server_pid = server_pid
        self.worker_pids = worker_pids

    def snapshot(self) -> dict[str, float | None]:
        return {
            "time": time.monotonic(),
            "machine": machine_busy_seconds(),
            "bench": own_cpu_seconds(),
            "workers": sum(cpu_seconds(pid) for pid in self.worker_pids),
            "server": cpu_seconds(self.server_pid),
            "docker": daemons_cpu_seconds(),
            "containers": containers_cpu_seconds(),
        }

    def measure(self, work: Callable[[], T], runs: int) -> tuple[T, dict[str, float | None]]:
        """Run `work`; return its result and CPU seconds per run by part: workers, server,
        docker (daemons), containers, rest (the machine less those and this process), and
        idle (the cores' time nobody used)."""
        before = self.snapshot()
        result = work()
        after = self.snapshot()
        delta = {k: (a - b if a is not None and (b := before[k]) is not None else None)
                 for k, a in after.items()}
        wall, busy = delta.pop("time") or 0.0, delta.pop("machine") or 0.0
        parts = ("workers", "server", "docker", "containers")
        known = sum(v for k in parts if (v := delta[k]) is not None) + (delta["bench"] or 0.0)
        share = {k: (v / runs if (v := delta[k]) is not None else None) for k in parts}
        share["rest"] = (busy - known) / runs
        share["idle"] = ((os.cpu_count() or 1) * wall - busy) / runs
        share["bench"] = (delta["bench"] or 0.0) / runs
        share["busy"] = (busy - (delta["bench"] or 0.0)) / runs
        return result, share


def run_bare(client: docker.DockerClient, rig: PrefectRig, server_url: str, run_id: str) -> int:
    """One run PENDING, then its container from create to removal; its exit code."""
    rig.set_state(run_id, "PENDING")
    container = client.containers.create(
        FLOWS_IMAGE, command=entry_command(), network_mode="host", init=True, stdin_open=True,
        labels={LABEL: "1"},
        environment={"PREFECT_API_URL": server_url, "PREFECT__FLOW_RUN_ID": run_id},
    )
    try:
        container.start()
        return int(container.wait(timeout=600)["StatusCode"])
    finally:
        container.remove(force=True)


def bare_burst(client: docker.DockerClient, rig: PrefectRig, server_url: str, server_pid: int,
               deployment: str, runs: int,
               wait_final: Callable[[list[str]], list[dict[str, Any]]]) -> dict[str, Any]:
    """The floor: `runs` runs of `deployment` with no worker, `cores` at a time."""
    cores = os.cpu_count() or 1
    account = CpuAccount(server_pid, [])
    exit_codes: list[int] = []
    lock = threading.Lock()

    def burst() -> list[dict[str, Any]]:
        ids = [rig.create_flow_run(deployment) for _ in range(runs)]

        def one(run_id: str) -> None:
            code = run_bare(client, rig, server_url, run_id)
            with lock:
                exit_codes.append(code)

        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(one, ids))
        return wait_final(ids)

    try:
        final, cpu = account.measure(burst, runs)
    finally:
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
    per_run = cpu["busy"] or 0.0
    parts = cpu["server"] or 0.0, cpu["docker"] or 0.0, cpu["containers"]
    return {
        "cores": cores, "runs": final, "exit_codes": exit_codes,
        "cpu_per_run": cpu,
        "floor_runs_per_min": cores * 60 / per_run if per_run else None,
        # the narrower floor: the container and the server only
        "floor_container_server_runs_per_min": (
            cores * 60 / (parts[2] + parts[0]) if parts[2] else None),
    }
