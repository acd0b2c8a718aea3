"""The in-container entry command: `prefect flow-run execute` vs `python -m prefect.engine`,
and dockerworker's default: the engine behind its entry script (dockerworker/entry.py).

    .venv/bin/python bench/entrypoint.py [--runs N]     # default 3 runs per command

One throwaway Prefect server on a loopback port and no worker: per measurement this creates a
flow run of a `flows.py:hello` deployment, sets it PENDING (as a worker does) and runs the
container itself with the Docker SDK, as dockerworker would (image FLOWS_IMAGE, env
PREFECT_API_URL + PREFECT__FLOW_RUN_ID, network_mode host, init=True), with one command or the
other; the commands alternate, after one unmeasured warm-up run of each. Per container, from
its cgroup (polled every 20 ms while it runs; v1 or v2): peak memory (max usage, which counts
page cache charged to the container), peak RSS (sampled), CPU seconds; wall time from Docker's
StartedAt to FinishedAt; and the run's final state, which must be COMPLETED.
Results: a table of medians on stdout and bench-results/entrypoint-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from testrig.prefect_rig import (
    FLOWS_IMAGE,
    PrefectRig,
    build_flow_image,
    start_prefect_server,
    state_type,
)

from dockerworker.entry import entry_command

REPO_DIR = Path(__file__).resolve().parent.parent

COMMANDS: dict[str, str | list[str]] = {
    "prefect flow-run execute": "prefect flow-run execute",
    "python -m prefect.engine": "python -m prefect.engine",
    "entry script (dockerworker)": entry_command(),
}
LABEL = "io.dockerworker.bench"  # every container this script starts, for the clean-up
CGROUP = Path("/sys/fs/cgroup")
MiB = 1024 * 1024


def read_int(path: Path, key: str | None = None) -> int:
    """An integer cgroup file, or the `key value` line `key` of a flat-keyed one."""
    text = path.read_text()
    if key is None:
        return int(text.split()[0])
    return next(int(v) for k, v in (line.split() for line in text.splitlines()) if k == key)


def cgroup_reader(container_id: str) -> Any:
    """A function returning (max usage bytes, rss bytes, cpu ns) of the container's cgroup."""
    v1 = CGROUP / "memory" / "docker" / container_id
    if v1.is_dir():
        cpu = CGROUP / "cpuacct" / "docker" / container_id / "cpuacct.usage"
        return lambda: (read_int(v1 / "memory.max_usage_in_bytes"),
                        read_int(v1 / "memory.stat", "total_rss"), read_int(cpu))
    for v2 in (CGROUP / "docker" / container_id,
               CGROUP / "system.slice" / f"docker-{container_id}.scope"):
        if v2.is_dir():  # memory.peak needs Linux 5.19; else the sampled current usage
            peak = v2 / "memory.peak" if (v2 / "memory.peak").exists() else v2 / "memory.current"
            return lambda: (read_int(peak), read_int(v2 / "memory.stat", "anon"),
                            read_int(v2 / "cpu.stat", "usage_usec") * 1000)
    raise RuntimeError(f"no cgroup found for container {container_id[:12]}")


def seconds(start: str, end: str) -> float:
    """Docker's FinishedAt - StartedAt (nanoseconds cut to micro)."""
    def parse(value: str) -> datetime:
        head, _, frac = value.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")
    return (parse(end) - parse(start)).total_seconds()


def measure(client: docker.DockerClient, rig: PrefectRig, server_url: str, deployment: str,
            command: str) -> dict[str, Any]:
    """One flow run in one container running `command`; its cgroup figures and outcome."""
    run_id = rig.create_flow_run(deployment)
    rig.set_state(run_id, "PENDING")
    container = client.containers.create(
        FLOWS_IMAGE, command=COMMANDS[command], network_mode="host", init=True,
        labels={LABEL: "1"}, stdin_open=True,
        environment={"PREFECT_API_URL": server_url, "PREFECT__FLOW_RUN_ID": run_id},
    )
    try:
        container.start()
        read = cgroup_reader(container.id)
        peak = rss = cpu = 0
        while True:
            try:
                peak, sampled_rss, cpu = read()
            except (OSError, StopIteration, ValueError):
                break  # the cgroup is gone: the container exited
            rss = max(rss, sampled_rss)
            time.sleep(0.02)
        exit_code = container.wait(timeout=600)["StatusCode"]
        container.reload()
        state = container.attrs["State"]
        run = rig.wait_for_final(run_id, timeout=30)
        return {"command": command, "flow_run_id": run_id, "exit_code": exit_code,
                "state": state_type(run), "peak_mib": peak / MiB, "peak_rss_mib": rss / MiB,
                "cpu_s": cpu / 1e9, "wall_s": seconds(state["StartedAt"], state["FinishedAt"])}
    finally:
        container.remove(force=True)


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median of each figure per command."""
    keys = ("peak_mib", "peak_rss_mib", "cpu_s", "wall_s")
    return {c: {k: statistics.median(r[k] for r in rows if r["command"] == c) for k in keys}
            for c in COMMANDS}


def table(medians: dict[str, dict[str, float]], runs: int) -> str:
    lines = [f"median of {runs} runs, flows.py:hello, {os.cpu_count()} cores",
             "| command | peak memory | peak RSS | CPU per run | wall |", "|---|---|---|---|---|"]
    for command, m in medians.items():
        lines.append(f"| `{command}` | {m['peak_mib']:.0f} MiB | {m['peak_rss_mib']:.0f} MiB "
                     f"| {m['cpu_s']:.2f} s | {m['wall_s']:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per command")
    args = parser.parse_args(argv)
    client = docker.from_env()
    print(f"building {FLOWS_IMAGE} ...", flush=True)
    build_flow_image(client)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    server = start_prefect_server()
    rig = PrefectRig(server.url)
    rows: list[dict[str, Any]] = []
    try:
        pool = f"bench-entrypoint-{stamp}"
        rig.create_work_pool(pool)
        deployment = rig.create_deployment(pool, "flows.py:hello", {"image": FLOWS_IMAGE})
        for command in COMMANDS:  # warm-up: page cache, server-side first-use costs
            measure(client, rig, server.url, deployment, command)
        for i in range(args.runs):
            for command in COMMANDS:
                row = measure(client, rig, server.url, deployment, command)
                rows.append(row)
                print(f"run {i + 1}: {command:28} {row['state']:10} "
                      f"peak {row['peak_mib']:4.0f} MiB  rss {row['peak_rss_mib']:4.0f} MiB  "
                      f"cpu {row['cpu_s']:5.2f} s  wall {row['wall_s']:5.2f} s", flush=True)
    finally:
        rig.close()
        server.stop()
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            container.remove(force=True)
    medians = summary(rows)
    print()
    print(table(medians, args.runs))
    out = REPO_DIR / "bench-results" / f"entrypoint-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "image": FLOWS_IMAGE,
            "runs": args.runs, "loadavg_after": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "medians": medians, "runs": rows}, indent=2))
    print(f"\nwritten {out.relative_to(REPO_DIR)}")
    failed = [r for r in rows if r["state"] != "COMPLETED" or r["exit_code"] != 0]
    for row in failed:
        print(f"NOT COMPLETED: {row['command']} {row['flow_run_id']} {row['state']} "
              f"exit {row['exit_code']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
