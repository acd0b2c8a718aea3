"""Per-deployment images: the flow's dependencies built once on the worker's Docker host.

A build is keyed by a hash of what goes into it (the base image's id, the normalised
packages, the Dockerfile text, the build options): same inputs, same tag, no build. Runs that
need the same key wait for one build, in this process (a lock per key) and across replicas
sharing the engine (a named, never-started container: Docker makes name creation atomic; a
lock older than the build timeout is stale and taken over).

Builds are held to what a flow container may do. `dockerfile_lines` (with the policy's
consent) go through `docker build` with the job's memory limit on the operator's build
network. The packages are installed by pip in a container hardened like a flow container
(no-new-privileges, pids, memory and CPU limits, the build network), which is then committed:
the requirements file with the operator's index URLs (which may hold a token) and the CA
bundle sit on a throwaway volume, never in a layer, the image's history or its config.

With a push registry (`--build-push`), a build is also tagged `REGISTRY/dockerworker/<name>:<key>`
and pushed there, inside the same locks, so every Swarm node can pull it; runs then name it by
that tag and the registry's digest. A tag the registry already holds, or this builder pushed,
is not pushed again: the key is the content, so the same tag is the same build.
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
from docker.models.containers import Container
from docker.models.images import Image
from docker.models.volumes import Volume
from docker.utils import parse_bytes

from .images import is_transient
from .jobs import OWN_IMAGES, JobVariables
from .logs import MAX_LINE_BYTES, stream_lines

log = logging.getLogger(__name__)

BUILD_LABEL = "io.dockerworker.build"
DEPLOYMENT_LABEL = "io.dockerworker.deployment"
BASE_LABEL = "io.dockerworker.base-image"
LOCK_LABEL = "io.dockerworker.build-lock"
HOLDER_LABEL = "io.dockerworker.holder"
REPOSITORY_PREFIX = OWN_IMAGES
BUILDS_AT_ONCE = 4  # per worker; more wait for a slot
STEP_LABEL = "io.dockerworker.build-step"  # on a pip step's volume: its container's name
_BUILT = re.compile(r"^Successfully built ([0-9a-f]+)$")
_STEP = re.compile(r"^Step \d+/\d+ : (.*)$")
_PIP_ERROR = re.compile(r"^(ERROR|error): .+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BuildFailed(RuntimeError):
    """The image could not be built; the message names the failing step and pip's error.
    `transient`: the engine failed, not the build's own steps (worth another try)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class PushFailed(BuildFailed):
    """The built image could not be pushed to the push registry; the message names the
    registry and the engine's words."""


@dataclass(frozen=True)
class BuildOptions:
    """The operator's settings that shape every build (and so its hash), and where builds
    are pushed (`push`: a registry prefix, not part of the hash: the content is the same)."""

    network_mode: str | None = None
    ca_bundle: Path | None = None
    pip_index_url: str | None = None
    pip_extra_index_url: str | None = None
    timeout: float = 1800.0
    push: str | None = None


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

    @property
    def installs(self) -> bool:
        return bool(self.packages or self.requirements)

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
    """`tag` is the build on this engine; `reference` what runs name (with a push registry
    `REGISTRY/…:<key>@sha256:…`, else the tag); `push` how it got there: pushed, present (the
    registry had it), known (this builder pushed it before), or "" (no push registry)."""

    tag: str
    built: bool
    seconds: float = 0.0
    log_lines: list[str] = field(default_factory=list)
    reference: str = ""
    push: str = ""

    def __post_init__(self) -> None:
        self.reference = self.reference or self.tag


FILES_DIR = "/tmp/dockerworker"  # the build's files, on a throwaway volume
RECIPE = "2"  # how images are made; part of the key, so a change of recipe rebuilds


@dataclass(frozen=True)
class BuildLimits:
    """The flow container's hardening, as far as each build step can have it."""

    mem_limit: str | None = None
    nano_cpus: int | None = None
    pids_limit: int | None = None
    no_new_privileges: bool = True

    def container_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"mem_limit": self.mem_limit, "nano_cpus": self.nano_cpus,
                                  "pids_limit": self.pids_limit}
        if self.no_new_privileges:
            kwargs["security_opt"] = ["no-new-privileges:true"]
        return {k: v for k, v in kwargs.items() if v is not None}

    def build_limits(self) -> dict[str, Any]:
        """`docker build` takes only memory and CPU weights for its RUN steps."""
        if not self.mem_limit:
            return {}
        memory = int(parse_bytes(self.mem_limit.lower().removesuffix("b")))
        return {"memory": memory, "memswap": memory}


def _labels(deployment: str, base: str) -> dict[str, str]:
    return {BUILD_LABEL: "true", DEPLOYMENT_LABEL: deployment, BASE_LABEL: base}


def dockerfile(base: str, plan: BuildPlan, deployment: str) -> str:
    """The `docker build` part: the job's extra instructions (labels last, unless pip adds
    a layer after them and the commit sets them)."""
    lines = [f"FROM {base}", *plan.dockerfile_lines]
    if not plan.installs:
        labels = _labels(deployment, base)
        lines.append("LABEL " + " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items()))
    return "\n".join(lines) + "\n"


def pip_command(options: BuildOptions) -> list[str]:
    """pip in the build container; its settings are files on the volume, never arguments
    (a commit records the command in the image's history)."""
    command = ["python", "-m", "pip", "install", "--no-cache-dir",
               "--disable-pip-version-check"]
    if options.ca_bundle:
        command += ["--cert", f"{FILES_DIR}/ca.crt"]
    return [*command, "-r", f"{FILES_DIR}/requirements.txt"]


def requirements_text(plan: BuildPlan) -> str:
    parts = [*plan.packages]
    if plan.requirements:
        parts.append(plan.requirements)
    return "\n".join(parts) + "\n"


def requirements_file(plan: BuildPlan, options: BuildOptions) -> str:
    """What pip reads: the operator's index URLs first, as options of the file itself."""
    lines = []
    if options.pip_index_url:
        lines.append(f"--index-url {options.pip_index_url}")
    if options.pip_extra_index_url:
        lines.append(f"--extra-index-url {options.pip_extra_index_url}")
    return "\n".join([*lines, requirements_text(plan)])


def build_key(base_id: str, plan: BuildPlan, options: BuildOptions, dockerfile_text: str) -> str:
    """A short hash over everything that shapes the image."""
    ca_digest = (
        hashlib.sha256(options.ca_bundle.read_bytes()).hexdigest() if options.ca_bundle else ""
    )
    material = json.dumps(
        {
            "recipe": RECIPE,
            "base": base_id,
            "requirements": requirements_text(plan),
            "dockerfile": dockerfile_text,
            "pip": pip_command(options) if plan.installs else [],
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


def pushed_name(registry: str, tag: str) -> str:
    """A build's tag under the push registry: `REGISTRY/dockerworker/<name>:<key>`."""
    return f"{registry.rstrip('/')}/dockerworker/{tag.removeprefix(REPOSITORY_PREFIX)}"


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Builder:
    """Builds per-deployment images, once per key, for every run and replica that needs one."""

    def __init__(self, client: docker.DockerClient, options: BuildOptions, holder: str) -> None:
        self.client = client
        self.options = options
        self.holder = holder
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._pushed: dict[str, str] = {}  # pushed name -> its digest in the registry
        # a build goes on when its run is cancelled (it stays cached): without a bound, runs
        # scheduled and cancelled in a loop would start any number at once
        self._slots = threading.BoundedSemaphore(BUILDS_AT_ONCE)

    def ensure(
        self, base: str, plan: BuildPlan, deployment: str, on_line: Callable[[str], None],
        limits: BuildLimits | None = None,
    ) -> BuildResult:
        """The built image; builds it unless it exists (marks it used either way) and, with a
        push registry, pushes it unless the registry holds it. Both happen under the key's
        locks: runs wanting the same build at once get one build and one push."""
        base_id = self.client.images.get(base).id
        text = dockerfile(base, plan, deployment)
        key = build_key(base_id, plan, self.options, text)
        tag = f"{repository_for(deployment)}:{key}"
        if (done := self._done(tag)) is not None:
            return done
        with self._local_lock(key):
            if (done := self._done(tag)) is not None:
                return done
            with self._engine_lock(key, base):
                if (done := self._done(tag)) is not None:
                    return done
                built, seconds = False, 0.0
                if not self._touch(tag):
                    with self._slots:
                        started = time.monotonic()
                        self._build(tag, base, text, plan, deployment, on_line,
                                    limits or BuildLimits())
                        built, seconds = True, time.monotonic() - started
                reference, how = self._publish(tag) if self.options.push else (tag, "")
                return BuildResult(tag, built=built, seconds=seconds, reference=reference,
                                   push=how)

    def _done(self, tag: str) -> BuildResult | None:
        """The result when nothing is left to do: the image exists and, with a push registry,
        this builder has pushed it (or found it there) before."""
        if self.options.push:
            name = pushed_name(self.options.push, tag)
            if name not in self._pushed or not self._touch(tag):
                return None
            return BuildResult(tag, built=False, reference=f"{name}@{self._pushed[name]}",
                               push="known")
        return BuildResult(tag, built=False) if self._touch(tag) else None

    def _publish(self, tag: str) -> tuple[str, str]:
        """Tag the build under the push registry and push it unless the registry holds that
        tag already (the key is the content: the same tag is the same build); returns the
        reference runs name (tag and the registry's digest) and how it got there."""
        assert self.options.push
        name = pushed_name(self.options.push, tag)
        repository, _, version = name.rpartition(":")
        try:
            self.client.images.get(tag).tag(repository, version)
        except docker.errors.APIError as exc:
            raise PushFailed(f"pushing image {name} failed: {exc.explanation or exc}",
                             transient=True) from None
        digest, how = self._registry_digest(name), "present"
        if digest is None:
            digest, how = self._push(name), "pushed"
        self._pushed[name] = digest
        return f"{name}@{digest}", how

    def _registry_digest(self, name: str) -> str | None:
        """The digest the registry holds for `name` (asked through the engine, with the
        worker's Docker credentials), None when it has none or cannot tell: then push."""
        try:
            found = self.client.api.inspect_distribution(name)
        except (docker.errors.APIError, OSError):
            return None
        return str((found.get("Descriptor") or {}).get("digest") or "") or None

    def _push(self, name: str) -> str:
        """Push `name` with the worker's Docker credentials for its registry; its digest.
        Every streamed status is checked: the engine reports a failed push in the stream."""
        repository, _, version = name.rpartition(":")
        registry = self.options.push or repository.partition("/")[0]
        digest = ""

        def failed(reason: str) -> PushFailed:
            reason = reason.strip()
            return PushFailed(f"pushing image {name} to registry {registry} failed: {reason}",
                              transient=is_transient(reason))

        try:
            for line in self.client.images.push(repository, tag=version, stream=True,
                                                decode=True):
                if "error" in line:
                    raise failed(str(line["error"]))
                digest = str((line.get("aux") or {}).get("Digest") or digest)
        except docker.errors.APIError as exc:
            raise failed(str(exc.explanation or exc)) from None
        except OSError as exc:  # the engine's connection, read timeouts included
            raise failed(str(exc)) from None
        if not digest:
            digests = self.client.images.get(name).attrs.get("RepoDigests") or []
            digest = next((d.partition("@")[2] for d in digests
                           if d.startswith(f"{repository}@")), "")
        if not digest:
            raise failed("the engine named no digest for the pushed image")
        return digest

    def release_locks(self) -> int:
        """Remove the build locks (and build containers and volumes) this worker holds: at
        start-up they are left from its previous life, at exit from builds it abandoned."""
        mine = f"{HOLDER_LABEL}={self.holder}"
        locks = self.client.containers.list(all=True, sparse=True, filters={
            "label": [LOCK_LABEL, mine]})
        for lock in locks:
            _remove(lock)
        for volume in self.client.volumes.list(filters={"label": [STEP_LABEL, mine]}):
            _remove_named(self.client, volume.attrs["Labels"][STEP_LABEL])
            _remove(volume)
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

    def _build(self, tag: str, base: str, text: str, plan: BuildPlan, deployment: str,
               on_line: Callable[[str], None], limits: BuildLimits) -> None:
        """`docker build` for the job's instructions, then pip in a committed container."""
        started = time.monotonic()
        image = base
        if plan.dockerfile_lines:
            image = self._docker_build(tag, text, None if plan.installs else tag, on_line,
                                       limits)
        if plan.installs:
            remaining = self.options.timeout - (time.monotonic() - started)
            self._pip_install(tag, image, plan, _labels(deployment, base), on_line, limits,
                              remaining)

    def _docker_build(self, tag: str, text: str, target: str | None,
                      on_line: Callable[[str], None], limits: BuildLimits) -> str:
        """Build `text`; returns the image id (tagged `target` when that is the last step)."""
        step = ""
        last_lines: list[str] = []
        image_id = ""
        started = time.monotonic()
        try:
            stream = self.client.api.build(
                fileobj=io.BytesIO(_tar({"Dockerfile": text.encode()})),
                custom_context=True,
                tag=target,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                network_mode=self.options.network_mode,
                container_limits=limits.build_limits(),
                timeout=int(self.options.timeout),
            )
            for chunk in stream:
                if "error" in chunk:
                    raise BuildFailed(self._failure(tag, step, last_lines, chunk["error"]))
                image_id = str((chunk.get("aux") or {}).get("ID") or image_id)
                for raw_line in str(chunk.get("stream", "")).splitlines():
                    line = _ANSI.sub("", raw_line).rstrip()
                    if not line:
                        continue
                    on_line(line)
                    if match := _STEP.match(line):
                        step = match.group(1)
                    if match := _BUILT.match(line):
                        image_id = image_id or match.group(1)
                    last_lines = (last_lines + [line])[-40:]
                if time.monotonic() - started > self.options.timeout:
                    raise BuildFailed(
                        f"building image {tag} timed out after {self.options.timeout:.0f} s "
                        f"at step {step!r}"
                    )
        except docker.errors.APIError as exc:
            raise BuildFailed(f"building image {tag} failed: {exc.explanation or exc}",
                              transient=True) from None
        except OSError as exc:  # includes read timeouts of the build stream
            raise BuildFailed(f"building image {tag} failed: {exc}", transient=True) from None
        if not image_id:
            raise BuildFailed(f"building image {tag} failed: Docker named no image")
        return image_id

    def _pip_install(self, tag: str, image: str, plan: BuildPlan, labels: dict[str, str],
                     on_line: Callable[[str], None], limits: BuildLimits, timeout: float
                     ) -> None:
        """pip in a hardened container on the build network, committed as `tag`. Its files
        (requirements with the index URLs, the CA bundle) live on a volume: not committed."""
        config = self.client.images.get(image).attrs.get("Config") or {}
        command = pip_command(self.options)
        overrides: dict[str, Any] = {"command": command}
        if config.get("Entrypoint"):  # run pip itself, not the image's entrypoint
            overrides = {"entrypoint": command[:1], "command": command[1:]}
        files = {"requirements.txt": requirements_file(plan, self.options).encode()}
        if self.options.ca_bundle:
            files["ca.crt"] = self.options.ca_bundle.read_bytes()
        # The container gets no labels: a commit would hand them on to the image, and so to
        # every flow container. Its name and its volume's labels say whose it is.
        name = f"dockerworker-pip-{tag.rpartition(':')[2]}"
        volume = self.client.volumes.create(
            name, labels={STEP_LABEL: name, HOLDER_LABEL: self.holder})
        try:
            _remove_named(self.client, name)  # a leftover of a builder that died
            container = self.client.containers.create(
                image, name=name, **overrides, network_mode=self.options.network_mode,
                mounts=[docker.types.Mount(FILES_DIR, volume.name, type="volume")],
                **limits.container_kwargs(),
            )
            try:
                container.put_archive(FILES_DIR, _tar(files))
                self._run_step(container, tag, on_line, timeout)
                conf = {**config, "Labels": {**(config.get("Labels") or {}), **labels}}
                repository, _, version = tag.rpartition(":")
                container.commit(repository=repository, tag=version, conf=conf)
            finally:
                _remove(container)
        except docker.errors.APIError as exc:
            raise BuildFailed(f"building image {tag} failed at step 'pip install': "
                              f"{exc.explanation or exc}", transient=True) from None
        finally:
            _remove(volume)

    def _run_step(self, container: Container, tag: str, on_line: Callable[[str], None],
                  timeout: float) -> None:
        """Start the build container, pass its output on, and judge its exit."""
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with suppress(docker.errors.APIError):
                container.kill()

        timer = threading.Timer(max(timeout, 1.0), kill)
        last_lines: list[str] = []
        container.start()
        timer.start()
        try:
            for raw in stream_lines(container.logs(stream=True, follow=True), MAX_LINE_BYTES):
                line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
                if line:
                    on_line(line)
                    last_lines = (last_lines + [line])[-40:]
            exit_code = int(container.wait().get("StatusCode", -1))
        finally:
            timer.cancel()
        if exit_code == 0:
            return
        if killed.is_set():
            raise BuildFailed(f"building image {tag} timed out after {timeout:.0f} s at step "
                              "'pip install'")
        raise BuildFailed(self._failure(tag, "pip install", last_lines,
                                        f"pip exited with code {exit_code}"))

    @staticmethod
    def _failure(tag: str, step: str, lines: list[str], error: str) -> str:
        pip_errors = [line for line in lines if _PIP_ERROR.match(line)]
        detail = pip_errors[-1] if pip_errors else error.strip()
        return f"building image {tag} failed at step {step!r}: {detail}"


def _remove(thing: Container | Volume) -> None:
    with suppress(docker.errors.NotFound):
        thing.remove(force=True)


def _remove_named(client: docker.DockerClient, name: str) -> None:
    with suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)


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
        try:  # every name of it: with a push registry a build has two
            for tag in build.image.tags or [build.tag]:
                client.images.remove(tag, force=False)
            removed.append(build.tag)
        except docker.errors.APIError:
            busy.append(build.tag)
    return removed, busy
