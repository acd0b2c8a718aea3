"""Per-deployment images: the flow's dependencies built once on the worker's Docker host.

A build is keyed by a hash of what goes into it (the base image's id, the normalised
packages, the Dockerfile text, the build options): same inputs, same tag, no build. Runs that
need the same key wait for one build, in this process (a lock per key) and across replicas
sharing the engine (a named, never-started container: Docker makes name creation atomic; a
lock older than the build timeout is stale and taken over).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.images import Image

from .jobs import JobVariables

log = logging.getLogger(__name__)

BUILD_LABEL = "io.dockerworker.build"
DEPLOYMENT_LABEL = "io.dockerworker.deployment"
BASE_LABEL = "io.dockerworker.base-image"
LOCK_LABEL = "io.dockerworker.build-lock"
HOLDER_LABEL = "io.dockerworker.holder"
REPOSITORY_PREFIX = "dockerworker/"
_STEP = re.compile(r"^Step \d+/\d+ : (.*)$")
_PIP_ERROR = re.compile(r"^(ERROR|error): .+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BuildFailed(RuntimeError):
    """The image could not be built; the message names the failing step and pip's error."""


@dataclass(frozen=True)
class BuildOptions:
    """The operator's settings that shape every build (and so its hash)."""

    network_mode: str | None = None
    ca_bundle: Path | None = None
    pip_index_url: str | None = None
    pip_extra_index_url: str | None = None
    timeout: float = 1800.0


@dataclass
class BuildPlan:
    """What one job asks to have built on top of its image."""

    packages: list[str]
    requirements: str
    dockerfile_lines: list[str]

    @classmethod
    def from_job(cls, job: JobVariables) -> BuildPlan | None:
        """None when the job asks for nothing: its image is used as it is."""
        packages = list(job.pip_packages or [])
        packages += (job.env.get("EXTRA_PIP_PACKAGES") or "").split()
        packages = sorted({p.strip() for p in packages if p.strip()})
        requirements = (job.requirements or "").strip()
        lines = [line.strip() for line in job.dockerfile_lines or [] if line.strip()]
        if not (packages or requirements or lines):
            return None
        return cls(packages, requirements, lines)

    def describe(self) -> str:
        parts = []
        if self.packages:
            parts.append("packages " + " ".join(self.packages))
        if self.requirements:
            parts.append("requirements.txt")
        if self.dockerfile_lines:
            parts.append(f"{len(self.dockerfile_lines)} Dockerfile lines")
        return "; ".join(parts)


@dataclass
class BuildResult:
    tag: str
    built: bool
    seconds: float = 0.0
    log_lines: list[str] = field(default_factory=list)


def dockerfile(base: str, plan: BuildPlan, options: BuildOptions, deployment: str) -> str:
    """Dependencies first, in layers that depend on nothing that changes per run, and as few
    steps as possible (each costs a layer commit, seconds on some storage drivers)."""
    lines = [f"FROM {base}", *plan.dockerfile_lines]
    if plan.packages or plan.requirements:
        lines.append("COPY dockerworker/ /tmp/dockerworker/")
        env = ""
        if options.ca_bundle:
            env += "PIP_CERT=/tmp/dockerworker/ca.crt "
        if options.pip_index_url or options.pip_extra_index_url:
            env += "PIP_CONFIG_FILE=/tmp/dockerworker/pip.conf "
        lines.append(
            f"RUN {env}python -m pip install --no-cache-dir --disable-pip-version-check "
            "-r /tmp/dockerworker/requirements.txt"
        )
    labels = {BUILD_LABEL: "true", DEPLOYMENT_LABEL: deployment, BASE_LABEL: base}
    lines.append("LABEL " + " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items()))
    return "\n".join(lines) + "\n"


def pip_conf(options: BuildOptions) -> str:
    lines = ["[global]"]
    if options.pip_index_url:
        lines.append(f"index-url = {options.pip_index_url}")
    if options.pip_extra_index_url:
        lines.append(f"extra-index-url = {options.pip_extra_index_url}")
    return "\n".join(lines) + "\n"


def requirements_text(plan: BuildPlan) -> str:
    parts = [*plan.packages]
    if plan.requirements:
        parts.append(plan.requirements)
    return "\n".join(parts) + "\n"


def build_key(base_id: str, plan: BuildPlan, options: BuildOptions, dockerfile_text: str) -> str:
    """A short hash over everything that shapes the image."""
    ca_digest = (
        hashlib.sha256(options.ca_bundle.read_bytes()).hexdigest() if options.ca_bundle else ""
    )
    material = json.dumps(
        {
            "base": base_id,
            "requirements": requirements_text(plan),
            "dockerfile": dockerfile_text,
            "network": options.network_mode,
            "ca": ca_digest,
            "index": options.pip_index_url,
            "extra_index": options.pip_extra_index_url,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def repository_for(deployment: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", deployment.lower()).strip("._-")[:100] or "flow"
    return f"{REPOSITORY_PREFIX}{slug}"


def _context(dockerfile_text: str, plan: BuildPlan, options: BuildOptions) -> io.BytesIO:
    files = {
        "Dockerfile": dockerfile_text.encode(),
        "dockerworker/requirements.txt": requirements_text(plan).encode(),
        "dockerworker/pip.conf": pip_conf(options).encode(),
    }
    if options.ca_bundle:
        files["dockerworker/ca.crt"] = options.ca_bundle.read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


class Builder:
    """Builds per-deployment images, once per key, for every run and replica that needs one."""

    def __init__(self, client: docker.DockerClient, options: BuildOptions, holder: str) -> None:
        self.client = client
        self.options = options
        self.holder = holder
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def ensure(
        self, base: str, plan: BuildPlan, deployment: str, on_line: Callable[[str], None]
    ) -> BuildResult:
        """The tag of the built image; builds it unless it exists (marks it used either way)."""
        base_id = self.client.images.get(base).id
        text = dockerfile(base, plan, self.options, deployment)
        key = build_key(base_id, plan, self.options, text)
        tag = f"{repository_for(deployment)}:{key}"
        if self._touch(tag):
            return BuildResult(tag, built=False)
        with self._local_lock(key):
            if self._touch(tag):
                return BuildResult(tag, built=False)
            with self._engine_lock(key, base):
                if self._touch(tag):
                    return BuildResult(tag, built=False)
                started = time.monotonic()
                self._build(tag, text, plan, on_line)
                return BuildResult(tag, built=True, seconds=time.monotonic() - started)

    def release_locks(self) -> int:
        """Remove the build locks this worker holds: at start-up they are left from its
        previous life, at exit from builds it abandoned (cancelled runs)."""
        locks = self.client.containers.list(all=True, sparse=True, filters={
            "label": [LOCK_LABEL, f"{HOLDER_LABEL}={self.holder}"]})
        for lock in locks:
            try:
                lock.remove(force=True)
            except docker.errors.NotFound:
                pass
        return len(locks)

    def _touch(self, tag: str) -> bool:
        """True if the image exists; re-tagging it records 'last used' (LastTagTime)."""
        try:
            image = self.client.images.get(tag)
        except docker.errors.ImageNotFound:
            return False
        repository, _, version = tag.rpartition(":")
        image.tag(repository, version)
        return True

    @contextmanager
    def _local_lock(self, key: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    @contextmanager
    def _engine_lock(self, key: str, base: str) -> Iterator[None]:
        """A container named after the key, created (never started) by whoever builds."""
        name = f"dockerworker-build-lock-{key}"
        lock = None
        while lock is None:
            try:
                lock = self.client.containers.create(
                    base,
                    name=name,
                    command=["true"],
                    labels={LOCK_LABEL: key, HOLDER_LABEL: self.holder,
                            "io.dockerworker.since": str(time.time())},
                )
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                self._wait_or_break(name)
        try:
            yield
        finally:
            try:
                lock.remove(force=True)
            except docker.errors.NotFound:
                pass

    def _wait_or_break(self, name: str) -> None:
        """Another builder holds the lock: wait; take it over when it is stale."""
        try:
            other = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        since = float(other.labels.get("io.dockerworker.since", "0"))
        if time.time() - since > self.options.timeout + 60:
            log.warning("build lock %s is stale (holder %s); taking it over", name,
                        other.labels.get(HOLDER_LABEL))
            try:
                other.remove(force=True)
            except docker.errors.NotFound:
                pass
            return
        time.sleep(1)

    def _build(
        self, tag: str, text: str, plan: BuildPlan, on_line: Callable[[str], None]
    ) -> None:
        step = ""
        last_lines: list[str] = []
        started = time.monotonic()
        try:
            stream = self.client.api.build(
                fileobj=_context(text, plan, self.options),
                custom_context=True,
                tag=tag,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                network_mode=self.options.network_mode,
                timeout=int(self.options.timeout),
            )
            for chunk in stream:
                if "error" in chunk:
                    raise BuildFailed(self._failure(tag, step, last_lines, chunk["error"]))
                for raw_line in str(chunk.get("stream", "")).splitlines():
                    line = _ANSI.sub("", raw_line).rstrip()
                    if not line:
                        continue
                    on_line(line)
                    if match := _STEP.match(line):
                        step = match.group(1)
                    last_lines = (last_lines + [line])[-40:]
                if time.monotonic() - started > self.options.timeout:
                    raise BuildFailed(
                        f"building image {tag} timed out after {self.options.timeout:.0f} s "
                        f"at step {step!r}"
                    )
        except docker.errors.APIError as exc:
            raise BuildFailed(f"building image {tag} failed: {exc.explanation or exc}") from None
        except OSError as exc:  # includes read timeouts of the build stream
            raise BuildFailed(f"building image {tag} failed: {exc}") from None

    @staticmethod
    def _failure(tag: str, step: str, lines: list[str], error: str) -> str:
        pip_errors = [line for line in lines if _PIP_ERROR.match(line)]
        detail = pip_errors[-1] if pip_errors else error.strip()
        return f"building image {tag} failed at step {step!r}: {detail}"


@dataclass
class BuiltImage:
    tag: str
    deployment: str
    size: int
    created: str
    last_used: str
    image: Image


def list_builds(client: docker.DockerClient) -> list[BuiltImage]:
    """Every image dockerworker built on this engine, newest use first."""
    found = []
    for image in client.images.list(filters={"label": f"{BUILD_LABEL}=true"}):
        attrs: dict[str, Any] = image.attrs
        found.append(
            BuiltImage(
                tag=(image.tags or [image.short_id])[0],
                deployment=image.labels.get(DEPLOYMENT_LABEL, ""),
                size=int(attrs.get("Size", 0)),
                created=str(attrs.get("Created", ""))[:19],
                last_used=str(attrs.get("Metadata", {}).get("LastTagTime", ""))[:19],
                image=image,
            )
        )
    return sorted(found, key=lambda b: b.last_used, reverse=True)


def prune_builds(
    client: docker.DockerClient, older_than_seconds: float | None, keep: int | None
) -> tuple[list[str], list[str]]:
    """Remove builds not used for `older_than_seconds` beyond the newest `keep` per deployment.
    Images any container uses are never removed. Returns (removed, kept-because-in-use)."""
    in_use = {c.attrs.get("ImageID") for c in client.containers.list(all=True, sparse=True)}
    removed, busy = [], []
    seen: dict[str, int] = {}
    now = datetime.now(UTC)
    for build in list_builds(client):
        rank = seen[build.deployment] = seen.get(build.deployment, 0) + 1
        if keep is not None and rank <= keep:
            continue
        if older_than_seconds is not None and build.last_used:
            last = datetime.fromisoformat(build.last_used).replace(tzinfo=UTC)
            if (now - last).total_seconds() < older_than_seconds:
                continue
        if build.image.id in in_use:
            busy.append(build.tag)
            continue
        try:
            client.images.remove(build.tag, force=False)
            removed.append(build.tag)
        except docker.errors.APIError:
            busy.append(build.tag)
    return removed, busy
