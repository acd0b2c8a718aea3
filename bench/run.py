"""Side-by-side benchmark: dockerworker vs prefect-docker's worker on one real Prefect server.

    .venv/bin/python bench/run.py            # full: 10 sequential runs, burst of 30, 20k log lines
    .venv/bin/python bench/run.py --quick    # smoke run with small numbers (no deps workload)
    .venv/bin/python bench/run.py --quick --deps
    make bench BENCH_ARGS="--burst 50"

One Prefect server on a free loopback port (temp PREFECT_HOME, analytics off). Each worker gets
its own pool (prefect-docker's default template) and its own counting proxy in front of the
server; the flows' own API traffic goes straight to the server (job env PREFECT_API_URL), so
the proxy counts the worker's requests only. prefect-docker's worker runs from its own venv
(bench/.venv, created on first use), dockerworker from bench/.venv-dockerworker (this checkout
with its runtime dependencies only, as operators install it; no prefect). `dockerworker-warm`
is dockerworker with `--warm 2` (sequential, scheduled-ahead and burst workloads only); the
scheduled-ahead workload (`--ahead`, off with --quick) times runs created 25 s before they are
due, each of a job configuration not seen before; `dockerworker-x3` is three
dockerworker replicas on one pool (burst only). Workers run one after the other, never together.
Before them and again after them, the floor (bench/floor.py): the same burst with no worker,
its CPU per run and the runs/min the machine's cores allow at that cost (from the cheaper of
the two: one burst's CPU per run moves by a tenth or more, and noise only ever adds CPU);
each worker's burst is split by CPU the same way.
The deps workload (`--deps`, on in a full run) times a deployment that needs one package:
dockerworker builds it into an image once, prefect-docker's EXTRA_PIP_PACKAGES entrypoint
installs it at every container start.
Results: a table on stdout and bench-results/bench-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import docker
import docker.errors
from floor import CpuAccount, bare_burst
from inflight import inflight_workload
from procmon import RssSampler, cpu_seconds, rss_mib
from proxy import CountingProxy, Request
from testrig.prefect_rig import (
    FINAL_STATE_TYPES,
    FLOWS_IMAGE,
    POOL_LABEL,
    PREFECT_IMAGE,
    PrefectRig,
    PrefectServer,
    build_flow_image,
    remove_pool_containers,
    start_prefect_server,
    state_type,
)

from dockerworker.jobs import default_base_job_template

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

WORKERS = ("dockerworker", "dockerworker-warm", "dockerworker-x3", "prefect-docker")
WARM_ARGS = ("--warm", "2")  # dockerworker-warm: warm starts on, two waiting containers
REPLICAS = 3  # dockerworker-x3: this many dockerworker processes on one pool (burst only)
PREFECT_DOCKER_REQS = ("prefect==3.9.1", "prefect-docker==0.7.4")
DEFAULT_VENV = BENCH_DIR / ".venv"
DOCKERWORKER_VENV = BENCH_DIR / ".venv-dockerworker"
RESULTS_DIR = REPO_DIR / "bench-results"
POLL_PATH = "/get_scheduled_flow_runs"
_PERIODIC = re.compile(  # poll, heartbeat, pool read, cancellation/reconcile checks, channel
    r"get_scheduled_flow_runs|/workers/heartbeat|/workers/connect|/health"
    r"|^GET /api/work_pools/[^/]+$|^POST /api/flow_runs/filter$"
)
# deps workload: a package the flows image lacks at this version (it holds six 1.17.0)
DEPS_PACKAGE = "six==1.16.0"
DEPS_PRINTED = "six version 1.16.0"  # what flows.py:six_version prints
DEPS_IMAGE = "dockerworker-bench/extra-pip:dev"  # prefect-docker's side, built per bench run
DEPS_IMAGE_CA = "/opt/bench-ca.crt"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BUILD_NETWORK = "host"  # dockerworker's builds; prefect-docker's containers get host (loopback URL)
ENTRYPOINT_SH = """#!/bin/sh
# As prefecthq/prefect's /opt/prefect/entrypoint.sh: install EXTRA_PIP_PACKAGES, then the command.
set -e
if [ -n "$EXTRA_PIP_PACKAGES" ]; then
  echo "+pip install $EXTRA_PIP_PACKAGES"
  pip install $EXTRA_PIP_PACKAGES
fi
exec "$@"
"""


@dataclass
class Plan:
    """What to run; `--quick` shrinks it."""

    sequential: int = 10
    burst: int = 30
    log_lines: int = 20000
    poll_interval: float = 1.0
    idle_seconds: float = 5.0
    run_timeout: float = 300.0
    deps: bool = True
    ca_bundle: str | None = None  # CA bundle pip trusts in the deps workload (both workers)
    dw_args: tuple[str, ...] = ()  # extra `dockerworker start` options (both dockerworker kinds)
    inflight: tuple[int, ...] = (1, 10, 50)  # runs in flight, measured in turn (bench/inflight.py)
    inflight_window: float = 20.0  # seconds measured at each number in flight
    inflight_settle: float = 5.0  # seconds after all are RUNNING before measuring
    floor: bool = True  # the burst with no worker first (bench/floor.py)
    ahead: int = 3  # runs scheduled ahead, each the first of its configuration (0: none)
    ahead_seconds: float = 25.0  # how far ahead of its creation each is scheduled


# --- small helpers ------------------------------------------------------------------------


def ts(value: str | None) -> datetime | None:
    """An ISO timestamp from Prefect or Docker (nanoseconds cut to micro) as an aware datetime."""
    if not value or value.startswith("0001-"):
        return None
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value))


def seconds(start: str | None, end: str | None) -> float | None:
    """`end - start` in seconds, or None when either is missing."""
    a, b = ts(start), ts(end)
    return (b - a).total_seconds() if a and b else None


def median_p95(values: list[float]) -> tuple[float | None, float | None]:
    """Median and 95th percentile (inclusive interpolation); None for no data."""
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=20, method="inclusive")[18]


def per_run_requests(requests: list[Request]) -> list[Request]:
    """Requests that are not periodic (poll, heartbeat, pool read, cancellation checks)."""
    return [r for r in requests if not _PERIODIC.search(r.endpoint)]


def read_runs(rig: PrefectRig, ids: list[str]) -> list[dict[str, Any]]:
    """The flow runs with these ids, 200 per request."""
    runs: list[dict[str, Any]] = []
    for i in range(0, len(ids), 200):
        body = {"flow_runs": {"id": {"any_": ids[i : i + 200]}}, "limit": 200}
        response = rig.http.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        runs.extend(response.json())
    return runs


def claimed_at(rig: PrefectRig, run_id: str) -> str | None:
    """Timestamp of the run's first PENDING state (the worker's claim), from its history."""
    response = rig.http.get("/flow_run_states/", params={"flow_run_id": run_id})
    states = response.json() if response.is_success else []
    return min((st["timestamp"] for st in states if st["type"] == "PENDING"), default=None)


def wait_all_final(rig: PrefectRig, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """Poll until every run is final or `timeout` passes; return the runs as last read."""
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(rig, ids)
        if all(state_type(r) in FINAL_STATE_TYPES for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(1.0)


def ensure_prefect_docker_venv(venv: Path) -> Path:
    """bench/.venv with prefect + prefect-docker pinned (created once); return its `prefect`."""
    marker, prefect = venv / ".bench-requirements", venv / "bin" / "prefect"
    wanted = " ".join(PREFECT_DOCKER_REQS)
    if prefect.exists() and marker.exists() and marker.read_text() == wanted:
        return prefect
    print(f"creating {venv} with {wanted} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         *PREFECT_DOCKER_REQS],
        check=True,
    )
    marker.write_text(wanted)
    return prefect


def install_dockerworker(venv: Path) -> Path:
    """bench/.venv-dockerworker: this checkout installed as an operator installs it (its
    runtime dependencies only, no prefect); reinstalled each run. Returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         "--force-reinstall", "--no-deps", str(REPO_DIR)],
        check=True, cwd=tempfile.gettempdir(),
    )
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(REPO_DIR)], check=True, cwd=tempfile.gettempdir())
    return python


def prefect_docker_template() -> dict[str, Any]:
    """prefect-docker's default base job template (what `work-pool create --type docker` uses)."""
    code = ("import json; from prefect_docker.worker import DockerWorker; "
            "print(json.dumps(DockerWorker.get_default_base_job_template()))")
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
    )
    return json.loads(out.stdout)


# --- one worker ---------------------------------------------------------------------------


class WorkerProcess:
    """A worker subprocess (own session, output to a file) behind its own counting proxy."""

    def __init__(self, kind: str, pool: str, server: PrefectServer, workdir: Path,
                 plan: Plan, prefect_cli: Path | None, dw_python: Path | None,
                 name: str | None = None) -> None:
        self.kind, self.pool = kind, pool
        self.proxy = CountingProxy(server.port)
        api_url = f"http://127.0.0.1:{self.proxy.start()}/api"
        env = {k: v for k, v in os.environ.items()  # no PYTHONPATH: the venv's own code
               if not k.startswith(("PREFECT_", "DOCKERWORKER_")) and k != "PYTHONPATH"}
        env.update(PREFECT_API_URL=api_url, PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        if kind.startswith("dockerworker"):
            assert dw_python is not None
            cmd = [str(dw_python), "-m", "dockerworker.cli", "start", "--pool", pool,
                   "--poll-interval", str(plan.poll_interval)]
            if kind == "dockerworker-warm":
                cmd += WARM_ARGS
            cmd += plan.dw_args  # last: `--dw-args '--warm 3'` sizes dw warm's pool
            if name:  # replicas on one host need a name each
                cmd += ["--name", name]
            env["DOCKERWORKER_BUILD_NETWORK"] = BUILD_NETWORK
            # The deps workload's unique `dockerfile_lines` entry needs the operator's consent.
            policy = workdir / f"policy-{pool}.toml"
            policy.write_text("[policy]\nallow_dockerfile_lines = true\n")
            env["DOCKERWORKER_POLICY_FILE"] = str(policy)
            if plan.ca_bundle:
                env["DOCKERWORKER_BUILD_CA_BUNDLE"] = plan.ca_bundle
        else:
            assert prefect_cli is not None
            home = workdir / f"prefect-home-{pool}"
            home.mkdir()
            env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
                       PREFECT_WORKER_QUERY_SECONDS=str(plan.poll_interval),
                       PREFECT_SERVER_ANALYTICS_ENABLED="false")
            cmd = [str(prefect_cli), "worker", "start", "--pool", pool, "--type", "docker"]
        self.log_path = workdir / f"{name or kind}.log"
        with open(self.log_path, "wb") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=workdir,
            )
        self.pid = self.process.pid

    def tail(self, lines: int = 30) -> str:
        """The end of the worker's output."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_first_poll(self, timeout: float = 120.0) -> float:
        """Seconds from process start to its first poll reaching the proxy."""
        deadline = time.monotonic() + timeout
        while (first := self.proxy.first(POLL_PATH)) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} never polled; its output:\n{self.tail()}")
            time.sleep(0.02)
        return first - self.started

    def stop(self) -> None:
        """SIGTERM the worker's session, SIGKILL after 20 s; stop the proxy."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)
        self.proxy.stop()


def measure_runs(worker: WorkerProcess, run: Callable[[], list[dict[str, Any]]]
                 ) -> tuple[list[dict[str, Any]], float, list[Request]]:
    """Run a workload; return its runs, the worker's CPU seconds and its requests meanwhile."""
    cpu0, t0 = cpu_seconds(worker.pid), time.monotonic()
    runs = run()
    return runs, cpu_seconds(worker.pid) - cpu0, worker.proxy.between(t0, time.monotonic())


def ahead_workload(rig: PrefectRig, deployment: str, job_variables: dict[str, Any],
                   plan: Plan) -> dict[str, Any]:
    """Runs scheduled `plan.ahead_seconds` after their creation, one after another, each the
    first of its job configuration (an env value of its own): whether each started warm
    (warmed ahead: ahead.py), and how late it went RUNNING (the server holds a run claimed
    early until its time: Prefect's WaitForScheduledTime rule)."""
    runs = []
    for _ in range(plan.ahead):
        due = datetime.now(UTC) + timedelta(seconds=plan.ahead_seconds)
        env = {**job_variables["env"], "BENCH_CONFIGURATION": secrets.token_hex(4)}
        run_id = rig.create_flow_run_due(deployment, due, job_variables={"env": env})
        runs.append(rig.wait_for_final(run_id, timeout=plan.run_timeout + plan.ahead_seconds,
                                       interval=0.25))
    late = [s for r in runs if (s := seconds(r.get("expected_start_time"), r.get("start_time")))]
    warm = sum(any("took over the run" in (entry.get("message") or "")
                   for entry in rig.read_logs(r["id"])) for r in runs)
    return {"runs": len(runs), "completed": sum(state_type(r) == "COMPLETED" for r in runs),
            "started_warm": warm, "late_s": late, "late_max_s": max(late, default=None)}


def burst_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A burst's throughput from the server's timestamps: first create → last final."""
    completed = [r for r in runs if state_type(r) == "COMPLETED"]
    created = [t for r in runs if (t := ts(r["created"]))]
    to_running = [s for r in runs if (s := seconds(r["created"], r.get("start_time")))]
    ended = [t for r in runs
             if state_type(r) in FINAL_STATE_TYPES and (t := ts(r.get("end_time")))]
    wall = (max(ended) - min(created)).total_seconds() if ended and created else None
    return {
        "runs": len(runs), "completed": len(completed), "final": len(ended),
        "states": dict(Counter(str(state_type(r)) for r in runs)),
        "wall_s": wall,
        "runs_per_min": len(completed) / wall * 60 if wall else None,
        "to_running_median_s": median_p95(to_running)[0],
        "to_running_p95_s": median_p95(to_running)[1],
    }


def burst_workload(workers: list[WorkerProcess], server: PrefectServer, rig: PrefectRig,
                   deployment: str, plan: Plan) -> dict[str, Any]:
    """`plan.burst` runs created at once, taken by `workers` (one pool); throughput, the
    workers' CPU and requests, and the machine's CPU per run by part (bench/floor.py)."""
    account = CpuAccount(server.process.pid, [w.pid for w in workers])
    t0 = time.monotonic()

    def burst() -> list[dict[str, Any]]:
        ids = [rig.create_flow_run(deployment) for _ in range(plan.burst)]
        return wait_all_final(rig, ids, plan.run_timeout + plan.burst * 20)

    runs, cpu = account.measure(burst, plan.burst)
    requests = [r for w in workers for r in w.proxy.between(t0, time.monotonic())]
    return {
        **burst_summary(runs),
        "cpu_s_per_run": cpu["workers"],
        "cpu_per_run": cpu,
        "requests_per_run": len(requests) / plan.burst,
        "breakdown": CountingProxy.breakdown(requests),
    }


def floor_workload(client: docker.DockerClient, server: PrefectServer, rig: PrefectRig,
                   plan: Plan) -> dict[str, Any]:
    """The burst with no worker (bench/floor.py): the machine's floor for this workload."""
    pool = f"bench-floor-{secrets.token_hex(3)}"
    rig.create_work_pool(pool, "docker")
    try:
        hello = rig.create_deployment(pool, "flows.py:hello", {"image": FLOWS_IMAGE})
        floor = bare_burst(client, rig, server.url, server.process.pid, hello, plan.burst,
                           lambda ids: wait_all_final(rig, ids, plan.run_timeout))
        return {**{k: v for k, v in floor.items() if k != "runs"},
                **burst_summary(floor["runs"])}
    finally:
        with contextlib.suppress(Exception):
            rig.delete_work_pool(pool)


def measure_floor(client: docker.DockerClient, server: PrefectServer, rig: PrefectRig,
                  plan: Plan, when: str) -> dict[str, Any]:
    """One bare burst, with its progress on stdout."""
    print(f"[floor] a burst of {plan.burst} with no worker, {when}", flush=True)
    floor = floor_workload(client, server, rig, plan)
    print(f"[floor] {floor['completed']}/{plan.burst} completed, "
          f"{floor['cpu_per_run']['busy']:.2f} s of CPU per run", flush=True)
    return floor


def find_container(client: docker.DockerClient, run_id: str, timeout: float) -> Any:
    """The (started) container of a flow run, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        label = f"io.prefect.flow-run-id={run_id}"
        for row in client.api.containers(all=True, filters={"label": label}):
            # a container being created can be listed before it can be inspected
            with contextlib.suppress(docker.errors.NotFound):
                container = client.containers.get(row["Id"])
                if ts(container.attrs["State"].get("StartedAt")):
                    return container
        time.sleep(0.1)
    return None


def wait_pool_idle(client: docker.DockerClient, pool: str, timeout: float = 60.0) -> None:
    """Wait until none of the pool's containers is running (the previous workload settled)."""
    deadline = time.monotonic() + timeout
    filters = {"label": f"{POOL_LABEL}={pool}", "status": "running"}
    while client.api.containers(filters=filters) and time.monotonic() < deadline:
        time.sleep(0.5)


def _last_log_post(worker: WorkerProcess, since: float) -> float:
    """When the worker last began a `POST /logs/` (a slow server may still be storing a
    run's output long after its container exited)."""
    return max((r.at for r in worker.proxy.between(since, time.monotonic())
                if r.endpoint == "POST /api/logs/"), default=since)


def log_workload(worker: WorkerProcess, rig: PrefectRig, client: docker.DockerClient,
                 job_variables: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """One run printing `log_lines` lines: container start → last line on the server."""
    n = plan.log_lines
    command = f"python3 -c 'for i in range({n}): print(f\"line {{i}}\")'"
    deployment = rig.create_deployment(
        worker.pool, "flows.py:hello", {**job_variables, "command": command}
    )
    t0 = time.monotonic()
    run_id = rig.create_flow_run(deployment)
    container = find_container(client, run_id, plan.run_timeout)
    if container is None:
        return {"error": "no container started"}
    started = container.attrs["State"]["StartedAt"]
    query = {"logs": {"flow_run_id": {"any_": [run_id]}, "text": {"query": f'"line {n - 1}"'}},
             "limit": 1}
    last: dict[str, Any] | None = None
    exited_at: float | None = None
    deadline = time.monotonic() + plan.run_timeout
    while last is None and time.monotonic() < deadline:
        time.sleep(0.25)
        response = rig.http.post("/logs/filter", json=query)
        found = response.json() if response.is_success else []
        last = next((e for e in found if e["message"] == f"line {n - 1}"), None)
        with contextlib.suppress(docker.errors.NotFound):
            container.reload()
            if container.status == "exited" and exited_at is None:
                exited_at = time.monotonic()
        if exited_at is not None and time.monotonic() - max(exited_at, _last_log_post(
                worker, t0)) > 15:
            break  # exited, no batch for 15 s and the last line is not there: none will be
    t1 = time.monotonic() + 1.0
    time.sleep(1.0)
    shipped = [e for e in rig.read_logs(run_id) if re.fullmatch(r"line \d+", e["message"])]
    requests = worker.proxy.between(t0, t1)
    log_posts = [r for r in requests if r.endpoint == "POST /api/logs/"]
    with contextlib.suppress(docker.errors.NotFound):
        container.reload()
    state = container.attrs["State"]
    arrived = sorted(x for e in shipped if (x := seconds(started, e.get("created"))) is not None)
    took = arrived[-1] if arrived and last else None
    return {
        "lines_shipped": len(shipped),
        "container_ran_s": seconds(started, state.get("FinishedAt")),
        "start_to_first_line_s": arrived[0] if arrived else None,
        "start_to_last_line_s": took,
        "lines_per_s": len(shipped) / took if took else None,
        "log_posts_per_10k_lines": len(log_posts) * 10000 / len(shipped) if shipped else None,
        "log_posts_server_s": sum(r.took or 0.0 for r in log_posts) if shipped else None,
        "requests_in_window": len(requests),
        "breakdown": CountingProxy.breakdown(requests),
    }


def build_deps_image(client: docker.DockerClient, ca_bundle: str | None) -> str:
    """prefect-docker's side of the deps workload: the flows image with an entrypoint that
    pip-installs EXTRA_PIP_PACKAGES at container start (and the CA for pip, at DEPS_IMAGE_CA)."""
    files = {
        "Dockerfile": (f"FROM {FLOWS_IMAGE}\n"
                       "COPY entrypoint.sh /opt/prefect/entrypoint.sh\n"
                       f"COPY ca.crt {DEPS_IMAGE_CA}\n"
                       'ENTRYPOINT ["/opt/prefect/entrypoint.sh"]\n').encode(),
        "entrypoint.sh": ENTRYPOINT_SH.encode(),
        "ca.crt": Path(ca_bundle).read_bytes() if ca_bundle else b"",
    }
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=DEPS_IMAGE, rm=True,
                        forcerm=True, pull=False)
    return DEPS_IMAGE


def with_build_variables(template: dict[str, Any]) -> dict[str, Any]:
    """prefect-docker's template plus dockerworker's `pip_packages` and `dockerfile_lines`
    (a job variable the pool's template does not name never reaches the worker)."""
    ours, merged = default_base_job_template(), copy.deepcopy(template)
    for name in ("pip_packages", "dockerfile_lines"):
        merged["job_configuration"][name] = ours["job_configuration"][name]
        merged["variables"]["properties"][name] = ours["variables"]["properties"][name]
    return merged


def container_output(client: docker.DockerClient, run_id: str) -> list[str]:
    """What the flow run's container(s) printed, as lines."""
    lines: list[str] = []
    label = f"io.prefect.flow-run-id={run_id}"
    for row in client.api.containers(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound):
            lines += client.api.logs(row["Id"]).decode(errors="replace").splitlines()
    return lines


def deps_workload(worker: WorkerProcess, rig: PrefectRig, client: docker.DockerClient,
                  server: PrefectServer, template: dict[str, Any], plan: Plan,
                  out: dict[str, Any]) -> None:
    """Two runs, one after the other, of a deployment needing DEPS_PACKAGE: create→RUNNING
    each, into `out`. dockerworker: `pip_packages` plus a Dockerfile line unique to this bench
    run (so the first run builds, never cached from an earlier bench) and the second reuses
    the image; prefect-docker: EXTRA_PIP_PACKAGES installed by the entrypoint on every start.
    Raises unless each run COMPLETED, its logs on the server hold what the flow printed, and
    the worker did what it should: dockerworker's run logs say "built image" (first) and
    "cached, no build" (second); prefect-docker's containers printed pip's success."""
    env = {"PREFECT_API_URL": server.url}
    if worker.kind == "dockerworker":
        response = rig.http.patch(f"/work_pools/{worker.pool}",
                                  json={"base_job_template": with_build_variables(template)})
        response.raise_for_status()
        out["dockerfile_marker"] = marker = f"bench-{secrets.token_hex(6)}"
        job = {"image": FLOWS_IMAGE, "image_pull_policy": "Never", "env": env,
               "pip_packages": [DEPS_PACKAGE], "dockerfile_lines": [f"RUN echo {marker}"]}
        expected = ("built image ", "cached, no build")
    else:
        if plan.ca_bundle:
            env["PIP_CERT"] = DEPS_IMAGE_CA
        job = {"image": DEPS_IMAGE, "image_pull_policy": "Never",
               "env": {**env, "EXTRA_PIP_PACKAGES": DEPS_PACKAGE}}
        installed = "Successfully installed " + DEPS_PACKAGE.replace("==", "-")
        expected = (installed, installed)
    out["deployment"] = name = f"deps-{secrets.token_hex(4)}"
    deployment = rig.create_deployment(worker.pool, "flows.py:six_version", job, name=name)
    problems: list[str] = []
    for nth, needle in zip(("first", "second"), expected, strict=True):
        run = rig.wait_for_final(rig.create_flow_run(deployment), timeout=plan.run_timeout,
                                 interval=0.25)
        deadline = time.monotonic() + 15  # the run's last lines may still be in a batch
        while True:
            messages = [e["message"] for e in rig.read_logs(run["id"])]
            printed = [m for m in messages if DEPS_PRINTED in m]
            if worker.kind == "prefect-docker":  # it ships no container output: ask Docker
                messages = container_output(client, run["id"])
            said = [m for m in messages if needle in m]
            if (printed and said) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ok = state_type(run) == "COMPLETED" and bool(printed) and bool(said)
        out[nth] = {  # no timings for a run that did not do what is measured
            "run_id": run["id"], "state": state_type(run), "verified": ok,
            "to_running_s": seconds(run["created"], run.get("start_time")) if ok else None,
            "to_completed_s": seconds(run["created"], run.get("end_time")) if ok else None,
            "evidence": printed[:2] + said[:2],
        }
        if worker.kind == "dockerworker" and nth == "first":  # what the build cost, and why
            built = re.search(r"built image \S+ in (\d+) s", " ".join(said))
            steps = [int(m.group(1)) for x in messages if (m := re.match(r"Step \d+/(\d+) :", x))]
            out[nth]["build_s"] = float(built.group(1)) if built else None
            out[nth]["build_steps"] = max(steps, default=None)
        if not ok:
            problems.append(f"{nth} run {run['id']}: {state_type(run)}, "
                            f"{DEPS_PRINTED!r} {'' if printed else 'not '}logged, "
                            f"{needle!r} {'' if said else 'not '}seen")
    out["verified"] = 2 - len(problems)
    if problems:
        raise RuntimeError("deps workload: " + "; ".join(problems))


def remove_deps_images(client: docker.DockerClient, deployment: str) -> list[str]:
    """Remove the images dockerworker built for the deps workload's deployment (labelled
    `io.dockerworker.deployment=<flow>-<deployment>`) and any build lock a worker killed
    mid-build left (named after the tag's hash); return the tags removed."""
    removed: list[str] = []
    for image in client.images.list(filters={"label": "io.dockerworker.build"}):
        if not image.labels.get("io.dockerworker.deployment", "").endswith(f"-{deployment}"):
            continue
        for tag in image.tags:
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(f"dockerworker-build-lock-{tag.rsplit(':', 1)[1]}"
                                      ).remove(force=True)
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(image.id, force=True)  # several tags: remove them all
            removed += image.tags
    return removed


def warm_up_server(server: PrefectServer, rig: PrefectRig, plan: Plan, workdir: Path,
                   dw_python: Path) -> None:
    """A throwaway worker's start on a scratch pool, unmeasured: a fresh server answers its
    first requests of each kind slowly (and a fresh venv's first start reads from disk), which
    would otherwise count against whichever worker the bench starts first."""
    pool = f"bench-warm-up-{secrets.token_hex(3)}"
    rig.create_work_pool(pool, "docker", prefect_docker_template())
    worker = WorkerProcess("dockerworker", pool, server, workdir, plan, None, dw_python)
    try:
        worker.wait_first_poll()
    finally:
        worker.stop()


def bench_worker(kind: str, server: PrefectServer, rig: PrefectRig, client: docker.DockerClient,
                 template: dict[str, Any], plan: Plan, workdir: Path,
                 prefect_cli: Path | None, dw_python: Path | None,
                 result: dict[str, Any]) -> None:
    """Every measurement for one worker on its own pool, into `result` (kept when a step
    fails); the worker and its containers are always stopped and removed."""
    short = {"dockerworker": "dw", "dockerworker-warm": "dww"}.get(kind, "pd")
    pool = f"bench-{short}-{secrets.token_hex(3)}"
    rig.create_work_pool(pool, "docker", template)
    job_variables = {"image": FLOWS_IMAGE, "image_pull_policy": "Never",
                     "env": {"PREFECT_API_URL": server.url}}
    result["pool"] = pool
    worker = WorkerProcess(kind, pool, server, workdir, plan, prefect_cli, dw_python)
    sampler = RssSampler(worker.pid, interval=0.5)
    try:
        print(f"[{kind}] started pid {worker.pid} on pool {pool}", flush=True)
        result["startup_s"] = worker.wait_first_poll()
        result["startup_cpu_s"] = cpu_seconds(worker.pid)
        sampler.start()
        time.sleep(plan.idle_seconds)
        result["rss_idle_mib"] = rss_mib(worker.pid)
        hello = rig.create_deployment(pool, "flows.py:hello", job_variables)

        warm = rig.wait_for_final(rig.create_flow_run(hello), timeout=plan.run_timeout)
        result["warmup_state"] = state_type(warm)
        print(f"[{kind}] warm-up run {state_type(warm)}; {plan.sequential} sequential runs",
              flush=True)

        def sequential() -> list[dict[str, Any]]:
            return [rig.wait_for_final(rig.create_flow_run(hello), timeout=plan.run_timeout,
                                       interval=0.25) for _ in range(plan.sequential)]

        runs, cpu, requests = measure_runs(worker, sequential)
        completed = [r for r in runs if state_type(r) == "COMPLETED"]
        to_running = [s for r in runs if (s := seconds(r["created"], r.get("start_time")))]
        to_done = [s for r in completed if (s := seconds(r["created"], r.get("end_time")))]
        claims = {r["id"]: claimed_at(rig, r["id"]) for r in runs}
        to_claim = [s for r in runs if (s := seconds(r["created"], claims[r["id"]]))]
        to_start = [s for r in runs if (s := seconds(claims[r["id"]], r.get("start_time")))]
        result["seq"] = {
            "runs": len(runs), "completed": len(completed),
            "states": [state_type(r) for r in runs],
            "to_running_s": to_running, "to_completed_s": to_done,
            "to_pending_median_s": median_p95(to_claim)[0],
            "pending_to_running_median_s": median_p95(to_start)[0],
            "to_running_median_s": median_p95(to_running)[0],
            "to_running_p95_s": median_p95(to_running)[1],
            "to_completed_median_s": median_p95(to_done)[0],
            "to_completed_p95_s": median_p95(to_done)[1],
            "cpu_s_per_run": cpu / len(runs),
            "requests_per_run": len(requests) / len(runs),
            "per_run_requests_per_run": len(per_run_requests(requests)) / len(runs),
            "breakdown": CountingProxy.breakdown(requests),
        }
        print(f"[{kind}] sequential done; {plan.sequential} runs one a second", flush=True)

        def spaced() -> list[dict[str, Any]]:
            """Runs arriving every second, each before the previous one has ended."""
            ids = []
            for _ in range(plan.sequential):
                ids.append(rig.create_flow_run(hello))
                time.sleep(1.0)
            return wait_all_final(rig, ids, plan.run_timeout)

        runs, _cpu, _requests = measure_runs(worker, spaced)
        to_running = [s for r in runs if (s := seconds(r["created"], r.get("start_time")))]
        result["spaced"] = {
            "runs": len(runs),
            "completed": sum(state_type(r) == "COMPLETED" for r in runs),
            "to_running_s": to_running,
            "to_running_median_s": median_p95(to_running)[0],
            "to_running_p95_s": median_p95(to_running)[1],
        }
        if plan.ahead:
            print(f"[{kind}] one a second done; {plan.ahead} runs scheduled "
                  f"{plan.ahead_seconds:g} s ahead, each of a new configuration", flush=True)
            result["ahead"] = ahead_workload(rig, hello, job_variables, plan)
        print(f"[{kind}] burst of {plan.burst}", flush=True)

        result["burst"] = burst_workload([worker], server, rig, hello, plan)
        completed = result["burst"]["completed"]
        print(f"[{kind}] burst done ({completed}/{plan.burst} completed); "
              f"log run of {plan.log_lines} lines", flush=True)
        if kind == "dockerworker-warm":  # the same as dockerworker's: output and builds
            result["rss_peak_mib"] = sampler.peak()
            result["worker_alive_at_end"] = worker.process.poll() is None
            return
        wait_pool_idle(client, pool)
        result["logs"] = log_workload(worker, rig, client, job_variables, plan)
        if plan.deps:
            print(f"[{kind}] deps: two runs needing {DEPS_PACKAGE}", flush=True)
            wait_pool_idle(client, pool)
            result["deps"] = {}
            deps_workload(worker, rig, client, server, template, plan, result["deps"])
        result["rss_peak_mib"] = sampler.peak()
        if plan.inflight:
            print(f"[{kind}] in flight: {', '.join(map(str, plan.inflight))} quiet runs",
                  flush=True)
            wait_pool_idle(client, pool)
            result["inflight"] = inflight_workload(worker.pid, rig, pool, job_variables,
                                                   plan.inflight, plan.inflight_window,
                                                   plan.inflight_settle)
        result["worker_alive_at_end"] = worker.process.poll() is None
    finally:
        sampler.stop()
        worker.stop()
        result["websockets"] = sum(1 for r in worker.proxy.requests if r.method == "WS")
        result["all_requests"] = CountingProxy.breakdown(worker.proxy.requests)
        removed = remove_pool_containers(client, pool)
        print(f"[{kind}] stopped; removed {len(removed)} containers", flush=True)
        if kind == "dockerworker" and (deployment := result.get("deps", {}).get("deployment")):
            for tag in remove_deps_images(client, deployment):
                print(f"[{kind}] removed image {tag}", flush=True)
        with contextlib.suppress(Exception):
            rig.delete_work_pool(pool)


def bench_replicas(server: PrefectServer, rig: PrefectRig, client: docker.DockerClient,
                   template: dict[str, Any], plan: Plan, workdir: Path, dw_python: Path | None,
                   result: dict[str, Any]) -> None:
    """dockerworker-x3: REPLICAS dockerworker processes (each named) on one pool take the
    burst together, as compose replicas or a fleet on one host would."""
    pool = f"bench-dw3-{secrets.token_hex(3)}"
    rig.create_work_pool(pool, "docker", template)
    job_variables = {"image": FLOWS_IMAGE, "image_pull_policy": "Never",
                     "env": {"PREFECT_API_URL": server.url}}
    result["pool"] = pool
    workers: list[WorkerProcess] = []
    try:
        for n in range(1, REPLICAS + 1):
            workers.append(WorkerProcess("dockerworker-x3", pool, server, workdir, plan, None,
                                         dw_python, name=f"{pool}-{n}"))
        result["startup_s"] = max(w.wait_first_poll() for w in workers)
        result["rss_idle_mib"] = sum(rss_mib(w.pid) for w in workers)
        hello = rig.create_deployment(pool, "flows.py:hello", job_variables)
        warm = rig.wait_for_final(rig.create_flow_run(hello), timeout=plan.run_timeout)
        result["warmup_state"] = state_type(warm)
        print(f"[dockerworker-x3] {REPLICAS} replicas, warm-up run {state_type(warm)}; "
              f"burst of {plan.burst}", flush=True)
        result["burst"] = burst_workload(workers, server, rig, hello, plan)
        result["burst"]["runs_by_worker"] = runs_by_worker(rig, pool)
        result["worker_alive_at_end"] = all(w.process.poll() is None for w in workers)
    finally:
        for worker in workers:
            worker.stop()
        removed = remove_pool_containers(client, pool)
        print(f"[dockerworker-x3] stopped; removed {len(removed)} containers", flush=True)
        with contextlib.suppress(Exception):
            rig.delete_work_pool(pool)


def runs_by_worker(rig: PrefectRig, pool: str) -> dict[str, int]:
    """How many of the pool's runs each worker claimed (its name in the claim message)."""
    response = rig.http.post("/flow_runs/filter", json={
        "work_pools": {"name": {"any_": [pool]}}, "limit": 200})
    response.raise_for_status()
    counts: Counter[str] = Counter()
    for run in response.json():
        history = rig.http.get("/flow_run_states/", params={"flow_run_id": run["id"]}).json()
        claim = next((st.get("message") or "" for st in history if st["type"] == "PENDING"), "")
        counts[claim.rsplit(" ", 1)[-1] or "?"] += 1
    return dict(counts)


# --- report -------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str]] = [
    ("start-up: process start → first poll (s)", "startup_s", "{:.2f}"),
    ("start-up: worker CPU (s)", "startup_cpu_s", "{:.2f}"),
    ("RSS idle (MiB)", "rss_idle_mib", "{:.1f}"),
    ("RSS peak (MiB)", "rss_peak_mib", "{:.1f}"),
    ("sequential: runs COMPLETED", "seq.completed", "{:.0f}"),
    ("sequential: create→RUNNING median (s)", "seq.to_running_median_s", "{:.2f}"),
    ("sequential: create→RUNNING p95 (s)", "seq.to_running_p95_s", "{:.2f}"),
    ("  create→PENDING (claimed) median (s)", "seq.to_pending_median_s", "{:.2f}"),
    ("  PENDING→RUNNING median (s)", "seq.pending_to_running_median_s", "{:.2f}"),
    ("sequential: create→COMPLETED median (s)", "seq.to_completed_median_s", "{:.2f}"),
    ("sequential: create→COMPLETED p95 (s)", "seq.to_completed_p95_s", "{:.2f}"),
    ("sequential: worker CPU per run (s)", "seq.cpu_s_per_run", "{:.3f}"),
    ("sequential: API requests per run", "seq.requests_per_run", "{:.1f}"),
    ("  of which not periodic (poll, hb, ...)", "seq.per_run_requests_per_run", "{:.1f}"),
    ("one a second: runs COMPLETED", "spaced.completed", "{:.0f}"),
    ("one a second: create→RUNNING median (s)", "spaced.to_running_median_s", "{:.2f}"),
    ("one a second: create→RUNNING p95 (s)", "spaced.to_running_p95_s", "{:.2f}"),
    ("scheduled ahead: runs COMPLETED", "ahead.completed", "{:.0f}"),
    ("scheduled ahead: runs started warm", "ahead.started_warm", "{:.0f}"),
    ("scheduled ahead: RUNNING after due, max (s)", "ahead.late_max_s", "{:.2f}"),
    ("burst: runs COMPLETED", "burst.completed", "{:.0f}"),
    ("burst: first create → last final (s)", "burst.wall_s", "{:.1f}"),
    ("burst: runs/min", "burst.runs_per_min", "{:.1f}"),
    ("burst: create→RUNNING median (s)", "burst.to_running_median_s", "{:.1f}"),
    ("burst: create→RUNNING p95 (s)", "burst.to_running_p95_s", "{:.1f}"),
    ("burst: share of the floor (runs/min)", "burst.share_of_floor", "{:.0%}"),
    ("burst: worker CPU per run (s)", "burst.cpu_s_per_run", "{:.3f}"),
    ("  machine CPU per run, all but bench (s)", "burst.cpu_per_run.busy", "{:.2f}"),
    ("    flow containers (s)", "burst.cpu_per_run.containers", "{:.2f}"),
    ("    Prefect server (s)", "burst.cpu_per_run.server", "{:.2f}"),
    ("    dockerd + containerd (s)", "burst.cpu_per_run.docker", "{:.2f}"),
    ("    rest: shims, kernel, others (s)", "burst.cpu_per_run.rest", "{:.2f}"),
    ("  cores left idle, per run (s)", "burst.cpu_per_run.idle", "{:.2f}"),
    ("burst: API requests per run", "burst.requests_per_run", "{:.1f}"),
    ("logs: lines shipped", "logs.lines_shipped", "{:.0f}"),
    ("logs: container ran (s)", "logs.container_ran_s", "{:.2f}"),
    ("logs: container start → first line (s)", "logs.start_to_first_line_s", "{:.2f}"),
    ("logs: container start → last line (s)", "logs.start_to_last_line_s", "{:.2f}"),
    ("logs: lines/s", "logs.lines_per_s", "{:.0f}"),
    ("logs: POST /logs/ per 10k lines", "logs.log_posts_per_10k_lines", "{:.1f}"),
    ("logs: server time answering them (s)", "logs.log_posts_server_s", "{:.2f}"),
    ("deps: runs COMPLETED, printed six 1.16.0", "deps.verified", "{:.0f}"),
    ("deps: first run create→RUNNING (s)", "deps.first.to_running_s", "{:.2f}"),
    ("  of which the image build (s)", "deps.first.build_s", "{:.0f}"),
    ("deps: second run create→RUNNING (s)", "deps.second.to_running_s", "{:.2f}"),
    ("deps: first run create→COMPLETED (s)", "deps.first.to_completed_s", "{:.2f}"),
    ("deps: second run create→COMPLETED (s)", "deps.second.to_completed_s", "{:.2f}"),
]


def lookup(result: dict[str, Any], key: str) -> float | None:
    """A dotted key of a worker's result, or None."""
    value: Any = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def combine_floors(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    """One floor from the bare bursts (before and after the workers): the one that cost the
    least CPU a run (noise only ever adds CPU: contention, a cold cache, a cold server), with
    every burst kept under `bursts`."""
    if not bursts:
        return {}
    best = min(bursts, key=lambda b: b["cpu_per_run"].get("busy") or float("inf"))
    return {**best, "bursts": bursts}


def floor_lines(floor: dict[str, Any], plan: Plan) -> list[str]:
    """The floor under the table: what the burst costs with no worker at all."""
    if not floor:
        return ["Floor: not measured (--no-floor)."]
    cpu = floor["cpu_per_run"]
    bursts = floor.get("bursts") or [floor]

    def f(key: str) -> str:
        return f"{v:.2f}" if (v := cpu.get(key)) is not None else "n/a"

    each = " and ".join(f"{b['cpu_per_run']['busy']:.2f}" for b in bursts)
    return [
        (f"Floor (bench/floor.py): the burst of {plan.burst} with no worker, before and after "
         f"the workers ({len(bursts)} bursts), this bench starting each container itself, "
         f"{floor['cores']} at a time: {floor['completed']} COMPLETED, "
         f"{floor['runs_per_min']:.1f} runs/min measured (the cheaper burst)."),
        (f"CPU per run {each} s, the least {f('busy')} s (containers {f('containers')}, server "
         f"{f('server')}, dockerd+containerd {f('docker')}, rest {f('rest')}; idle "
         f"{f('idle')}): floor {floor['cores']} cores x 60 / {f('busy')} = "
         f"{floor['floor_runs_per_min']:.1f} runs/min; 'share of the floor' is each burst's "
         "runs/min against it."),
    ]


def inflight_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """The in-flight workload's rows, one set per number of runs in flight."""
    rows = []
    for level in plan.inflight:
        rows += [(f"{level} in flight: worker RSS (MiB)", f"inflight.{level}.rss_mib", "{:.1f}"),
                 (f"{level} in flight: worker threads", f"inflight.{level}.threads", "{:.0f}"),
                 (f"{level} in flight: worker CPU (% of a core)",
                  f"inflight.{level}.cpu_pct_of_core", "{:.2f}")]
    return rows


def table(results: dict[str, dict[str, Any]], plan: Plan, floor: dict[str, Any]) -> str:
    """Side by side, with each dockerworker kind's ratio to prefect-docker."""
    kinds = [k for k in WORKERS if k in results]
    ours = [k for k in kinds if k != "prefect-docker"]
    pd = results.get("prefect-docker", {})
    heads = {"dockerworker": "dw", "dockerworker-warm": "dw warm", "dockerworker-x3": "dw x3",
             "prefect-docker": "pd"}
    header = f"{'metric':<42}" + "".join(f"{heads[k]:>12}" for k in kinds)
    header += "".join(f"{heads[k] + '/pd':>12}" for k in ours)
    lines = [header, "-" * len(header)]
    for label, key, fmt in ROWS + inflight_rows(plan):
        if key.startswith("deps.") and not plan.deps:
            continue
        values = {k: lookup(results[k], key) for k in kinds}
        line = f"{label:<42}" + "".join(
            f"{fmt.format(v) if (v := values[k]) is not None else 'n/a':>12}" for k in kinds)
        for k in ours:
            a, b = values[k], lookup(pd, key)
            line += f"{f'{a / b:.2f}' if a is not None and b else 'n/a':>12}"
        lines.append(line)
    dw = results.get("dockerworker", {})
    lines += [""] + floor_lines(floor, plan)
    lines += [
        "",
        f"{os.cpu_count()} CPU cores: every flow container imports Prefect (dockerworker's",
        "`python -m prefect.engine` ~1.5 s CPU, prefect-docker's `prefect flow-run execute`",
        "~4 s: bench/entrypoint.py), so burst throughput is CPU-bound by the machine; timings",
        "are noisy when anything else runs. Sequential: one run at a time, after one",
        "unmeasured warm-up run (for dw warm: the cold run whose configuration it keeps warm).",
        "One a second: as many runs as the sequential workload, created a second apart.",
        (f"Scheduled ahead: {plan.ahead} runs, one after another, each created "
         f"{plan.ahead_seconds:g} s before it is due"),
        "and the first of its job configuration (an env value of its own): dw warm warms for",
        "it ahead (ahead.py), the others start cold; claimed 10 s early, a run is held by the",
        "server until it is due, so only a start longer than the prefetch makes it late.",
        f"dw warm = dockerworker {' '.join(WARM_ARGS)}. Extra dockerworker options: "
        + (" ".join(plan.dw_args) or "none") + ".",
        f"--poll-interval {plan.poll_interval:g} s for all (prefetch 10 s, heartbeat 30 s);",
        "dockerworker polls every 30 s while its event stream is connected (events first).",
        "Requests: counted by a proxy in front of the server, worker traffic only (flows talk",
        "to the server directly). WebSockets are tunnelled; an upgrade and each message the",
        "worker sends on it count as one request each (WebSockets opened: dockerworker "
        + f"{dw.get('websockets', 'n/a')}, prefect-docker {pd.get('websockets', 'n/a')}).",
        "RSS/CPU: worker process tree from /proc (not dockerd, not the flow containers);",
        "RSS peak = max(sampled VmRSS sum, VmHWM sum). prefect-docker does not ship container",
        "output to the API, so its log rows read 0 lines / n/a.",
        (f"In flight: quiet runs (a container that sleeps) added up to each number, measured "
         f"over {plan.inflight_window:g} s, {plan.inflight_settle:g} s after all are RUNNING "
         "(bench/inflight.py)."),
    ]
    if plan.deps:
        lines += [
            f"deps: a deployment needing {DEPS_PACKAGE} (the image has 1.17.0), two runs.",
            "dockerworker: `pip_packages`; the first run builds the image (a Dockerfile line",
            "unique to this bench run, so never cached from before), the second reuses it.",
            "prefect-docker: EXTRA_PIP_PACKAGES, pip-installed by the image's entrypoint at",
            "every container start. Both: pip over host networking, "
            + (f"CA {plan.ca_bundle}." if plan.ca_bundle else "no extra CA."),
        ]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 sequential runs, burst of 5, 5000 log lines, "
                             "no deps workload unless --deps")
    parser.add_argument("--burst", type=int, help="runs in the burst (default 30; quick 5)")
    parser.add_argument("--sequential", type=int, help="sequential runs (default 10; quick 3)")
    parser.add_argument("--log-lines", type=int, help="lines printed by the log run (default 20000)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="poll interval for both workers (s)")
    parser.add_argument("--deps", action=argparse.BooleanOptionalAction,
                        help=f"the dependency workload: two runs needing {DEPS_PACKAGE} "
                             "(default: on; off with --quick)")
    parser.add_argument("--ca-bundle", default=HOST_CA_BUNDLE if Path(HOST_CA_BUNDLE).exists()
                        else "", help="CA bundle pip trusts in the deps workload, both workers "
                        "('' for none; default: %(default)s)")
    parser.add_argument("--workers",
                        help="comma-separated subset of: " + ", ".join(WORKERS)
                             + " (default: all; --quick leaves out dockerworker-x3)")
    parser.add_argument("--dw-args", default="",
                        help="extra `dockerworker start` options, e.g. '--max-starting 0'")
    parser.add_argument("--inflight", help="numbers of quiet runs in flight to measure the "
                        "worker at, in turn (default 1,10,50; quick 5; '' for none)")
    parser.add_argument("--inflight-settle", type=float, default=5.0,
                        help="seconds the runs in flight age before each measurement "
                             "(default 5; the worker reads a run's usage less often as it "
                             "ages: 300 shows long runs)")
    parser.add_argument("--inflight-window", type=float,
                        help="seconds measured at each number in flight (default 20; quick 10)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction,
                        help="measure the floor first: the burst with no worker "
                             "(bench/floor.py; default: on; off with --quick)")
    parser.add_argument("--ahead", type=int, help="runs scheduled ahead, each of a new job "
                        "configuration, one after another (default 3; quick 0)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help="venv for prefect-docker's worker (created if missing)")
    args = parser.parse_args(argv)
    plan = (Plan(sequential=3, burst=5, log_lines=5000, inflight=(5,), inflight_window=10,
                 ahead=0)
            if args.quick else Plan())
    if args.inflight is not None:
        plan.inflight = tuple(int(n) for n in args.inflight.split(",") if n.strip())
    plan.inflight_settle = args.inflight_settle
    if args.inflight_window is not None:
        plan.inflight_window = args.inflight_window
    plan.poll_interval = args.poll_interval
    plan.floor = args.floor if args.floor is not None else not args.quick
    if args.workers is None:  # a burst of 5 over three replicas says little: not in --quick
        args.workers = ",".join(k for k in WORKERS if not (args.quick and k == "dockerworker-x3"))
    plan.deps = args.deps if args.deps is not None else not args.quick
    plan.ca_bundle = args.ca_bundle or None
    plan.dw_args = tuple(args.dw_args.split())
    for name in ("burst", "sequential", "log_lines", "ahead"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if unknown := set(args.workers.split(",")) - set(WORKERS):
        parser.error(f"unknown workers: {', '.join(sorted(unknown))}")
    return plan, args


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)
    kinds = [k for k in WORKERS if k in args.workers.split(",")]

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    prefect_cli = ensure_prefect_docker_venv(args.venv) if "prefect-docker" in kinds else None
    dw_python = (install_dockerworker(DOCKERWORKER_VENV)
                 if any(k.startswith("dockerworker") for k in kinds) else None)
    client = docker.from_env()
    client.ping()
    try:
        client.images.get(PREFECT_IMAGE)
    except docker.errors.ImageNotFound:
        print(f"image {PREFECT_IMAGE} is missing: run images/build-local.sh first")
        return 1
    print(f"building {FLOWS_IMAGE} ...", flush=True)
    build_flow_image(client)
    template = prefect_docker_template()
    workdir = Path(tempfile.mkdtemp(prefix="dockerworker-bench-"))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    floor: dict[str, Any] = {}
    floors: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    ok = False
    server = start_prefect_server()
    rig = PrefectRig(server.url)
    try:
        print(f"Prefect server at {server.url}; plan {asdict(plan)}", flush=True)
        if plan.deps and "prefect-docker" in kinds:
            print(f"building {DEPS_IMAGE} ...", flush=True)
            build_deps_image(client, plan.ca_bundle)
        if plan.floor:
            floors.append(measure_floor(client, server, rig, plan, "before the workers"))
        if dw_python is not None:
            warm_up_server(server, rig, plan, workdir, dw_python)
        for kind in kinds:
            results[kind] = {}
            try:
                if kind == "dockerworker-x3":
                    bench_replicas(server, rig, client, template, plan, workdir, dw_python,
                                   results[kind])
                else:
                    bench_worker(kind, server, rig, client, template, plan, workdir,
                                 prefect_cli, dw_python, results[kind])
            except Exception as exc:  # noqa: BLE001 - keep what was measured, go on
                traceback.print_exc()
                results[kind]["error"] = f"{type(exc).__name__}: {exc}"
        if plan.floor:
            floors.append(measure_floor(client, server, rig, plan, "after the workers"))
            floor = combine_floors(floors)
            for result in results.values():
                if rate := lookup(result, "burst.runs_per_min"):
                    result["burst"]["share_of_floor"] = rate / floor["floor_runs_per_min"]
        ok = not any("error" in r for r in results.values())
    finally:
        rig.close()
        server.stop()
        if plan.deps and "prefect-docker" in kinds:
            with contextlib.suppress(docker.errors.APIError):  # gone, or (never) in use
                client.images.remove(DEPS_IMAGE)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"worker output kept in {workdir}", file=sys.stderr)
    print()
    print(table(results, plan, floor))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"bench-{stamp}.json"
    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "flows_image": FLOWS_IMAGE,
            "prefect_docker": list(PREFECT_DOCKER_REQS), "pool_label": POOL_LABEL}
    out.write_text(json.dumps({"meta": meta, "plan": asdict(plan), "floor": floor,
                               "results": results},
                              indent=2, default=str))
    print(f"\nwritten {out.relative_to(REPO_DIR)}")
    for kind, result in results.items():
        if "error" in result:
            print(f"{kind} FAILED: {result['error']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
