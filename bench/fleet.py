"""The server under a fleet: N idle workers on one Prefect server (issue 19, goal 5).

    .venv/bin/python bench/fleet.py                       # counts 1,10,50; 60 s windows
    .venv/bin/python bench/fleet.py --quick               # counts 1,5; 20 s windows (~3 min)
    .venv/bin/python bench/fleet.py --counts 1,10,30 --seconds 45 --kinds dockerworker

One Prefect server (SQLite, loopback, temp PREFECT_HOME: testrig's start_prefect_server). For
each kind (dockerworker with its defaults, as an operator runs it; prefect-docker's `prefect
worker start --type docker` with its defaults) and each count N: N worker processes (distinct
names) on a pool of their own, all through one counting proxy (bench/proxy.py); once every
worker is registered and has polled, a window of `--seconds` measures the server's process
tree CPU, the requests the server received (by endpoint), and the workers' total RSS and CPU.
Then pickup: with the N workers idle, one flow run at a time (command `true`: only the claim
matters), create → first PENDING from the run's state history; the requests the fleet sent
for each run. Workers start in batches; a count that cannot be reached (memory, a worker that
never polls) is reported as reached/asked.
Results: a table on stdout and bench-results/fleet-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import docker
import docker.errors
from procmon import cpu_seconds, rss_mib
from proxy import CountingProxy
from run import (
    DEFAULT_VENV,
    DOCKERWORKER_VENV,
    FINAL_STATE_TYPES,
    POLL_PATH,
    PREFECT_DOCKER_REQS,
    RESULTS_DIR,
    ensure_prefect_docker_venv,
    install_dockerworker,
    prefect_docker_template,
    seconds,
)
from testrig.prefect_rig import (
    FLOWS_IMAGE,
    PREFECT_IMAGE,
    PrefectRig,
    PrefectServer,
    build_flow_image,
    remove_pool_containers,
    start_prefect_server,
    state_type,
)

KINDS = ("dockerworker", "prefect-docker")
SHORT = {"dockerworker": "dw", "prefect-docker": "pd"}
MIN_AVAILABLE_MIB = 1500  # stop starting workers when the machine has less than this free


def available_mib() -> float:
    """MemAvailable of /proc/meminfo, MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


class Fleet:
    """N worker processes of one kind on one pool, behind one counting proxy."""

    def __init__(self, kind: str, pool: str, server: PrefectServer, workdir: Path,
                 prefect_cli: Path | None, dw_python: Path | None,
                 dw_args: tuple[str, ...], direct: bool = False) -> None:
        self.kind, self.pool, self.workdir = kind, pool, workdir
        self.prefect_cli, self.dw_python, self.dw_args = prefect_cli, dw_python, dw_args
        self.proxy = CountingProxy(server.port)
        self.api_url = f"http://127.0.0.1:{self.proxy.start()}/api"
        self.direct = direct
        if direct:  # the control: no proxy (keep-alive reaches the server), nothing counted
            self.api_url = server.url
        self.processes: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []

    def start_one(self) -> None:
        index = len(self.processes)
        name = f"{self.pool}-{index}"
        env = {k: v for k, v in os.environ.items()  # no PYTHONPATH: the venv's own code
               if not k.startswith(("PREFECT_", "DOCKERWORKER_")) and k != "PYTHONPATH"}
        env.update(PREFECT_API_URL=self.api_url, PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        if self.kind == "dockerworker":
            assert self.dw_python is not None
            cmd = [str(self.dw_python), "-m", "dockerworker.cli", "start", "--pool", self.pool,
                   "--name", name, *self.dw_args]
        else:
            assert self.prefect_cli is not None
            home = self.workdir / f"home-{name}"
            home.mkdir()
            env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
                       PREFECT_SERVER_ANALYTICS_ENABLED="false")
            cmd = [str(self.prefect_cli), "worker", "start", "--pool", self.pool,
                   "--type", "docker", "--name", name]
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.processes.append(subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.workdir,
            ))
        self.names.append(name)

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.processes if p.poll() is None]

    def registered(self, rig: PrefectRig) -> set[str]:
        """Names of this fleet's workers the pool knows (each has sent a heartbeat)."""
        response = rig.http.post(f"/work_pools/{self.pool}/workers/filter",
                                 json={"limit": 200})
        if not response.is_success:
            return set()
        return {w["name"] for w in response.json()} & set(self.names)

    def polls(self) -> int:
        if self.direct:
            return 1 << 30
        return sum(1 for r in list(self.proxy.requests) if r.path.endswith(POLL_PATH))

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.alive())

    def rss(self) -> float:
        return sum(rss_mib(p.pid) for p in self.alive())

    def tail(self, index: int, lines: int = 15) -> str:
        path = self.workdir / f"{self.names[index]}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM every worker's session, SIGKILL those still there after 20 s."""
        for process in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.proxy.stop()


def start_fleet(fleet: Fleet, rig: PrefectRig, count: int, batch: int,
                out: dict[str, Any]) -> int:
    """Start `count` workers in batches, each batch registered before the next; stop early
    when memory runs short or a batch does not come up. Returns how many are up."""
    t0 = time.monotonic()
    while len(fleet.processes) < count:
        if available_mib() < MIN_AVAILABLE_MIB:
            out["stopped_because"] = f"MemAvailable below {MIN_AVAILABLE_MIB} MiB"
            break
        for _ in range(min(batch, count - len(fleet.processes))):
            fleet.start_one()
        deadline = time.monotonic() + 60 + 3 * batch
        while (len(fleet.registered(rig)) < len(fleet.processes)
               and time.monotonic() < deadline and fleet.alive()):
            time.sleep(0.5)
        if len(fleet.registered(rig)) < len(fleet.processes):
            dead = [i for i, p in enumerate(fleet.processes) if p.poll() is not None]
            out["stopped_because"] = (f"only {len(fleet.registered(rig))} of "
                                      f"{len(fleet.processes)} registered; {len(dead)} exited")
            if dead:
                out["dead_worker_output"] = fleet.tail(dead[0])
            break
    up = len(fleet.registered(rig))
    # every worker has polled at least once: as many polls as workers (they poll at start)
    deadline = time.monotonic() + 60
    while fleet.polls() < up and time.monotonic() < deadline:
        time.sleep(0.5)
    out["start_s"] = time.monotonic() - t0
    return up


def measure_window(fleet: Fleet, server: PrefectServer, window: float) -> dict[str, Any]:
    """Idle fleet for `window` seconds: server CPU, requests, workers' CPU and RSS."""
    bench0 = sum(os.times()[:2])
    server0, workers0, t0 = cpu_seconds(server.process.pid), fleet.cpu(), time.monotonic()
    time.sleep(window)
    t1 = time.monotonic()
    server_cpu, workers_cpu = cpu_seconds(server.process.pid) - server0, fleet.cpu() - workers0
    elapsed = t1 - t0
    requests = fleet.proxy.between(t0, t1)
    n = max(1, len(fleet.alive()))
    breakdown = CountingProxy.breakdown(requests)
    return {
        "seconds": elapsed,
        "server_cpu_s": server_cpu,
        "server_cpu_pct": 100 * server_cpu / elapsed,
        "server_rss_mib": rss_mib(server.process.pid),
        "requests": len(requests),
        "requests_per_s": len(requests) / elapsed,
        "requests_per_s_per_worker": len(requests) / elapsed / n,
        "per_worker_per_min": {k.replace(fleet.pool, "{pool}"): v * 60 / elapsed / n
                               for k, v in breakdown.items()},
        "breakdown": breakdown,
        "server_time_answering_s": sum(r.took or 0.0 for r in requests),
        "workers_cpu_s": workers_cpu,
        "workers_cpu_pct": 100 * workers_cpu / elapsed,
        "workers_rss_mib": fleet.rss(),
        "bench_cpu_s": sum(os.times()[:2]) - bench0,  # this process: mostly the proxy
        "loadavg": os.getloadavg(),
    }


def measure_pickup(fleet: Fleet, rig: PrefectRig, server: PrefectServer, trials: int,
                   timeout: float = 60.0) -> dict[str, Any]:
    """`trials` runs, one at a time, created on the idle fleet's pool: create → first
    PENDING (the claim), and the fleet's requests per run."""
    job = {"image": FLOWS_IMAGE, "image_pull_policy": "Never", "command": "true",
           "env": {"PREFECT_API_URL": server.url}}
    deployment = rig.create_deployment(fleet.pool, "flows.py:hello", job)
    pickups: list[float] = []
    per_run: list[int] = []
    errors: list[str] = []
    for _ in range(trials):
        time.sleep(1.0)
        t0 = time.monotonic()
        run_id = rig.create_flow_run(deployment)
        deadline = time.monotonic() + timeout
        claimed: str | None = None
        while claimed is None and time.monotonic() < deadline:
            time.sleep(0.1)
            states = rig.read_state_history(run_id)
            claimed = min((s["timestamp"] for s in states if s["type"] == "PENDING"),
                          default=None)
        run = rig.read_flow_run(run_id)
        if claimed is None:
            errors.append(f"{run_id} not claimed in {timeout:.0f} s")
            continue
        if (took := seconds(run["created"], claimed)) is not None:
            pickups.append(took)
        # Let the run end (dockerworker reports the container's exit as a crash); a run
        # left PENDING (prefect-docker leaves it so when `true` exits) is cancelled here.
        deadline = time.monotonic() + 5
        while state_type(run) not in FINAL_STATE_TYPES and time.monotonic() < deadline:
            time.sleep(0.5)
            run = rig.read_flow_run(run_id)
        per_run.append(len(fleet.proxy.between(t0, time.monotonic())))
        if state_type(run) not in FINAL_STATE_TYPES:
            rig.set_state(run_id, "CANCELLED", force=True)
    return {
        "pickup_s": pickups,
        "pickup_median_s": statistics.median(pickups) if pickups else None,
        "pickup_max_s": max(pickups) if pickups else None,
        "requests_per_run": per_run,
        "errors": errors,
    }


def bench_fleet(kind: str, count: int, server: PrefectServer, rig: PrefectRig,
                client: docker.DockerClient, template: dict[str, Any], workdir: Path,
                prefect_cli: Path | None, dw_python: Path | None,
                args: argparse.Namespace, out: dict[str, Any]) -> None:
    pool = f"fleet-{SHORT[kind]}{count}-{secrets.token_hex(2)}"
    rig.create_work_pool(pool, "docker", template)
    fleet = Fleet(kind, pool, server, workdir, prefect_cli, dw_python,
                  tuple(args.dw_args.split()) if kind == "dockerworker" else (), args.direct)
    out.update(pool=pool, asked=count)
    try:
        print(f"[{kind} × {count}] starting on pool {pool} ...", flush=True)
        out["reached"] = up = start_fleet(fleet, rig, count, args.batch, out)
        print(f"[{kind} × {count}] {up}/{count} up in {out['start_s']:.0f} s; "
              f"settling {args.settle:g} s, measuring {args.seconds:g} s", flush=True)
        if up == 0:
            return
        time.sleep(args.settle)  # the start-up's own requests and CPU out of the window
        out["idle"] = measure_window(fleet, server, args.seconds)
        if args.pickups:
            out["pickup"] = measure_pickup(fleet, rig, server, args.pickups)
        idle, pickup = out["idle"], out.get("pickup", {})
        print(f"[{kind} × {count}] server {idle['server_cpu_pct']:.1f} % CPU, "
              f"{idle['requests_per_s']:.2f} req/s; pickup {pickup.get('pickup_s')}", flush=True)
    finally:
        out["alive_at_end"] = len(fleet.alive())
        fleet.stop()
        remove_pool_containers(client, pool)
        with contextlib.suppress(Exception):
            rig.delete_work_pool(pool)


def measure_baseline(server: PrefectServer, window: float) -> dict[str, Any]:
    """The server's own CPU with no worker at all (its background services)."""
    t0, cpu0 = time.monotonic(), cpu_seconds(server.process.pid)
    time.sleep(window)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(server.process.pid) - cpu0
    return {"seconds": elapsed, "server_cpu_s": cpu, "server_cpu_pct": 100 * cpu / elapsed,
            "server_rss_mib": rss_mib(server.process.pid), "loadavg": os.getloadavg()}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: dict[str, Any]) -> str:
    base = results.get("baseline", {})
    head = (f"{'kind':<15}{'N':>7}{'server CPU %':>14}{'req/s':>9}{'req/s/worker':>14}"
            f"{'req/min/worker':>16}{'workers RSS MiB':>17}{'workers CPU %':>15}"
            f"{'pickup med (max) s':>20}{'req/pickup':>12}")
    lines = [head, "-" * len(head)]
    if base:
        lines.append(f"{'(no workers)':<15}{0:>7}{base['server_cpu_pct']:>14.1f}")
    for kind in KINDS:
        for row in results["fleets"].get(kind, []):
            idle, pickup = row.get("idle") or {}, row.get("pickup") or {}
            n = f"{row.get('reached', 0)}" + (f"/{row['asked']}" if row.get("reached") !=
                                               row["asked"] else "")
            per_run = pickup.get("requests_per_run") or []
            lines.append(
                f"{kind:<15}{n:>7}{fmt(idle.get('server_cpu_pct'), '.1f'):>14}"
                f"{fmt(idle.get('requests_per_s'), '.2f'):>9}"
                f"{fmt(idle.get('requests_per_s_per_worker'), '.3f'):>14}"
                f"{fmt(r * 60 if (r := idle.get('requests_per_s_per_worker')) else None, '.1f'):>16}"
                f"{fmt(idle.get('workers_rss_mib'), '.0f'):>17}"
                f"{fmt(idle.get('workers_cpu_pct'), '.1f'):>15}"
                f"{fmt(pickup.get('pickup_median_s'), '.2f') + ' (' + fmt(pickup.get('pickup_max_s'), '.2f') + ')':>20}"
                f"{fmt(statistics.median(per_run) if per_run else None, '.0f'):>12}")
    lines.append("")
    lines.append("What one idle worker sends per minute (the smallest fleet of each kind):")
    for kind in KINDS:
        rows = [r for r in results["fleets"].get(kind, []) if r.get("idle")]
        if rows:
            per_min = rows[0]["idle"]["per_worker_per_min"]
            lines.append(f"  {kind} (N={rows[0]['reached']}): " + ", ".join(
                f"{k} {v:.1f}" for k, v in per_min.items()))
    lines += [
        "",
        f"{os.cpu_count()} cores; server CPU % is of one core (its process tree, /proc);",
        "requests counted by one proxy per fleet (a new upstream connection per request; a",
        "WebSocket upgrade and each message a worker sends on it count one each). Pickup:",
        "create → first PENDING from the run's state history; req/pickup: the fleet's requests",
        "from create until the run ended (or 5 s after the claim). Other processes share this machine: expect noise.",
    ]
    for kind in KINDS:
        for row in results["fleets"].get(kind, []):
            if row.get("reached") != row["asked"] or "error" in row:
                lines.append(f"{kind} × {row['asked']}: reached {row.get('reached')}; "
                             f"{row.get('stopped_because') or row.get('error') or ''}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--counts", help="worker counts (default 1,10,50; quick 1,5)")
    parser.add_argument("--seconds", type=float, help="measured idle window (default 60; "
                        "quick 20)")
    parser.add_argument("--quick", action="store_true",
                        help="counts 1,5; 20 s windows (baseline 10 s); 2 pickups")
    parser.add_argument("--kinds", default=",".join(KINDS), help="subset of: " + ", ".join(KINDS))
    parser.add_argument("--pickups", type=int, help="pickup trials per fleet (default 5; "
                        "quick 2; 0: none)")
    parser.add_argument("--batch", type=int, default=10, help="workers started at once")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds between the last worker's first poll and the window")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the server with no workers first")
    parser.add_argument("--dw-args", default="", help="extra `dockerworker start` options")
    parser.add_argument("--direct", action="store_true",
                        help="the control: workers talk to the server directly (keep-alive, "
                             "no proxy); server CPU and pickup only, no request counts")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help="venv for prefect-docker's worker (created if missing)")
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in (args.counts or ("1,5" if args.quick else "1,10,50"))
                   .split(",")]
    args.seconds = args.seconds or (20.0 if args.quick else 60.0)
    args.pickups = args.pickups if args.pickups is not None else (2 if args.quick else 5)
    if args.quick:
        args.settle = min(args.settle, 3.0)
    args.kinds = [k for k in KINDS if k in args.kinds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    prefect_cli = ensure_prefect_docker_venv(args.venv) if "prefect-docker" in args.kinds else None
    dw_python = install_dockerworker(DOCKERWORKER_VENV) if "dockerworker" in args.kinds else None
    client = docker.from_env()
    client.ping()
    try:
        client.images.get(FLOWS_IMAGE)
    except docker.errors.ImageNotFound:
        client.images.get(PREFECT_IMAGE)  # images/build-local.sh makes it
        print(f"building {FLOWS_IMAGE} ...", flush=True)
        build_flow_image(client)
    template = prefect_docker_template()
    workdir = Path(tempfile.mkdtemp(prefix="dockerworker-fleet-"))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {"fleets": {}}
    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
            "counts": args.counts, "seconds": args.seconds, "pickups": args.pickups,
            "kinds": args.kinds, "dw_args": args.dw_args, "direct": args.direct,
            "prefect_docker": list(PREFECT_DOCKER_REQS), "workdir": str(workdir)}
    server = start_prefect_server()
    rig = PrefectRig(server.url)
    ok = True
    try:
        print(f"Prefect server at {server.url}; counts {args.counts}, {args.seconds:g} s "
              "windows", flush=True)
        if args.baseline:
            time.sleep(5)
            results["baseline"] = measure_baseline(server, min(args.seconds, 10.0)
                                                   if args.quick else args.seconds)
            print(f"[baseline] server {results['baseline']['server_cpu_pct']:.1f} % CPU "
                  "with no workers", flush=True)
        for kind in args.kinds:
            rows = results["fleets"].setdefault(kind, [])
            for count in args.counts:
                row: dict[str, Any] = {}
                rows.append(row)
                try:
                    bench_fleet(kind, count, server, rig, client, template, workdir,
                                prefect_cli, dw_python, args, row)
                except Exception as exc:  # noqa: BLE001 - keep what was measured, go on
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    ok = False
    finally:
        rig.close()
        server.stop()
    print()
    print(table(results))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"fleet-{stamp}.json"
    meta["loadavg_after"] = os.getloadavg()
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(f"\nwritten {out}; worker output in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

