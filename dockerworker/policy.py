"""The operator's policy: what a deployment may ask of Docker, checked before Docker is touched.

The worker holds the Docker socket, which is root on the host. A deployment's job variables
ask; this policy (the operator's file and settings, never job variables) decides. A refusal
names each offending variable and the rule; nothing is pulled, built or created.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .jobs import JobVariables

# container_create_kwargs keys that cannot widen a container's reach on the host.
SAFE_CREATE_KWARGS = frozenset({
    "blkio_weight", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota", "cpu_rt_period",
    "cpu_rt_runtime", "cpu_shares", "cpuset_cpus", "cpuset_mems", "domainname", "entrypoint",
    "extra_hosts", "healthcheck", "hostname", "init", "mem_reservation", "mem_swappiness",
    "nano_cpus", "pids_limit", "platform", "read_only", "shm_size", "stop_signal",
    "stdin_open", "tmpfs", "tty", "ulimits", "user", "working_dir", "dns", "dns_opt",
    "dns_search", "log_config", "mac_address", "oom_score_adj",
})
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
_SIMPLE_NETWORK_MODES = {"bridge", "none", "default"}


class PolicyError(ValueError):
    """The policy file or settings themselves are wrong."""


class Policy(BaseModel):
    """Rules and hardened defaults; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    allowed_images: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns of images (with registry) deployments may run.",
    )
    allow_privileged: bool = False
    allowed_volume_prefixes: list[str] = Field(
        default_factory=list,
        description="Host paths under which bind mounts are allowed (named volumes always are).",
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
    allow_docker_socket: bool = False
    allow_gpus: bool = False
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

    # --- the check ----------------------------------------------------------------------
    def violations(self, job: JobVariables) -> list[str]:
        """One line per refused request: `variable: what is wrong (rule)`."""
        found: list[str] = []
        if not any(fnmatch.fnmatchcase(_qualified(job.image), p) for p in self.allowed_images):
            found.append(f"image: {job.image!r} is not an allowed image "
                         f"(allowed_images: {self.allowed_images})")
        if job.privileged and not self.allow_privileged:
            found.append("privileged: privileged containers are not allowed (allow_privileged)")
        for volume in job.volumes:
            if problem := self._volume_problem(volume):
                found.append(f"volumes: {problem}")
        if job.network_mode and not self._network_mode_allowed(job.network_mode):
            found.append(f"network_mode: {job.network_mode!r} is not allowed "
                         f"(allowed_network_modes: {self.allowed_network_modes})")
        for key in sorted((job.container_create_kwargs or {}).keys()):
            if key not in self.allowed_create_kwargs and key not in JobVariables.model_fields:
                found.append(f"container_create_kwargs.{key}: not allowed "
                             "(allowed_create_kwargs)")
        if job.gpus is not None and not self.allow_gpus:
            found.append(f"gpus: GPU access ({job.gpus!r}) is not allowed (allow_gpus)")
        policy = job.image_pull_policy
        if policy and policy not in self.allowed_pull_policies:
            found.append(f"image_pull_policy: {policy!r} is not allowed "
                         f"(allowed_pull_policies: {self.allowed_pull_policies})")
        return found

    def _volume_problem(self, volume: str) -> str | None:
        source = volume.split(":", 1)[0]
        if not source.startswith(("/", ".", "~")):
            return None  # a named volume
        path = posixpath.normpath(source)
        roots = [posixpath.normpath(prefix) for prefix in self.allowed_volume_prefixes]
        if not path.startswith("/") or not any(_under(path, root) for root in roots):
            allowed = self.allowed_volume_prefixes or "none"
            return (f"host path {source} is not under an allowed prefix "
                    f"(allowed_volume_prefixes: {allowed})")
        if not self.allow_docker_socket and any(_under(sock, path) for sock in DOCKER_SOCKETS):
            return f"host path {source} exposes the Docker socket, which is never mounted"
        return None

    def _network_mode_allowed(self, mode: str) -> bool:
        if any(fnmatch.fnmatchcase(mode, allowed) for allowed in self.allowed_network_modes):
            return True
        special = mode == "host" or mode.startswith("container:") or mode in _SIMPLE_NETWORK_MODES
        return not special  # otherwise a named network, always allowed

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


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


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


class Masker:
    """Replaces secret values (credentials, env values whose names look secret) with `***`."""

    def __init__(self, secrets: set[str]) -> None:
        self.secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    @classmethod
    def for_env(cls, env: dict[str, str | None], extra: set[str] | None = None) -> Masker:
        values = {v for k, v in env.items() if v and _SECRET_NAME.search(k)}
        for value in list(values):
            if ":" in value:  # user:password strings: the password alone too
                values.add(value.split(":", 1)[1])
        return cls(values | (extra or set()))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text
