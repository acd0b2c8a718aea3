"""The `dockerworker` command line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from types import FrameType

import click
import docker
import docker.errors
from pydantic import ValidationError

from . import __version__
from .api import PrefectAPI, PrefectAPIError
from .builds import list_builds, prune_builds
from .doctor import Doctor
from .health import serve_health
from .jobs import (
    InvalidJobVariables,
    default_base_job_template,
    describe_validation_error,
    merge_job_variables,
    resolve_job,
)
from .policy import Masker, Policy, PolicyError
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
              help="Worker name shown in the pool; a restarted worker adopts the containers carrying "
                   "it (default: dockerworker-<hostname>).")
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
@click.option("--max-starting", type=click.IntRange(min=0), envvar="DOCKERWORKER_MAX_STARTING",
              help="Most runs starting at once (claimed, not yet RUNNING); the rest stay "
                   "scheduled for the next poll or another worker. 0: no bound "
                   "(default: the number of CPUs).")
@click.option("--warm", type=click.IntRange(0, 32), default=0, show_default=True,
              envvar="DOCKERWORKER_WARM",
              help="Warm starts: keep up to this many containers with Prefect already imported "
                   "waiting for runs, shared among the job configurations in use (at least one "
                   "each, the most recently used first); each still serves one run.")
@click.option("--run-once", is_flag=True,
              help="Process the runs that are due now, wait for them, then exit.")
@click.option("--drain", is_flag=True, envvar="DOCKERWORKER_DRAIN",
              help="On SIGTERM/SIGINT, wait for this worker's runs to finish before exiting "
                   "(default: leave their containers running for the next worker to adopt).")
@click.option("--health-port", type=click.IntRange(0, 65535), envvar="DOCKERWORKER_HEALTH_PORT",
              help="Serve GET /health on this port (200 while the loop polls).")
@click.option("--api-url", envvar="PREFECT_API_URL", default=DEFAULT_API_URL, show_default=True,
              help="Prefect API URL [env: PREFECT_API_URL].")
@click.option("--build-network", envvar="DOCKERWORKER_BUILD_NETWORK",
              help="Network mode for dependency image builds (e.g. host).")
@click.option("--build-ca-bundle", envvar="DOCKERWORKER_BUILD_CA_BUNDLE",
              type=click.Path(exists=True, dir_okay=False),
              help="CA bundle pip trusts inside builds (TLS-inspecting proxies).")
@click.option("--build-timeout", type=click.FloatRange(min=1), default=1800.0,
              show_default=True, envvar="DOCKERWORKER_BUILD_TIMEOUT",
              help="Seconds a dependency image build may take.")
@click.option("--policy", "policy_file", envvar="DOCKERWORKER_POLICY_FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Policy file (TOML): what deployments may ask of Docker. "
                   "Default: the safe built-in policy.")
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
    max_starting: int | None,
    warm: int,
    run_once: bool,
    drain: bool,
    health_port: int | None,
    api_url: str,
    build_network: str | None,
    build_ca_bundle: str | None,
    build_timeout: float,
    policy_file: Path | None,
    log_level: str,
) -> None:
    """Poll a work pool and run each flow run in its own sibling container.

    Credentials come from the environment: PREFECT_API_KEY (bearer token) or
    PREFECT_API_AUTH_STRING (user:password for a server with basic auth). The Docker engine
    is the one DOCKER_HOST names, or the local socket. PIP_INDEX_URL and PIP_EXTRA_INDEX_URL
    are passed on to dependency image builds.
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
        "warm": warm,
        "run_once": run_once,
        "drain": drain,
        "health_port": health_port,
        "build_network_mode": build_network,
        "build_ca_bundle": build_ca_bundle,
        "build_timeout": build_timeout,
        "pip_index_url": os.environ.get("PIP_INDEX_URL") or None,
        "pip_extra_index_url": os.environ.get("PIP_EXTRA_INDEX_URL") or None,
    }
    if name:
        values["name"] = name
    if max_starting is not None:
        values["max_starting"] = max_starting
    try:
        values["policy"] = Policy.load(policy_file)
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None
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
    if settings.health_port is not None:
        serve_health(worker, settings.health_port)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger = logging.getLogger("dockerworker")
        if worker.stop_event.is_set():
            logger.warning("%s received again: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info(
            "%s received: no new claims; %s", signal.Signals(signum).name,
            "waiting for this worker's runs (--drain)" if settings.drain
            else "running flow containers keep running",
        )
        worker.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    sys.exit(worker.run())


@main.command()
@click.option("--pool", "-p", required=True, envvar="DOCKERWORKER_POOL", help="Work pool to check.")
@click.option("--api-url", envvar="PREFECT_API_URL", default=DEFAULT_API_URL, show_default=True,
              help="Prefect API URL [env: PREFECT_API_URL].")
def doctor(pool: str, api_url: str) -> None:
    """Check the server, credentials, pool, workers, waiting runs and Docker; say how to fix
    what is wrong. Exit code 1 if anything is."""
    api, secrets = _api_from_env(api_url, patience=0)
    healthy = Doctor(api, pool, Masker(secrets)).run(click.echo)
    sys.exit(0 if healthy else 1)


def _api_from_env(api_url: str, patience: float = 120.0) -> tuple[PrefectAPI, set[str]]:
    key = os.environ.get("PREFECT_API_KEY") or None
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or None
    secrets = {s for s in (key, auth, (auth or "").partition(":")[2]) if s}
    return PrefectAPI(api_url, api_key=key, auth_string=auth, patience=patience), secrets


@main.group()
def pool() -> None:
    """Create a docker work pool with dockerworker's template, or inspect one."""


_API_URL = click.option("--api-url", envvar="PREFECT_API_URL", default=DEFAULT_API_URL,
                        show_default=True, help="Prefect API URL [env: PREFECT_API_URL].")


@pool.command("create")
@click.argument("name")
@click.option("--image", help="Default image for the pool's runs.")
@_API_URL
def pool_create(name: str, image: str | None, api_url: str) -> None:
    """Create pool NAME (type docker) with dockerworker's base job template."""
    api, _ = _api_from_env(api_url, patience=5)
    template = default_base_job_template()
    if image:
        template["variables"]["properties"]["image"]["default"] = image
    try:
        created = api.create_work_pool(name, "docker", template)
    except PrefectAPIError as exc:
        raise click.ClickException(f"could not create work pool {name!r}: {exc}") from None
    click.echo(f"created work pool {created.name!r} (type docker)")


@pool.command("inspect")
@click.argument("name")
@click.option("--deployment", "deployment_ref",
              help="Deployment id or FLOW/DEPLOYMENT name: show its resolved job variables.")
@_API_URL
def pool_inspect(name: str, deployment_ref: str | None, api_url: str) -> None:
    """Show pool NAME's job variable defaults, or what a deployment's runs would get."""
    api, secrets = _api_from_env(api_url, patience=5)
    try:
        work_pool = api.read_work_pool(name)
        values: dict = {}
        if deployment_ref:
            deployment = (api.read_deployment_by_name(deployment_ref) if "/" in deployment_ref
                          else api.read_deployment(deployment_ref))
            values = merge_job_variables(deployment.job_variables, None)
        job = resolve_job(work_pool.base_job_template, values)
    except (PrefectAPIError, InvalidJobVariables) as exc:
        raise click.ClickException(str(exc)) from None
    shown = {"pool": work_pool.name, "type": work_pool.type,
             "job_variables": job.model_dump(mode="json")}
    if job.registry_credentials:
        secrets.add(job.registry_credentials.password)
    mask = Masker.for_env(job.env, secrets)
    click.echo(mask(json.dumps(shown, indent=2)))


@main.group()
def images() -> None:
    """Per-deployment dependency images this engine holds (built by dockerworker)."""


@images.command("ls")
def images_ls() -> None:
    """List built images: tag, deployment, size, created, last used."""
    builds = list_builds(connect_docker())
    rows = [("TAG", "DEPLOYMENT", "SIZE", "CREATED", "LAST USED")]
    rows += [
        (b.tag, b.deployment, f"{b.size / 1e6:.0f} MB", b.created, b.last_used) for b in builds
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> float:
    """`7d`, `12h`, `30m`, `45s`, `2w` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration like 7d, 12h, 30m or 45s")
    return float(match.group(1)) * _UNITS[match.group(2)]


@images.command("prune")
@click.option("--older-than", default="7d", show_default=True,
              help="Remove builds not used for this long (e.g. 7d, 12h, 0s).")
@click.option("--keep", type=click.IntRange(min=0), default=None,
              help="Always keep the N most recently used builds of each deployment.")
def images_prune(older_than: str, keep: int | None) -> None:
    """Remove old dependency images; never one a container uses."""
    removed, busy = prune_builds(connect_docker(), parse_duration(older_than), keep)
    for tag in removed:
        click.echo(f"removed {tag}")
    for tag in busy:
        click.echo(f"kept {tag} (in use by a container)")
    click.echo(f"{len(removed)} removed, {len(busy)} in use")


if __name__ == "__main__":
    main()
