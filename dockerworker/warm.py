"""Warm starts: containers that have imported Prefect before their flow run exists.

A cold container spends most of its start importing Prefect (seconds of CPU). With `--warm N`
the worker keeps up to N waiting containers in all, one per job configuration (image, env,
limits, networks, labels: everything but the run's identity), for the configurations used most
recently. Each runs the entry script (entry.py), which imports Prefect's engine and then waits
on stdin. A claimed run takes one: the worker records it as the run's infrastructure, renames
it after the run and writes the run's identity (PREFECT__FLOW_RUN_ID and friends) to its
stdin; the script then runs `python -m prefect.engine` in the same process. Each container
still serves exactly one run and exits. Labels are fixed at create, so a warm container
carries `io.dockerworker.warm` instead of the run's labels; a restarted worker finds its run
by the flow run's infrastructure_pid.

A configuration is kept warm only while it is used: taking a container starts its
replacement, and an entry script nobody hands a run to exits by itself after WARM_TTL seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import docker
import docker.errors
from docker.models.containers import Container

from .containers import (
    RUN_ENV,
    RUN_LABELS,
    ContainerSpec,
    create_and_start,
    remove_quietly,
)
from .entry import LABEL_CONTROL, entry_command, write_line

log = logging.getLogger(__name__)
LABEL_WARM = "io.dockerworker.warm"
WARM_NAME_PREFIX = "dockerworker-warm-"
WARM_TTL = 600.0
_TAKE_MARGIN = 30.0  # never hand over a container about to time out

def warm_key(spec: ContainerSpec) -> str | None:
    """Which warm containers can serve this run: a hash of the spec without the run's
    identity; None when the job runs its own command (only the entry script waits for a run)."""
    kwargs = spec.create_kwargs
    if kwargs["labels"].get(LABEL_CONTROL) != "stdin":
        return None
    basis = {
        **kwargs,
        "environment": {k: v for k, v in kwargs["environment"].items() if k not in RUN_ENV},
        "labels": {k: v for k, v in kwargs["labels"].items() if k not in RUN_LABELS},
        "extra_networks": spec.extra_networks,
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_spec(spec: ContainerSpec, key: str, ttl: float) -> ContainerSpec:
    """The run's spec without its identity; the entry script waits for one on stdin."""
    kwargs = dict(spec.create_kwargs)
    kwargs["environment"] = {k: v for k, v in kwargs["environment"].items() if k not in RUN_ENV}
    kwargs["labels"] = {k: v for k, v in kwargs["labels"].items() if k not in RUN_LABELS}
    kwargs["labels"][LABEL_WARM] = key
    kwargs["command"] = entry_command(wait_seconds=ttl)
    return ContainerSpec(
        name=f"{WARM_NAME_PREFIX}{key[:8]}-{uuid.uuid4().hex[:6]}",
        create_kwargs=kwargs,
        extra_networks=spec.extra_networks,
        auto_remove=spec.auto_remove,
    )


def listed_name(container: Container) -> str:
    """The name of a container from a sparse listing (`Names`) or an inspect (`Name`)."""
    names = container.attrs.get("Names") or [container.attrs.get("Name") or ""]
    return names[0].lstrip("/")


def is_waiting(container: Container) -> bool:
    """A warm container that was never handed a run (it is renamed at hand-over)."""
    return listed_name(container).startswith(WARM_NAME_PREFIX)


def hand_over(container: Container, spec: ContainerSpec) -> None:
    """Name the container after the run and write the run's identity to its stdin."""
    try:
        container.rename(spec.name)
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise
        container.rename(f"{spec.name}-{uuid.uuid4().hex[:4]}")
    env = {k: v for k, v in spec.create_kwargs["environment"].items() if k in RUN_ENV}
    write_line(container, json.dumps(env))
    container.reload()


@dataclass
class _Idle:
    container: Container
    started: float  # time.monotonic() at create: when its configuration was last used


class WarmPool:
    """At most `size` waiting containers in all, one per job configuration, for the
    configurations used most recently; each started in the background."""

    def __init__(self, client: docker.DockerClient, size: int, ttl: float = WARM_TTL) -> None:
        self.docker = client
        self.size = size
        self.ttl = ttl
        self._idle: dict[str, _Idle] = {}
        self._starting: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def take(self, spec: ContainerSpec) -> Container | None:
        """A running warm container for this spec (or None), and a replacement on its way."""
        key = warm_key(spec) if self.size else None
        if key is None:
            return None
        with self._lock:
            idle = self._idle.pop(key, None)
        taken: Container | None = None
        if idle is not None and time.monotonic() - idle.started < self.ttl - _TAKE_MARGIN:
            with contextlib.suppress(docker.errors.NotFound):
                idle.container.reload()
                if idle.container.status == "running":
                    taken = idle.container
        if idle is not None and taken is None:
            remove_quietly(idle.container)
        self._refill(spec, key)
        return taken

    def _refill(self, spec: ContainerSpec, key: str) -> None:
        """Start a waiting container for `key`; at the bound, in place of the one whose
        configuration was used longest ago."""
        evicted: _Idle | None = None
        with self._lock:
            if self._closed or key in self._idle or key in self._starting:
                return
            if len(self._idle) + len(self._starting) >= self.size:
                if not self._idle:
                    return  # every place is taken by a container being started
                oldest = min(self._idle, key=lambda k: self._idle[k].started)
                evicted = self._idle.pop(oldest)
            self._starting.add(key)
        threading.Thread(target=self._start, args=(spec, key, evicted),
                         name=f"warm-{key[:8]}", daemon=True).start()

    def _start(self, spec: ContainerSpec, key: str, evicted: _Idle | None) -> None:
        if evicted is not None:
            remove_quietly(evicted.container)
        try:
            container: Container | None = create_and_start(
                self.docker, warm_spec(spec, key, self.ttl))
        except docker.errors.DockerException as exc:
            log.warning("could not start a warm container for %s: %s",
                        spec.create_kwargs.get("image"), exc)
            container = None
        with self._lock:
            self._starting.discard(key)
            keep = container is not None and not self._closed
            if keep:
                self._idle[key] = _Idle(container, time.monotonic())
        if keep:
            log.info("warm container %s started for runs of %s", container.name,
                     spec.create_kwargs.get("image"))
        elif container is not None:
            remove_quietly(container)

    def expire(self) -> None:
        """Remove waiting containers whose entry script has timed out (or is about to)."""
        now = time.monotonic()
        with self._lock:
            old = [key for key, item in self._idle.items()
                   if now - item.started > self.ttl - _TAKE_MARGIN]
            expired = [self._idle.pop(key) for key in old]
        for item in expired:
            remove_quietly(item.container)

    def close(self) -> None:
        """The worker is leaving: remove every container still waiting for a run."""
        with self._lock:
            self._closed = True
            idle = list(self._idle.values())
            self._idle.clear()
        for item in idle:
            remove_quietly(item.container)
