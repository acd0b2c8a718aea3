"""`dockerworker doctor`: why are my runs stuck in Pending? Each check says ✓ or ✗ and a fix."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import docker
import docker.errors

from . import flowcode
from .api import AuthRejected, NotFound, PrefectAPI, PrefectAPIError, WorkPool
from .containers import network_mode_for
from .jobs import DEFAULT_IMAGE, InvalidJobVariables, resolve_job
from .policy import Masker
from .settings import docker_host_description

MIN_FREE_BYTES = 5 * 1024**3


@dataclass
class Check:
    ok: bool
    title: str
    fix: str = ""
    details: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"{'✓' if self.ok else '✗'} {self.title}"]
        lines += [f"    {d}" for d in self.details]
        if not self.ok and self.fix:
            lines.append(f"    fix: {self.fix}")
        return "\n".join(lines)


class Doctor:
    """Runs the checks in order; later ones are skipped when what they need is missing."""

    def __init__(self, api: PrefectAPI, pool: str, mask: Masker,
                 reach: tuple[str, ...] = ()) -> None:
        self.api = api
        self.pool_name = pool
        self.mask = mask
        self.reach_urls = reach  # opt-in: addresses a flow container must reach
        self.checks: list[Check] = []
        self.pool: WorkPool | None = None
        self.online: list[dict[str, Any]] = []  # filled by the workers check

    def run(self, emit: Callable[[str], None]) -> bool:
        """Emit each check as it is made; True when all passed."""
        prefect = (self.server, self.credentials, self.work_pool, self.queues, self.workers,
                   self.waiting_runs)
        for step in prefect:
            check = step()
            if check is not None:
                self._add(check, emit)
                if not check.ok and step in (self.server, self.credentials):
                    break  # nothing else on the Prefect side can be checked
        for check in self.docker_engine():
            self._add(check, emit)
        return all(check.ok for check in self.checks)

    def _add(self, check: Check, emit: Callable[[str], None]) -> None:
        self.checks.append(check)
        emit(self.mask(check.render()))

    # --- the Prefect side ---------------------------------------------------------------
    def server(self) -> Check:
        url = _without_userinfo(self.api.api_url)
        try:
            self.api.health(patience=0)
        except AuthRejected:
            return Check(True, f"the API at {url} answers (behind credentials)")
        except PrefectAPIError as exc:
            return Check(False, f"the API at {url} does not answer: {exc}",
                         "start the Prefect server, or set PREFECT_API_URL (or --api-url) to "
                         "its address, ending in /api")
        try:
            server = self.api.server
        except PrefectAPIError:
            return Check(True, f"the API at {url} answers: Prefect server (version not readable)")
        details = [f"not on Prefect {server.major}: {line}" for line in server.limitations()]
        if self.api.basic_auth and not server.basic_auth:
            details.append("PREFECT_API_AUTH_STRING is set, but a Prefect 2 server has no basic "
                           "auth: only a proxy in front of it can check it, and the flow "
                           "containers' Prefect 2 client does not send it")
        if server.major == 2:
            details.append(f"runs without an image get {server.default_image} (the server's "
                           "own version)")
        return Check(True, f"the API at {url} answers: Prefect server {server.version} "
                     f"(Prefect {server.major})", details=details)

    def credentials(self) -> Check:
        try:
            self.api.probe_work_pools(patience=0)
        except AuthRejected as exc:
            return Check(False, f"credentials rejected: {exc}",
                         "set PREFECT_API_KEY (bearer) or PREFECT_API_AUTH_STRING (user:password) "
                         "to what the server expects")
        except PrefectAPIError as exc:
            return Check(False, f"could not check credentials: {exc}")
        csrf = "the server has CSRF protection on: the worker sends a token with each write"
        details = [csrf] if self.api.csrf_protected else []
        return Check(True, "credentials accepted", details=details)

    def work_pool(self) -> Check:
        try:
            self.pool = self.api.read_work_pool(self.pool_name, patience=0)
        except NotFound:
            return Check(False, f"work pool {self.pool_name!r} does not exist",
                         f"dockerworker pool create {self.pool_name}, or start a worker with "
                         f"--pool {self.pool_name} (it creates the pool)")
        details = [f"type {self.pool.type}"]
        problems = []
        if self.pool.type != "docker":
            problems.append(f"type is {self.pool.type!r}, not 'docker'")
        if self.pool.is_paused:
            problems.append("the pool is paused: no run is handed out")
        if problems:
            return Check(False, f"work pool {self.pool_name!r}: " + "; ".join(problems),
                         f"prefect work-pool resume {self.pool_name}", details)
        return Check(True, f"work pool {self.pool_name!r} exists", details=details)

    def queues(self) -> Check | None:
        if self.pool is None:
            return None
        rows = self.api.read_work_queues(self.pool_name, patience=0)
        paused = [row["name"] for row in rows if row.get("is_paused")]
        details = [
            f"{row['name']}: priority {row.get('priority')}, concurrency limit "
            f"{row.get('concurrency_limit') or 'none'}{' (paused)' if row.get('is_paused') else ''}"
            for row in rows
        ]
        if paused:
            return Check(False, f"paused queues: {', '.join(paused)}",
                         "resume them: prefect work-queue resume NAME --pool "
                         f"{self.pool_name}", details)
        return Check(True, f"{len(rows)} queue(s)", details=details)

    def workers(self) -> Check | None:
        if self.pool is None:
            return None
        rows = self.api.read_workers(self.pool_name, patience=0)
        self.online = online = [row for row in rows if row.get("status") == "ONLINE"]
        if not online:
            return Check(False, f"no worker online in pool {self.pool_name!r}",
                         f"start one: dockerworker start --pool {self.pool_name}")
        return Check(True, f"{len(online)} worker(s) online",
                     details=[row["name"] for row in online])

    def waiting_runs(self) -> Check | None:
        if self.pool is None:
            return None
        runs = self.api.flow_runs_by_state_name(self.pool_name, ["Late", "Pending"], limit=50,
                                                patience=0)
        stale = datetime.now(UTC) - timedelta(minutes=5)
        stuck = [r for r in runs if r["state"]["name"] == "Late" or
                 datetime.fromisoformat(r["state"]["timestamp"]) < stale]
        if not stuck:
            return Check(True, "no Late runs, no run Pending for more than 5 minutes")
        reasons = []
        if not self.online:
            reasons.append("no worker is online for the pool")
        if self.pool.is_paused:
            reasons.append("the pool is paused")
        if self.pool.concurrency_limit is not None:
            reasons.append(f"the pool's concurrency limit is {self.pool.concurrency_limit}")
        for deployment_id in {r["deployment_id"] for r in stuck if r.get("deployment_id")}:
            try:
                deployment = self.api.read_deployment(deployment_id, patience=0)
            except NotFound:
                reasons.append(f"deployment {deployment_id} no longer exists")
                continue
            if deployment.paused:
                reasons.append(f"deployment {deployment.name!r} is paused")
            if deployment.concurrency_limit:
                reasons.append(f"deployment {deployment.name!r} has concurrency limit "
                               f"{deployment.concurrency_limit}")
        details = [f"{r['name']} ({r['state']['name']})" for r in stuck[:10]]
        return Check(False, f"{len(stuck)} run(s) Late or stuck in Pending: "
                     + ("; ".join(reasons) or "no obvious reason: check the worker's console"),
                     "fix the reasons above; a run Pending long after its container exited "
                     "is reconciled by a running dockerworker", details)

    # --- the Docker side ----------------------------------------------------------------
    def docker_engine(self) -> list[Check]:
        where = docker_host_description()
        try:
            client = docker.from_env()
            version = client.version()
        except docker.errors.DockerException as exc:
            return [Check(False, f"Docker engine at {where} does not answer: {exc}",
                          "start Docker, or mount the socket into the worker's container: "
                          "-v /var/run/docker.sock:/var/run/docker.sock")]
        checks = [Check(True, f"Docker engine {version.get('Version')} at {where}")]
        if self.pool is not None:  # the default image is the pool's
            checks.append(self._default_image(client))
            checks += [reach_from_container(client, self.pool, self.api.api_url, url)
                       for url in self.reach_urls]
        return [*checks, self._disk(client)]

    def _default_image(self, client: docker.DockerClient) -> Check:
        assert self.pool is not None
        image = default_image(self.pool)
        try:
            client.images.get(image)
            return Check(True, f"default image {image} is present")
        except docker.errors.ImageNotFound:
            pass
        try:
            client.images.get_registry_data(image)
            return Check(True, f"default image {image} is not present but can be pulled")
        except docker.errors.APIError as exc:
            return Check(False, f"default image {image} is absent and cannot be pulled: "
                         f"{exc.explanation or exc}",
                         "load or build it on this host, or set the pool's `image` default to "
                         "one the registry serves")

    def _disk(self, client: docker.DockerClient) -> Check:
        root = client.info().get("DockerRootDir", "/var/lib/docker")
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            return Check(True, f"free disk for images: unknown ({root} is not visible here)")
        title = f"free disk for images at {root}: {free / 1024**3:.1f} GiB"
        if free < MIN_FREE_BYTES:
            return Check(False, title, "dockerworker images prune; docker system prune")
        return Check(True, title)


def default_image(pool: WorkPool) -> str:
    variables = pool.base_job_template.get("variables", {})
    image = (variables.get("properties", {}).get("image", {}) or {}).get("default")
    return image or DEFAULT_IMAGE  # read_work_pool fills in the server's own default


# Run by the pool's image in a throwaway container: resolve, connect, and which of the tools
# pull steps use are there. Standard library only; prints one JSON object.
_REACH_SCRIPT = """
import json, shutil, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
out = {"tools": [t for t in ("git", "ssh") if shutil.which(t)]}
try:
    out["addresses"] = sorted({a[4][0] for a in socket.getaddrinfo(host, port,
                                                                   type=socket.SOCK_STREAM)})
    started = time.monotonic()
    socket.create_connection((host, port), timeout=5).close()
    out["ms"] = round((time.monotonic() - started) * 1000)
except OSError as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""
_DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418, "git+ssh": 22}
_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?!//)")


def reach_target(url: str) -> tuple[str, int, bool]:
    """(host, port, is git) of a repository or endpoint URL, `git@host:org/repo.git` too;
    ValueError when it names no host and port."""
    if match := _SCP_LIKE.match(url):
        return match["host"], 22, True
    parsed = urlparse(url)
    try:
        port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme)
    except ValueError:
        port = None
    if not parsed.hostname or port is None or parsed.scheme not in _DEFAULT_PORTS:
        raise ValueError("give an http(s), ssh or git URL, or user@host:path "
                         "(for an object store, its endpoint URL)")
    is_git = parsed.scheme in ("ssh", "git", "git+ssh") or parsed.path.endswith(".git")
    return parsed.hostname, port, is_git


def reach_from_container(client: docker.DockerClient, pool: WorkPool, api_url: str,
                         url: str) -> Check:
    """Whether a flow container of the pool (its default image and network) resolves and
    reaches `url`: the "works on my machine" case of a pull step."""
    shown = _without_userinfo(url)
    try:
        host, port, is_git = reach_target(url)
    except ValueError as exc:
        return Check(False, f"cannot try to reach {shown}: {exc}")
    image = default_image(pool)
    try:
        job = resolve_job(pool.base_job_template, {})
    except InvalidJobVariables as exc:
        return Check(False, f"cannot try to reach {shown}: the pool's template is invalid: "
                     f"{exc}")
    network_mode = network_mode_for(job, api_url)
    network = network_mode or (job.networks[0] if job.networks else "default")
    where = f"from a container of {image} (network {network})"
    try:
        raw = client.containers.run(
            image, ["python", "-c", _REACH_SCRIPT, host, str(port)], remove=True,
            network_mode=network_mode, network=job.networks[0] if job.networks else None,
            labels={"io.dockerworker.doctor": "reach"}, stdout=True, stderr=True)
        result = json.loads(raw.decode().strip().splitlines()[-1])
    except (docker.errors.DockerException, ValueError, IndexError) as exc:
        return Check(False, f"could not try {shown} {where}: {exc}",
                     "the image must exist here and have python on its PATH")
    details = [f"the image has {', '.join(result['tools']) or 'neither git nor ssh'}"]
    if "ms" in result:
        ok = not is_git or "git" in result["tools"]
        title = (f"{host}:{port} reached {where}: resolves to {', '.join(result['addresses'])}, "
                 f"connected in {result['ms']} ms")
        return Check(ok, title, "use an image with git for git_clone steps "
                     f"(see {flowcode.DOCS})", details)
    cause = result.get("error", "unknown error")
    stage = "resolve" if "addresses" not in result else "connect to"
    return Check(False, f"could not {stage} {host}:{port} {where}: {cause}",
                 "check the URL, the pool's network_mode/networks and the host's DNS and "
                 "firewall; a host on the Docker host's loopback needs network_mode host",
                 details)


def _without_userinfo(url: str) -> str:
    parsed = urlparse(url)
    if parsed.username or parsed.password:
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")
                               ).geturl()
    return url
