"""The `dockerworker` command line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click
import docker
import docker.errors
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import __version__, logformat
from .api import PrefectAPI, PrefectAPIError
from .builds import list_builds, prune_builds
from .health import serve_health
from .jobs import (
    InvalidJobVariables,
    default_base_job_template,
    describe_validation_error,
    merge_job_variables,
    resolve_job,
)
from .policy import Masker, Policy, PolicyError, mask_logging
from .settings import (
    Flag,
    SecretSourceError,
    WorkerSettings,
    credentials_reader,
    docker_host_description,
    env_only_values,
    flags,
)
from .worker import Worker

F = TypeVar("F", bound=Callable[..., Any])


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


def compose_worker_name(client: docker.DockerClient, in_container: bool | None = None
                        ) -> str | None:
    """In a compose replica: `dockerworker-<project>-<service>-<n>` from the labels compose
    puts on our own container (found by our hostname, its short id). Compose gives a
    recreated replica the same number, so it keeps its name and takes its containers back at
    once; None elsewhere (the default name, dockerworker-<hostname>, stays)."""
    if in_container is None:
        in_container = Path("/.dockerenv").exists()
    if not in_container:
        return None
    try:
        labels = client.containers.get(socket.gethostname()).labels or {}
    except Exception:  # noqa: BLE001 - a name is a nicety, never a reason not to start
        return None
    parts = [labels.get(f"com.docker.compose.{key}")
             for key in ("project", "service", "container-number")]
    if not all(parts):
        return None
    return "dockerworker-" + "-".join(str(part) for part in parts)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dockerworker")
def main() -> None:
    """A Docker-native worker for self-hosted Prefect: each flow run in its own container."""


def _click_type(field: FieldInfo, flag: Flag) -> Any:
    """The click type of a setting, with the field's own bounds."""
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):  # `X | None`: the flag is X, absent is None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if get_origin(kind) is Literal:
        return click.Choice(get_args(kind), case_sensitive=False)
    if flag.existing_file:
        return click.Path(exists=True, dir_okay=False, path_type=Path)
    bounds: dict[str, Any] = {}
    for meta in field.metadata:  # pydantic's constraints (Ge, Gt, Le, or an Interval)
        if getattr(meta, "ge", None) is not None:
            bounds["min"] = meta.ge
        if getattr(meta, "gt", None) is not None:
            bounds.update(min=meta.gt, min_open=True)
        if getattr(meta, "le", None) is not None:
            bounds["max"] = meta.le
    if kind is int:
        return click.IntRange(**bounds) if bounds else int
    if kind is float:
        return click.FloatRange(**bounds) if bounds else float
    return None  # click's default: text


def setting_option(name: str, **overrides: Any) -> Callable[[F], F]:
    """A click option for `WorkerSettings.<name>`: its flag, env variable, default, bounds and
    help all come from the model; the parameter is named like the field."""
    field = WorkerSettings.model_fields[name]
    flag = flags()[name]
    decls = [flag.name, *([flag.short] if flag.short else []), flag.param or name]
    kwargs: dict[str, Any] = {"help": field.description, "show_default": True}
    if flag.env:
        kwargs.update(envvar=flag.env, show_envvar=True)
    if flag.param:  # a file the field is read from: no default of its own
        kwargs["type"] = _click_type(field, flag)
    elif field.annotation is bool:
        kwargs["is_flag"] = True
    elif get_origin(field.annotation) is list:
        kwargs["multiple"] = True
    else:
        kwargs["type"] = _click_type(field, flag)
    if field.is_required():
        kwargs["required"] = True
    elif field.default is not None and field.default is not PydanticUndefined:
        kwargs["default"] = field.default  # a computed default stays the model's: flag unset
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def settings_options(command: F) -> F:
    """Every flagged setting as an option of `command`, in the model's order."""
    for name in reversed(list(flags())):
        command = setting_option(name)(command)
    return command


@main.command()
@settings_options
def start(policy_file: Path | None, **options: Any) -> None:
    """Poll a work pool and run each flow run in its own sibling container.

    Credentials come from the environment: PREFECT_API_KEY (bearer token) or
    PREFECT_API_AUTH_STRING (user:password for a server with basic auth), or from the files
    PREFECT_API_KEY_FILE / PREFECT_API_AUTH_STRING_FILE name (Docker secrets; read again
    when the server refuses them, so a rotated file is picked up). The Docker engine is the
    one DOCKER_HOST names, or the local socket. PIP_INDEX_URL and PIP_EXTRA_INDEX_URL (or
    their _FILE) are passed on to dependency image builds.
    """
    logformat.configure(options["log_level"], options["log_format"])
    # Unset flags without a default (None) leave the model's own (computed) default.
    values: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    values["work_queues"] = list(options["work_queues"])
    try:
        values.update(env_only_values())
        reread = credentials_reader()
    except SecretSourceError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        values["policy"] = Policy.load(policy_file)
    except PolicyError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        settings = WorkerSettings.model_validate(values)
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc, "settings")) from None
    masked = settings.secrets()
    mask_logging(Masker(masked))
    docker_client = connect_docker()
    if "name" not in values and (stable := compose_worker_name(docker_client)):
        settings = settings.model_copy(update={"name": stable})

    def rotated(api_key: str | None, auth_string: str | None) -> None:
        """New credentials from the files: flows started from now on get them too; old
        and new stay masked."""
        settings.api_key = SecretStr(api_key) if api_key else None
        settings.auth_string = SecretStr(auth_string) if auth_string else None
        masked.update(settings.secrets())
        mask_logging(Masker(masked))
        if worker.events is not None:  # its subscription was made with the old ones
            worker.events.credentials_rotated()

    api = PrefectAPI(
        settings.api_url,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        auth_string=settings.auth_string.get_secret_value() if settings.auth_string else None,
        patience=settings.api_patience, reread_credentials=reread, on_rotated=rotated,
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
@setting_option("pool", help="Work pool to check.")
@setting_option("api_url")
@click.option("--reach", "reach", multiple=True, metavar="URL",
              help="Also try, from a throwaway container of the pool's default image and "
                   "network, to resolve and connect to URL (a git repository, "
                   "git@host:org/repo.git, or an object store's endpoint). Repeatable.")
def doctor(pool: str, api_url: str, reach: tuple[str, ...]) -> None:
    """Check the server, credentials, pool, workers, waiting runs and Docker; say how to fix
    what is wrong. Exit code 1 if anything is."""
    api, secrets = _api_from_env(api_url, patience=0)
    from .doctor import Doctor  # only this command needs it: `start` stays lighter

    healthy = Doctor(api, pool, Masker(secrets), reach).run(click.echo)
    sys.exit(0 if healthy else 1)


def _api_from_env(api_url: str, patience: float) -> tuple[PrefectAPI, set[str]]:
    try:
        env = env_only_values()
    except SecretSourceError as exc:
        raise click.UsageError(str(exc)) from None
    key, auth = env["api_key"], env["auth_string"]
    secrets = {s for s in (key, auth, (auth or "").partition(":")[2]) if s}
    return PrefectAPI(api_url, api_key=key, auth_string=auth, patience=patience), secrets


@main.group()
def pool() -> None:
    """Create a docker work pool with dockerworker's template, or inspect one."""


_API_URL = setting_option("api_url")


@pool.command("create")
@click.argument("name")
@click.option("--image", help="Default image for the pool's runs.")
@_API_URL
def pool_create(name: str, image: str | None, api_url: str) -> None:
    """Create pool NAME (type docker) with dockerworker's base job template."""
    api, _ = _api_from_env(api_url, patience=5)
    try:  # the pool's default image is a Prefect client of the server's own major
        template = default_base_job_template(api.server.default_image)
    except PrefectAPIError as exc:
        raise click.ClickException(f"could not reach the server: {exc}") from None
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
    click.echo(json.dumps(mask.data(shown), indent=2, ensure_ascii=False))


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
