"""The `dockerworker` command line."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import click
import docker
import docker.errors
from pydantic import ValidationError

from . import __version__
from .api import PrefectAPI
from .jobs import describe_validation_error
from .settings import DEFAULT_API_URL, WorkerSettings, docker_host_description
from .worker import Worker


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def connect_docker() -> docker.DockerClient:
    """The Docker engine named by DOCKER_HOST (or the default socket); exit 1 if it is absent."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise click.ClickException(
            f"cannot reach the Docker engine at {docker_host_description()}: {exc}\n"
            "Is Docker running? When the worker runs in a container, mount the socket: "
            "-v /var/run/docker.sock:/var/run/docker.sock (or set DOCKER_HOST)."
        ) from None
    return client


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dockerworker")
def main() -> None:
    """A Docker-native worker for self-hosted Prefect: each flow run in its own container."""


@main.command()
@click.option("--pool", "-p", required=True, envvar="DOCKERWORKER_POOL",
              help="Work pool to serve (created with type docker if missing).")
@click.option("--work-queue", "-q", "work_queues", multiple=True,
              help="Only take runs from this queue (repeatable; default: all queues).")
@click.option("--name", "-n", envvar="DOCKERWORKER_NAME",
              help="Worker name shown in the pool (default: dockerworker-<host>-<random>).")
@click.option("--limit", "-l", type=click.IntRange(min=1), envvar="DOCKERWORKER_LIMIT",
              help="Most flow runs this worker runs at once (default: no limit).")
@click.option("--poll-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              envvar="DOCKERWORKER_POLL_INTERVAL", help="Seconds between polls for runs.")
@click.option("--prefetch-seconds", type=click.FloatRange(min=0), default=10.0,
              show_default=True, envvar="DOCKERWORKER_PREFETCH_SECONDS",
              help="Claim runs scheduled up to this many seconds ahead.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=1), default=30.0,
              show_default=True, envvar="DOCKERWORKER_HEARTBEAT_INTERVAL",
              help="Seconds between heartbeats to the pool.")
@click.option("--run-once", is_flag=True,
              help="Process the runs that are due now, wait for them, then exit.")
@click.option("--api-url", envvar="PREFECT_API_URL", default=DEFAULT_API_URL, show_default=True,
              help="Prefect API URL [env: PREFECT_API_URL].")
@click.option("--log-level", default="INFO", envvar="DOCKERWORKER_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              show_default=True)
def start(
    pool: str,
    work_queues: tuple[str, ...],
    name: str | None,
    limit: int | None,
    poll_interval: float,
    prefetch_seconds: float,
    heartbeat_interval: float,
    run_once: bool,
    api_url: str,
    log_level: str,
) -> None:
    """Poll a work pool and run each flow run in its own sibling container.

    Credentials come from the environment: PREFECT_API_KEY (bearer token) or
    PREFECT_API_AUTH_STRING (user:password for a server with basic auth). The Docker engine
    is the one DOCKER_HOST names, or the local socket.
    """
    _configure_logging(log_level)
    values = {
        "api_url": api_url,
        "api_key": os.environ.get("PREFECT_API_KEY") or None,
        "auth_string": os.environ.get("PREFECT_API_AUTH_STRING") or None,
        "pool": pool,
        "work_queues": list(work_queues),
        "limit": limit,
        "poll_interval": poll_interval,
        "prefetch_seconds": prefetch_seconds,
        "heartbeat_interval": heartbeat_interval,
        "run_once": run_once,
    }
    if name:
        values["name"] = name
    try:
        settings = WorkerSettings.model_validate(values)
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc, "settings")) from None
    docker_client = connect_docker()
    api = PrefectAPI(
        settings.api_url,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        auth_string=settings.auth_string.get_secret_value() if settings.auth_string else None,
    )
    worker = Worker(settings, api, docker_client)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("dockerworker").info(
            "%s received: no new claims; running flow containers keep running",
            signal.Signals(signum).name,
        )
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    sys.exit(worker.run())


if __name__ == "__main__":
    main()
