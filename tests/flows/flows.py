"""Prefect flows that the integration tests run inside containers (copied to /opt/flows)."""

import time

from prefect import flow


@flow
def hello(name: str = "world") -> str:
    """Print and return a greeting."""
    message = f"hello, {name}"
    print(message)
    return message


@flow(log_prints=True)
def prints_three() -> None:
    """Print three known lines (log_prints=True, so they also become Prefect logs)."""
    print("line one")
    print("line two")
    print("line three")


@flow
def fails() -> None:
    """Fail with a known error."""
    raise ValueError("intended failure")


@flow
def allocate(mb: int = 512) -> int:
    """Hold `mb` MiB of resident memory (every page written), then return the size."""
    block = bytearray(mb * 1024 * 1024)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    return len(block) // (1024 * 1024)


def _report_cancellation(flow, flow_run, state) -> None:
    print(f"on_cancellation hook ran for {flow_run.name}", flush=True)


@flow(on_cancellation=[_report_cancellation])
def sleepy(seconds: float = 5) -> float:
    """Sleep for `seconds`, then return them (a cancellation runs its hook)."""
    time.sleep(seconds)
    return seconds


@flow
def deaf(seconds: float = 120) -> float:
    """Ignore SIGTERM (from the flow's own thread when it is the main one), then sleep: only a
    SIGKILL ends it early."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"deaf in the {threading.current_thread().name} thread", flush=True)
    time.sleep(seconds)
    return seconds


@flow(log_prints=True)
def six_version() -> str:
    """Print the version of `six` the image holds (a per-deployment dependency)."""
    import six

    print(f"six version {six.__version__}")
    return six.__version__


@flow
def ticker(seconds: int = 15) -> int:
    """Print a plain line a second (not through Prefect's logger: only the worker ships it)."""
    import time

    for i in range(1, seconds + 1):
        print(f"tick {i}", flush=True)
        time.sleep(1)
    return seconds


@flow(log_prints=True)
def suspends() -> str:
    """Suspend itself once (the container exits); after `resume` it runs again and finishes."""
    from prefect.flow_runs import suspend_flow_run

    print("before the suspension")
    suspend_flow_run(timeout=600)
    print("after the resumption")
    return "resumed"


@flow(log_prints=True)
def env_value(name: str = "GREETING") -> str:
    """Print an environment variable the deployment sets (its job variables reached the run)."""
    import os

    value = os.environ.get(name, "<unset>")
    print(f"{name}={value}")
    return value


@flow
def secret_length(name: str = "db_password") -> int:
    """Read a secret the worker gave the run (/run/secrets/NAME) and print its length; the
    value too, which the worker must mask in the run's logs."""
    with open(f"/run/secrets/{name}") as file:
        value = file.read()
    print(f"secret {name} has {len(value)} characters")
    print(f"secret value: {value}")
    return len(value)
