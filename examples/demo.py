"""End-to-end demo: a local Prefect server, a deployment, one flow run in its own container.

Run with `make demo`. It starts a throwaway Prefect server on a free loopback port, builds
the example flow image, creates a `docker` work pool and a deployment, runs
`dockerworker start --pool demo --run-once`, and prints the run's final state and logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import docker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from prefect_rig import PrefectRig, start_prefect_server

from dockerworker.api import PrefectAPI
from dockerworker.jobs import default_base_job_template

IMAGE = "dockerworker-demo/flows:dev"
POOL = "demo"


def main() -> int:
    print(f"Building {IMAGE} from examples/ ...", flush=True)
    docker.from_env().images.build(path=str(HERE), tag=IMAGE, rm=True, pull=False)
    print("Starting a Prefect server on loopback ...", flush=True)
    with start_prefect_server() as server:
        print(f"Prefect server at {server.url}", flush=True)
        PrefectAPI(server.url).create_work_pool(POOL, "docker", default_base_job_template())
        rig = PrefectRig(server.url)
        deployment = rig.create_deployment(
            POOL, "hello_docker.py:hello_docker", {"image": IMAGE}, name="hello-docker"
        )
        run_id = rig.create_flow_run(deployment, parameters={"name": "the demo"})
        print(f"Created flow run {run_id}; starting the worker (--run-once)\n", flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env["PREFECT_API_URL"] = server.url
        worker = subprocess.run(
            [sys.executable, "-m", "dockerworker.cli", "start", "--pool", POOL, "--run-once"],
            env=env,
            check=False,
        )
        run = rig.read_flow_run(run_id)
        state = run["state"]
        print(f"\nWorker exited with {worker.returncode}.")
        print(f"Flow run {run['name']} ({run_id}): {state['type']} - {state.get('message')}")
        print("Its logs on the server:")
        for entry in rig.read_logs(run_id):
            print(f"  {entry['timestamp'][11:23]} {entry['name']}: {entry['message']}")
        rig.close()
        return 0 if state["type"] == "COMPLETED" and worker.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
