"""Looking at the Docker host as Docker will: bind sources with their symlinks, networks by
name or id.

A bind source is resolved where Docker resolves it, on the Docker host, which is not where
the worker runs when it runs in a container. The worker asks the engine: a helper container
from an empty image, never started, has the allowed prefix bind-mounted read-only, and the
archive API stats each path component inside it (and reads a symlink's own target). The
walk is ours, component by component, so a link that leaves the prefix is seen leaving.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import docker
import docker.errors
import docker.types
from docker.models.containers import Container

from .jobs import OWN_IMAGES

VOID_IMAGE = f"{OWN_IMAGES}void:1"  # an empty image: a helper container has nothing else
_HELPER_TARGET = "/dockerworker-prefix"
_MODE_DIR = 1 << 31
_MODE_SYMLINK = 1 << 27
_MODE_DEVICE = 1 << 26
_MODE_SOCKET = 1 << 24
MAX_LINKS = 40  # as the kernel's limit on symlinks in one lookup


class PathRefused(ValueError):
    """The path cannot be resolved safely; the message says why."""


@dataclass(frozen=True)
class Stat:
    mode: int

    @property
    def kind(self) -> str:
        if self.mode & _MODE_SYMLINK:
            return "symlink"
        if self.mode & _MODE_SOCKET:
            return "socket"
        if self.mode & _MODE_DEVICE:
            return "device"
        if self.mode & _MODE_DIR:
            return "directory"
        return "file"


@dataclass(frozen=True)
class Resolved:
    path: str  # with every symlink followed (what Docker will mount)
    kind: str  # directory, file, socket, device, or "missing" (Docker creates a directory)


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve(path: str, prefixes: list[str], stat: Callable[[str], Stat | None],
            readlink: Callable[[str], str]) -> Resolved:
    """Follow `path` component by component; every component looked at must lie under one of
    `prefixes` (the operator's, trusted as given). `stat`/`readlink` see the Docker host."""
    pending = _components(path)
    current = "/"
    links = 0
    through = ""  # the last symlink followed, for the message
    while pending:
        part = pending.pop(0)
        if part == "..":
            current = posixpath.dirname(current)
            continue
        candidate = posixpath.join(current, part)
        if not any(under(candidate, prefix) for prefix in prefixes):
            if any(under(prefix, candidate) for prefix in prefixes):
                current = candidate  # an ancestor of a prefix: the operator's own path
                continue
            raise PathRefused(f"it leads to {candidate}, outside the allowed prefixes{through}")
        found = stat(candidate)
        if found is None:
            return Resolved(posixpath.join(candidate, *pending), "missing")
        if found.kind != "symlink":
            if pending and found.kind != "directory":
                raise PathRefused(f"{candidate} is a {found.kind}, not a directory")
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise PathRefused(f"more than {MAX_LINKS} symlinks")
        target = readlink(candidate)
        through = f" (through the symlink {candidate} -> {target})"
        if target.startswith("/"):
            current = "/"
        pending = _components(target) + pending
    if not any(under(current, prefix) for prefix in prefixes):
        raise PathRefused(f"it leads to {current}, outside the allowed prefixes{through}")
    final = stat(current)
    return Resolved(current, final.kind if final else "missing")


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


class HostView:
    """The Docker host's paths and networks, as the engine sees them."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def resolve_bind(self, source: str, prefixes: list[str]) -> Resolved:
        """`source` with its symlinks followed on the Docker host, never looking outside
        `prefixes`. Raises PathRefused."""
        with self._helpers(prefixes) as paths:
            return resolve(source, prefixes, paths.stat, paths.readlink)

    def network_driver(self, name: str) -> str | None:
        """The driver of the network `name` (a name or an id prefix), None when unknown."""
        try:
            return str(self.client.networks.get(name).attrs.get("Driver") or "")
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError:  # an ambiguous id prefix, …: judged as unknown
            return None

    @contextmanager
    def _helpers(self, prefixes: list[str]) -> Iterator[_HelperPaths]:
        with ExitStack() as stack:
            yield _HelperPaths(self.client, prefixes, stack)


class _HelperPaths:
    """stat/readlink of host paths through one helper container per prefix (made lazily)."""

    def __init__(self, client: docker.DockerClient, prefixes: list[str], stack: ExitStack
                 ) -> None:
        self.client = client
        self.prefixes = sorted(prefixes, key=len, reverse=True)
        self.stack = stack
        self.helpers: dict[str, str] = {}

    def _inside(self, path: str) -> tuple[str, str]:
        prefix = next(p for p in self.prefixes if under(path, p))
        if prefix not in self.helpers:
            self.helpers[prefix] = self._helper(prefix)
        return self.helpers[prefix], _HELPER_TARGET + path[len(prefix.rstrip("/")):]

    def _helper(self, prefix: str) -> str:
        _ensure_void_image(self.client)
        mount = docker.types.Mount(_HELPER_TARGET, prefix, type="bind", read_only=True)
        try:
            container = self.client.containers.create(
                VOID_IMAGE, command=["none"], mounts=[mount], network_mode="none",
                labels={"io.dockerworker.helper": "path-check"},
            )
        except docker.errors.APIError as exc:
            raise PathRefused(f"the allowed prefix {prefix} cannot be mounted on the Docker "
                              f"host: {exc.explanation or exc}") from None
        self.stack.callback(_remove, container)
        return str(container.id)

    def stat(self, path: str) -> Stat | None:
        container, inside = self._inside(path)
        url = self.client.api._url("/containers/{0}/archive", container)
        response = self.client.api.head(url, params={"path": inside})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise PathRefused(f"the Docker engine could not look at {path} "
                              f"(HTTP {response.status_code})")
        header = response.headers.get("X-Docker-Container-Path-Stat", "")
        return Stat(int(json.loads(base64.b64decode(header))["mode"]))

    def readlink(self, path: str) -> str:
        """The link's own target, as written (Docker's stat gives it already resolved)."""
        container, inside = self._inside(path)
        stream, _ = self.client.api.get_archive(container, inside)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.next()
        if member is None or not member.issym():
            raise PathRefused(f"{path} changed while it was checked")
        return member.linkname


def _remove(container: Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


def _ensure_void_image(client: docker.DockerClient) -> None:
    try:
        client.images.get(VOID_IMAGE)
    except docker.errors.ImageNotFound:
        empty = io.BytesIO()
        with tarfile.open(fileobj=empty, mode="w"):
            pass
        repository, tag = VOID_IMAGE.split(":")
        client.api.import_image_from_data(empty.getvalue(), repository=repository, tag=tag)
