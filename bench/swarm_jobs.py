"""The Swarm-jobs path in numbers (issue 17): how fast one worker submits runs as Swarm jobs,
and how many API calls a run costs, on a Swarm of the bench's own (a second dockerd started
by the test rig, never the machine's engine).

    .venv/bin/python bench/swarm_jobs.py [--runs 20] [--command-only]

One Prefect server (SQLite, loopback) behind a counting proxy (bench/proxy.py); one worker,
`dockerworker start --runtime swarm`, talking to the Swarm manager's socket; a burst of
`--runs` runs created at once. Reported: the worker's submission rate (services created per
second, from the services' own creation times), create→claimed and create→RUNNING, runs/min to
the end, the worker's CPU per run, and its API requests per run by endpoint. With
`--command-only` each job runs `true` instead of a Prefect flow (the runs end CRASHED, which is
fine here): it takes the containers' own CPU out, so what is left is the worker, the server
and Swarm's scheduler. Results: a table on stdout and bench-results/swarm-jobs-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
from procmon import cpu_seconds
from proxy import CountingProxy
from testrig.prefect_rig import (
    FINAL_STATE_TYPES,
    FLOWS_IMAGE,
    PrefectRig,
    build_flow_image,
    start_prefect_server,
    state_type,
)
from testrig.swarm import SwarmEngine

REPO_DIR = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_DIR / "bench-results"
RUN_LABEL = "io.prefect.flow-run-id"


def ts(value: str | None) -> datetime | None:
    """A server timestamp (ISO 8601) as a datetime."""
    return datetime.fromisoformat(value) if value else None


def engine_time(value: str) -> datetime:
    """An engine timestamp (nanoseconds, Z) as a datetime."""
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class ServiceWatch:
    """Each job service's creation time, listed every 0.2 s while the burst runs (the worker
    removes a job's service when its run ends, so they cannot be listed afterwards)."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.created: dict[str, datetime] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for service in self.client.api.services(filters={"label": RUN_LABEL}):
                run_id = service["Spec"]["Labels"][RUN_LABEL]
                self.created.setdefault(run_id, engine_time(service["CreatedAt"]))

    def close(self) -> dict[str, datetime]:
        """Each run's job service's creation time, by run id."""
        self.stop.set()
        self.thread.join()
        return self.created


def claimed_at(rig: PrefectRig, run_id: str) -> datetime | None:
    for state in rig.read_state_history(run_id):
        if state["type"] == "PENDING":
            return ts(state["timestamp"])
    return None


def measure(runs: int, command_only: bool, poll_interval: float,
            max_starting: int | None) -> dict[str, Any]:
    client = docker.from_env()
    build_flow_image(client)
    workdir = Path(tempfile.mkdtemp(prefix="dockerworker-swarm-bench-"))
    swarm = SwarmEngine().start()
    server = start_prefect_server()
    proxy = CountingProxy(server.port)
    api_url = f"http://127.0.0.1:{proxy.start()}/api"
    rig = PrefectRig(server.url)
    worker = None
    try:
        swarm.load_images(client, FLOWS_IMAGE)
        pool = f"swarm-bench-{secrets.token_hex(3)}"
        policy = workdir / "policy.toml"
        policy.write_text("[policy]\nno_new_privileges = false\n")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "DOCKERWORKER_", "DOCKER_"))}
        env.update(PREFECT_API_URL=api_url, DOCKER_HOST=swarm.host, PYTHONUNBUFFERED="1")
        log = open(workdir / "worker.log", "wb")  # noqa: SIM115 - closed with the process
        worker = subprocess.Popen(
            [sys.executable, "-m", "dockerworker.cli", "start", "--pool", pool,
             "--runtime", "swarm", "--policy", str(policy), "--poll-interval",
             str(poll_interval),
             *(["--max-starting", str(max_starting)] if max_starting is not None else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while proxy.first("/get_scheduled_flow_runs") is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "worker.log").read_text()[-3000:])
            time.sleep(0.1)
        # as the tests run Swarm jobs; the flows talk to the server directly, so the proxy
        # counts the worker's requests only
        job: dict[str, Any] = {"image": FLOWS_IMAGE, "env": {"PREFECT_API_URL": server.url}}
        if command_only:
            job["command"] = "true"
        deployment = rig.create_deployment(pool, "flows.py:hello", job)
        time.sleep(2)  # the worker's first rounds are done
        watch = ServiceWatch(swarm.client)
        cpu0, t0 = cpu_seconds(worker.pid), time.monotonic()
        # all due at one moment, past the worker's 10 s prefetch: creating them one by one
        # through the API is slower (~0.6 s each here) than the worker submits them
        due = datetime.now(UTC) + timedelta(seconds=15 + 0.7 * runs)
        scheduled = {"type": "SCHEDULED", "name": "Scheduled",
                     "state_details": {"scheduled_time": due.isoformat()}}
        ids = [rig.create_flow_run(deployment, state=scheduled) for _ in range(runs)]
        finals = [rig.wait_for_final(run_id, timeout=120 + 20 * runs, interval=1.0)
                  for run_id in ids]
        cpu = cpu_seconds(worker.pid) - cpu0
        requests = proxy.between(t0, time.monotonic())
        services = watch.close()
        to_service = [(services[run_id] - due).total_seconds() for run_id in ids
                      if run_id in services]
        claims = [c for run_id in ids if (c := claimed_at(rig, run_id))]
        to_claim = [(c - due).total_seconds() for c in claims]
        starts = [(ts(r["start_time"]) - due).total_seconds()
                  for r in finals if r.get("start_time") and not command_only]
        ended = [ts(r["end_time"]) for r in finals if r.get("end_time")]
        first_claim = min(claims) if claims else due
        submitted_s = ((max(services.values()) - first_claim).total_seconds()
                       if services else None)
        wall = (max(ended) - due).total_seconds() if ended else None
        return {
            "runs": runs, "command_only": command_only, "poll_interval": poll_interval,
            "max_starting": max_starting,
            "states": dict(Counter(str(state_type(r)) for r in finals)),
            "a_state_message": (finals[0].get("state") or {}).get("message"),
            "final": sum(state_type(r) in FINAL_STATE_TYPES for r in finals),
            "services_seen": len(services),
            "first_claim_to_last_service_s": submitted_s,
            "jobs_submitted_per_s": (len(services) / submitted_s) if submitted_s else None,
            "due_to_claimed_median_s": median(to_claim),
            "due_to_service_median_s": median(to_service),
            "due_to_service_max_s": max(to_service) if to_service else None,
            "due_to_running_median_s": median(starts),
            "wall_s": wall,
            "runs_per_min": (runs / wall * 60) if wall else None,
            "worker_cpu_s_per_run": cpu / runs,
            "api_requests_per_run": len(requests) / runs,
            "breakdown": CountingProxy.breakdown(requests),
        }
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(30)
        rig.close()
        proxy.stop()
        server.stop()
        swarm.stop()


def engine_floor(swarm: SwarmEngine, runs: int, threads: int) -> float:
    """Jobs/s the manager itself takes: `runs` one-shot services of `true` created by
    `threads` callers at once through the SDK (the worker's own call), then removed."""
    from concurrent.futures import ThreadPoolExecutor

    def create(index: int) -> str:
        service = swarm.client.services.create(
            FLOWS_IMAGE, ["true"], name=f"floor-{secrets.token_hex(3)}-{index}",
            mode=docker.types.ServiceMode("replicated-job", concurrency=1, replicas=1),
            restart_policy=docker.types.RestartPolicy(condition="none"),
            labels={"bench": "floor"})
        return service.id

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        ids = list(pool.map(create, range(runs)))
    rate = runs / (time.monotonic() - started)
    for service_id in ids:
        swarm.client.api.remove_service(service_id)
    return rate


def floors(runs: int) -> dict[str, float]:
    """The manager's own rate, by callers at once (no Prefect, no worker)."""
    client = docker.from_env()
    build_flow_image(client)
    swarm = SwarmEngine().start()
    try:
        swarm.load_images(client, FLOWS_IMAGE)
        return {f"{threads} at once": engine_floor(swarm, runs, threads) for threads in (1, 4)}
    finally:
        swarm.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="runs in the burst (default 20)")
    parser.add_argument("--command-only", action="store_true",
                        help="each job runs `true`, not a Prefect flow")
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="the worker's poll interval (default 5, the worker's default)")
    parser.add_argument("--max-starting", type=int,
                        help="the worker's --max-starting (default: its own, the CPU count; "
                             "0: no bound, the submission ceiling)")
    parser.add_argument("--engine-floor", action="store_true",
                        help="only measure how many job services per second the manager "
                             "itself creates (no worker, no Prefect)")
    args = parser.parse_args(argv)
    if args.engine_floor:
        for label, rate in floors(args.runs).items():
            print(f"manager creates {rate:.2f} job services/s ({label})")
        return 0
    result = measure(args.runs, args.command_only, args.poll_interval, args.max_starting)
    if result["services_seen"] < args.runs:
        print(f"only {result['services_seen']} of {args.runs} jobs were submitted: "
              f"{result['a_state_message']}", file=sys.stderr)
    for key, value in result.items():
        if key != "breakdown":
            print(f"{key:<34} {value}")
    print("requests by endpoint (whole burst):")
    for endpoint, count in sorted(result["breakdown"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:>5}  {endpoint}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"swarm-jobs-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written {out.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
