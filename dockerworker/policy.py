"""The operator's policy: what a deployment may ask of Docker, checked before Docker is touched.

The worker holds the Docker socket, which is root on the host. A deployment's job variables
ask; this policy (the operator's file and settings, never job variables) decides. A refusal
names each offending variable and the rule; nothing is pulled, built or created.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import logging
import os
import posixpath
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from .builds import BuildLimits
from .capabilities import (
    BUILD_FETCH,
    BUILD_STEP,
    CREATE_KEY,
    GPU,
    IMAGE,
    KERNEL,
    MOUNT,
    NETWORK,
    PRIVILEGE,
    PULL,
    SECRET,
    Mount,
    requests_of,
)
from .hostview import HostView, PathRefused, under
from .jobs import OWN_IMAGES, JobVariables

# container_create_kwargs keys that cannot widen a container's reach on the host. Not here,
# among others: log_config (log drivers run inside the daemon, as root, on the host's network
# and with its cloud credentials), cpu_rt_* (real-time scheduling can starve the host),
# anything that mounts, shares a namespace, adds devices or capabilities, or publishes ports.
SAFE_CREATE_KWARGS = frozenset({
    "blkio_weight", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota", "cpu_shares",
    "cpuset_cpus", "cpuset_mems", "domainname", "entrypoint", "extra_hosts", "healthcheck",
    "hostname", "init", "mem_reservation", "mem_swappiness", "nano_cpus", "pids_limit",
    "platform", "read_only", "shm_size", "stop_signal", "stdin_open", "tmpfs", "tty",
    "ulimits", "user", "working_dir", "dns", "dns_opt", "dns_search", "mac_address",
    "oom_score_adj",
})
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
_SIMPLE_NETWORK_MODES = {"bridge", "none", "default"}
_DRIVER_MODES = {"host": "host", "null": "none"}  # a network that is really a mode


class PolicyError(ValueError):
    """The policy file or settings themselves are wrong."""


class Policy(BaseModel):
    """Rules and hardened defaults; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    allowed_images: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns of images (with registry) deployments may run or build "
        "from.",
    )
    allow_privileged: bool = False
    allowed_volume_prefixes: list[str] = Field(
        default_factory=list,
        description="Host paths under which bind mounts are allowed (symlinks resolved on "
        "the Docker host).",
    )
    allowed_named_volumes: list[str] = Field(
        default_factory=list,
        description="Glob patterns of named volumes deployments may mount (default none: a "
        "named volume can be another application's data).",
    )
    allowed_network_modes: list[str] = Field(
        default_factory=lambda: sorted(_SIMPLE_NETWORK_MODES),
        description="Network modes a job may ask for; named networks are always allowed. "
        "Add `host` or `container:*` to allow those.",
    )
    allowed_create_kwargs: list[str] = Field(
        default_factory=lambda: sorted(SAFE_CREATE_KWARGS),
        description="container_create_kwargs keys deployments may pass.",
    )
    allowed_pull_policies: list[str] = Field(
        default_factory=lambda: ["Always", "IfNotPresent", "IfPossible", "Never"]
    )
    credential_registries: list[str] = Field(
        default_factory=list,
        description="Registries (glob) for which a job's registry_credentials are used; "
        "otherwise the worker's own Docker config is.",
    )
    allowed_secrets: list[str] = Field(
        default_factory=list,
        description="Glob patterns of the secrets (files of the worker's --secrets-dir) "
        "deployments may give their flows (job variable `secrets`); default none.",
    )
    allow_docker_socket: bool = False
    allow_gpus: bool = False
    allow_dockerfile_lines: bool = Field(
        default=False,
        description="dockerfile_lines run in builds, which Docker cannot harden as it hardens "
        "flow containers; pip_packages and requirements need no consent.",
    )
    infra_retries: int = Field(
        default=1, ge=0, le=10,
        description="Default of the infra_retries job variable: reschedules of a run that "
        "crashed because of the infrastructure.",
    )
    no_new_privileges: bool = True
    pids_limit: int | None = Field(default=2048, ge=1)
    default_mem_limit: str | None = None
    default_cpus: float | None = Field(default=None, gt=0)

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        """The policy file (TOML, a `[policy]` table or top-level keys), or the defaults."""
        if path is None:
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"cannot read the policy file {path}: {exc}") from None
        try:
            return cls.model_validate(data.get("policy", data))
        except ValueError as exc:
            raise PolicyError(f"invalid policy file {path}: {exc}") from None

    # --- the check: one rule per capability ------------------------------------------------
    def violations(self, job: JobVariables, host: HostView | None = None) -> list[str]:
        """One line per refused request: `variable: what is wrong (rule)`. With `host`, bind
        sources and network names are resolved as the Docker host sees them."""
        found: list[str] = []
        for request in requests_of(job):
            rule = _RULES[request.capability]
            if problem := rule(self, request.value, host):
                found.append(f"{request.variable}: {problem}")
        return list(dict.fromkeys(found))

    def _image(self, image: str, host: HostView | None) -> str | None:
        if image.lower().startswith(OWN_IMAGES):  # whatever allowed_images says
            return (f"{image!r} is one of the worker's own images (another deployment's "
                    "dependency build, or the worker's helper)")
        if any(fnmatch.fnmatchcase(_qualified(image), p) for p in self.allowed_images):
            return None
        return f"{image!r} is not an allowed image (allowed_images: {self.allowed_images})"

    def _pull(self, pull_policy: str, host: HostView | None) -> str | None:
        if pull_policy in self.allowed_pull_policies:
            return None
        return (f"{pull_policy!r} (the effective pull policy) is not allowed "
                f"(allowed_pull_policies: {self.allowed_pull_policies})")

    def _network(self, mode: str, host: HostView | None) -> str | None:
        effective = mode
        special = mode == "host" or mode.startswith("container:") or mode in _SIMPLE_NETWORK_MODES
        if not special and host is not None:  # a name or id prefix of the host network?
            effective = _DRIVER_MODES.get(host.network_driver(mode) or "", mode)
            special = effective != mode
        if not special:
            return None  # a named network
        if any(fnmatch.fnmatchcase(effective, allowed) for allowed in self.allowed_network_modes):
            return None
        shown = repr(mode) if effective == mode else f"{mode!r} (the {effective} network)"
        return f"{shown} is not allowed (allowed_network_modes: {self.allowed_network_modes})"

    def _mount(self, mount: Mount, host: HostView | None) -> str | None:
        if mount.kind == "unreadable":
            return str(mount.source)
        if mount.kind == "container":
            return (f"the volumes of container {mount.source!r} cannot be mounted "
                    "(volumes_from is never allowed)")
        if mount.driver_options:
            return "a volume with driver options can mount any host path (never allowed)"
        if mount.kind == "volume":
            name = mount.source or ""
            if any(fnmatch.fnmatchcase(name, p) for p in self.allowed_named_volumes):
                return None
            allowed = self.allowed_named_volumes or "none"
            return (f"named volume {name!r} is not allowed (allowed_named_volumes: {allowed})")
        if mount.kind == "bind":
            return self._bind(mount.source or "", host)
        return None  # anonymous volumes and tmpfs: new and empty, nothing of the host

    def _bind(self, source: str, host: HostView | None) -> str | None:
        allowed = self.allowed_volume_prefixes or "none"
        if not source.startswith("/"):
            return f"host path {source!r} is not absolute"
        path = posixpath.normpath(source)
        roots = [posixpath.normpath(prefix) for prefix in self.allowed_volume_prefixes]
        if not any(under(path, root) for root in roots):
            return (f"host path {source} is not under an allowed prefix "
                    f"(allowed_volume_prefixes: {allowed})")
        kind = None
        if host is not None:
            try:
                resolved = host.resolve_bind(path, roots)
            except PathRefused as exc:
                return (f"host path {source} is refused: {exc} (allowed_volume_prefixes: "
                        f"{allowed}; symlinks are followed on the Docker host)")
            path, kind = resolved.path, resolved.kind
        sockets = docker_sockets()
        if not self.allow_docker_socket and (any(under(s, path) for s in sockets)
                                             or kind == "socket"):
            return (f"host path {source} exposes the Docker socket or another socket, "
                        "which is never mounted (allow_docker_socket)")
        if kind == "device":
            return f"host path {source} is a device node, which is never mounted"
        return None

    def _privilege(self, what: str, host: HostView | None) -> str | None:
        if self.allow_privileged:
            return None
        if what == "privileged: true":
            return "privileged containers are not allowed (allow_privileged)"
        return f"{what!r} gives host-level privileges and is not allowed (allow_privileged)"

    def _gpu(self, gpus: object, host: HostView | None) -> str | None:
        if self.allow_gpus:
            return None
        return f"GPU access ({gpus!r}) is not allowed (allow_gpus)"

    def _kernel(self, knob: tuple[str, object], host: HostView | None) -> str | None:
        """What reaches the host's scheduling, whatever allowed_create_kwargs lets through."""
        key, value = knob
        if key == "ulimit":
            return _ulimit_problem(value)
        if key == "healthcheck":
            return _healthcheck_problem(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1000:
            return None
        return (f"{value!r} is refused: oom_score_adj must be 0 to 1000 (below 0 the kernel "
                "kills host processes before this container)")

    def _create_key(self, key: str, host: HostView | None) -> str | None:
        if key in self.allowed_create_kwargs:
            return None
        return "not allowed (allowed_create_kwargs)"

    def _build_step(self, count: int, host: HostView | None) -> str | None:
        if self.allow_dockerfile_lines:
            return None
        return ("extra Dockerfile instructions need the operator's consent "
                "(allow_dockerfile_lines): build steps cannot be hardened as flow containers "
                "are; pip_packages and requirements need none")

    def _build_fetch(self, url: str, host: HostView | None) -> str | None:
        return (f"ADD {url} is fetched by the Docker daemon itself on the host's network "
                "(never allowed; download in a RUN step on the build network instead)")

    def _secret(self, name: str, host: HostView | None) -> str | None:
        if any(fnmatch.fnmatchcase(name, p) for p in self.allowed_secrets):
            return None
        return (f"secret {name!r} is not allowed "
                f"(allowed_secrets: {self.allowed_secrets or 'none'})")

    def build_limits(self, job: JobVariables) -> BuildLimits:
        """A build step may do no more than the flow's container: its memory, CPU and pids."""
        return BuildLimits(
            mem_limit=job.mem_limit or self.default_mem_limit,
            nano_cpus=int(self.default_cpus * 1e9) if self.default_cpus else None,
            pids_limit=self.pids_limit,
            no_new_privileges=self.no_new_privileges,
        )

    def trusts_credentials_for(self, image: str) -> bool:
        registry = _qualified(image).split("/", 1)[0]
        return any(fnmatch.fnmatchcase(registry, p) for p in self.credential_registries)

    # --- hardened defaults --------------------------------------------------------------
    def harden(self, create_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The container settings with the policy's defaults where the job set none."""
        hardened = dict(create_kwargs)
        if self.no_new_privileges:
            options = list(hardened.get("security_opt") or [])
            if not any(o.startswith("no-new-privileges") for o in options):
                options.append("no-new-privileges:true")
            hardened["security_opt"] = options
        if self.pids_limit is not None:
            asked = hardened.get("pids_limit")
            if not isinstance(asked, int) or asked <= 0 or asked > self.pids_limit:
                hardened["pids_limit"] = self.pids_limit
        if self.default_mem_limit and not hardened.get("mem_limit"):
            hardened["mem_limit"] = self.default_mem_limit
        if self.default_cpus and not hardened.get("nano_cpus") and not hardened.get("cpu_quota"):
            hardened["nano_cpus"] = int(self.default_cpus * 1e9)
        return hardened


# Resource limits a container may set: each only bounds the container itself. Not here:
# rtprio and rttime (real-time scheduling starves the host's CPUs, as cpu_rt_* would), nice
# (a priority above the host's processes).
SAFE_ULIMITS = frozenset({"core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue",
                          "nofile", "nproc", "rss", "sigpending", "stack"})
MIN_PROBE_NS = 1_000_000_000  # the engine execs a healthcheck's probe: at most once a second


def _field(item: object, name: str) -> object:
    """A field of a docker-py dict type as a job writes it (`name`) or Docker does (`Name`)."""
    if not isinstance(item, dict):
        return None
    return item.get(name, item.get(name.title().replace("_", "")))


def _ulimit_problem(limit: object) -> str | None:
    name = _field(limit, "name")
    if isinstance(name, str) and name.lower() in SAFE_ULIMITS:
        return None
    return (f"{limit!r} is refused: a ulimit must be one of {sorted(SAFE_ULIMITS)} (rtprio, "
            "rttime and nice raise the container above the host's processes)")


def _healthcheck_problem(check: object) -> str | None:
    if not isinstance(check, dict):
        return f"{check!r} is not a healthcheck (a mapping of test, interval, timeout, …)"
    for name in ("interval", "timeout", "start_interval"):
        value = _field(check, name)
        if value in (None, 0):  # the engine's default
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < MIN_PROBE_NS:
            return (f"healthcheck {name} {value!r} is refused: at least {MIN_PROBE_NS} "
                    "(nanoseconds: one second), or 0 for the engine's default")
    return None


def docker_sockets() -> list[str]:
    """The usual socket paths and the one DOCKER_HOST names."""
    found = list(DOCKER_SOCKETS)
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host.startswith("unix://"):
        found.append(posixpath.normpath(docker_host.removeprefix("unix://")))
    return found


_RULES: dict[str, Callable[[Policy, Any, HostView | None], str | None]] = {
    IMAGE: Policy._image,
    PULL: Policy._pull,
    NETWORK: Policy._network,
    MOUNT: Policy._mount,
    PRIVILEGE: Policy._privilege,
    GPU: Policy._gpu,
    KERNEL: Policy._kernel,
    CREATE_KEY: Policy._create_key,
    BUILD_STEP: Policy._build_step,
    BUILD_FETCH: Policy._build_fetch,
    SECRET: Policy._secret,
}


def _qualified(image: str) -> str:
    """`python:3.12` → `docker.io/library/python:3.12`, so patterns can name registries."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    if "/" not in image:
        return f"docker.io/library/{image}"
    return f"docker.io/{image}"


_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_?KEY|AUTH|CREDENTIAL|PRIVATE)",
                          re.IGNORECASE)


def secret_name(name: str) -> bool:
    """A name (env variable, parameter, block field) whose value is a credential."""
    return bool(_SECRET_NAME.search(name))


class Masker:
    """Replaces secret values (credentials, env values whose names look secret) with `***`,
    also as they look JSON-escaped, URL-encoded or in a Basic authorization header."""

    def __init__(self, secrets: set[str]) -> None:
        variants = set()
        for secret in (s for s in secrets if len(s) >= 4):
            variants |= {secret, json.dumps(secret)[1:-1], quote(secret, safe=""),
                         json.dumps(secret, ensure_ascii=False)[1:-1]}
            if ":" in secret:
                variants.add(base64.b64encode(secret.encode()).decode())
        self.secrets = sorted(variants, key=len, reverse=True)

    def with_secrets(self, secrets: set[str]) -> Masker:
        """This masker and `secrets` too (a run's secret files, read after its job)."""
        masker = Masker(secrets)
        masker.secrets = sorted(set(self.secrets) | set(masker.secrets), key=len, reverse=True)
        return masker

    @classmethod
    def for_env(cls, env: dict[str, str | None], extra: set[str] | None = None) -> Masker:
        values = {v for k, v in env.items() if v and secret_name(k)}
        for value in list(values):
            if ":" in value:  # user:password strings: the password alone too
                values.add(value.split(":", 1)[1])
        return cls(values | (extra or set()))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def data(self, value: Any) -> Any:
        """`value` with every string in it masked, before it is serialised."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self.data(k): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(item) for item in value]
        return value


class _MaskingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, mask: Masker) -> None:
        super().__init__()
        self.inner = inner
        self.mask = mask

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(self.inner.format(record))


def mask_logging(mask: Masker) -> None:
    """Every line the root handlers write, from any logger (ours, httpx, websockets, docker)
    at any level, message and traceback alike, passes through `mask`."""
    for handler in logging.getLogger().handlers:
        inner = handler.formatter or logging.Formatter()
        if isinstance(inner, _MaskingFormatter):
            inner = inner.inner
        handler.setFormatter(_MaskingFormatter(inner, mask))
