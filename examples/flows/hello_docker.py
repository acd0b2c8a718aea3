"""The demo flow: says where it runs, so you can see it ran in its own container."""

import os
import platform

from prefect import flow, task


@task
def where_am_i() -> str:
    inside = "a Docker container" if os.path.exists("/.dockerenv") else "no container (?)"
    return f"{inside} (Python {platform.python_version()}, PID {os.getpid()})"


@flow(log_prints=True)
def hello_docker(name: str = "dockerworker") -> str:
    place = where_am_i()
    print(f"Hello from {name}, running in {place}")
    return place
