"""Quick start: the compose stack (PostgreSQL, Prefect server, 3 dockerworker replicas) up,
one flow run in its own container, its final state and logs printed.

Run with `make demo` (which first builds the local images: this machine may reach no
registry). The stack stays up afterwards; the last lines say how to use and stop it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import docker
from testrig.prefect_rig import PrefectRig, compose_stack

HERE = Path(__file__).resolve().parent
SECRETS = HERE.parent / "compose" / "secrets"  # the stack's secret files (compose/.env.example)

IMAGE = "dockerworker-demo/flows:dev"
POOL = "demo"
PROJECT = "dockerworker-demo"


def main() -> int:
    client = docker.from_env()
    print(f"Building {IMAGE} (the example flow on the Prefect runtime image) ...", flush=True)
    client.images.build(path=str(HERE), tag=IMAGE, rm=True, pull=False)
    print("Building the worker image and bringing up the compose stack ...", flush=True)
    stack = compose_stack(client, POOL, PROJECT, int(os.environ.get("PREFECT_PORT", "4200")),
                          secrets_dir=SECRETS)
    up = stack.up()
    if up.returncode != 0:
        print(up.stdout + up.stderr + stack.logs(), file=sys.stderr)
        return 1
    workers = stack.wait_for_workers(3)
    print(f"Prefect server at {stack.api_url}; workers online: "
          f"{', '.join(w['name'] for w in workers)}", flush=True)
    rig = PrefectRig(stack.api_url, auth=stack.auth)  # the server wants its auth string
    # The pool's defaults: the demo image, the stack's network (to reach the server), and
    # containers removed once their verdict is in.
    template = rig.read_work_pool(POOL)["base_job_template"]
    template["variables"]["properties"]["image"]["default"] = IMAGE
    template["variables"]["properties"]["networks"]["default"] = [stack.network]
    template["variables"]["properties"]["auto_remove"]["default"] = True
    rig._call("PATCH", f"/work_pools/{POOL}", {"base_job_template": template})
    deployment = rig.create_deployment(POOL, "hello_docker.py:hello_docker", name="hello-docker")
    run_id = rig.create_flow_run(deployment, parameters={"name": "the quick start"})
    print(f"Created flow run {run_id}; waiting for it ...", flush=True)
    run = rig.wait_for_final(run_id, timeout=300)
    state = run["state"]
    deadline = time.monotonic() + 30  # the worker's verdict line ends the run's story
    while not any("exited with code" in e["message"] for e in rig.read_logs(run_id)):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"\nFlow run {run['name']}: {state['type']}"
          + (f" - {state['message']}" if state.get("message") else ""))
    print("Its logs on the server:")
    for entry in rig.read_logs(run_id):
        print(f"  {entry['timestamp'][11:23]} {entry['name']}: {entry['message']}")
    rig.close()
    auth_file = SECRETS / "prefect_auth_string"
    print(f"\nThe stack keeps running (API {stack.api_url}, basic auth from {auth_file}). Try: "
          f"PREFECT_API_URL={stack.api_url} PREFECT_API_AUTH_STRING_FILE={auth_file} "
          f".venv/bin/dockerworker doctor --pool {POOL}")
    print(f"Stop it with: SECRETS_DIR={SECRETS} PREFECT_NETWORK={stack.network} "
          f"{' '.join(stack.command('down', '-v'))}")
    return 0 if state["type"] == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
