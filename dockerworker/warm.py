"""Warm starts: containers that have imported Prefect before their flow run exists.

A cold container spends most of its start importing Prefect (seconds of CPU). With `--warm N`
the worker keeps up to N waiting containers in all, shared evenly among the job configurations
in use (image, env, limits, networks, labels: everything but the run's identity; at least one
each, for the configurations used most recently). Each runs the entry script (entry.py), which
imports Prefect's engine and then waits on stdin. A claimed run takes one: the worker records
it as the run's infrastructure, renames it after the run and writes the run's identity
(PREFECT__FLOW_RUN_ID and friends) to its stdin; the script then runs `python -m
prefect.engine` in the same process. Each container still serves exactly one run and exits.
Labels are fixed at create, so a warm container carries `io.dockerworker.warm` instead of the
run's labels; a restarted worker finds its run by the flow run's infrastructure_pid.

A configuration is kept warm only while it is used: taking a container starts its
replacement, a run seen scheduled for later warms its configuration ahead (ahead.py), and an
entry script nobody hands a run to exits by itself after WARM_TTL seconds.

Readiness: the entry script prints READY_LINE once Prefect is imported; the worker follows
each new container's output until then, and hands a run to a ready container first (the one
waiting longest), to a booting one only when none is ready (it is still ahead of a cold
start). A container that ends before it is ready is removed, not handed a run. Booting ones do
not count against `--max-starting`: they import at the least CPU weight, so starting runs go
first, and holding runs back until a replacement is ready made warm starts slower (measured:
docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass

from . import metrics
from .containers import RUN_ENV, RUN_LABELS, ContainerSpec
from .entry import LABEL_CONTROL, entry_command
from .runtime import Runtime, RuntimeTrouble, Workload

log = logging.getLogger(__name__)
LABEL_WARM = "io.dockerworker.warm"
WARM_NAME_PREFIX = "dockerworker-warm-"
WARM_TTL = 600.0
BOOT_TIMEOUT = 120.0  # a warm container not ready by then is left as booting, never ready
_TAKE_MARGIN = 30.0  # never hand over a container about to time out
# A waiting container imports Prefect on CPU that running flows leave over (2: the kernel's
# least weight); it gets the job's weight (or Docker's default, 1024) when it takes a run.
WAITING_CPU_SHARES = 2

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
    kwargs["cpu_shares"] = WAITING_CPU_SHARES
    return ContainerSpec(
        name=f"{WARM_NAME_PREFIX}{key[:8]}-{uuid.uuid4().hex[:6]}",
        create_kwargs=kwargs,
        extra_networks=spec.extra_networks,
        auto_remove=spec.auto_remove,
    )


def is_waiting(workload: Workload) -> bool:
    """A warm container that was never handed a run (it is renamed at hand-over)."""
    return workload.name.startswith(WARM_NAME_PREFIX)


def handed_name(run_container_name: str, flow_run_id: uuid.UUID) -> str:
    """A warm container's name from its hand-over on: the run's container name with the
    run's whole id (63 characters at most, a DNS label). Labels are fixed at create, and an
    infrastructure_pid is anyone's to write who may write to the API: the name, which only
    the worker sets, is what proves which run a warm container serves (`serves`)."""
    base = run_container_name.rpartition("-")[0][:30].rstrip("_.-") or "flow-run"
    return f"{base}-{flow_run_id.hex}"


def serves(workload: Workload, flow_run_id: uuid.UUID) -> bool:
    """Whether a warm container was handed this run (its name says so: `handed_name`, with
    the suffix a name already in use gets at the rename)."""
    return re.search(rf"-{flow_run_id.hex}(-[0-9a-f]{{4}})?$", workload.name) is not None


@dataclass
class _Idle:
    container: Workload
    started: float  # time.monotonic() at create: about when its configuration was last used
    ready: bool = False  # it said so (READY_LINE): Prefect is imported


class WarmPool:
    """At most `size` waiting containers in all, shared evenly among the job configurations
    in use (at least one each, for the ones used most recently); started in the background."""

    def __init__(self, runtime: Runtime, size: int, ttl: float = WARM_TTL) -> None:
        self.runtime = runtime
        self.size = size
        self.ttl = ttl
        self._idle: dict[str, list[_Idle]] = {}
        self._starting: dict[str, int] = {}
        self._handing: set[str] = set()  # taken, not yet held by the run's supervisor
        self._lock = threading.Lock()
        self._closed = False

    def take(self, spec: ContainerSpec) -> Workload | None:
        """A running warm container for this spec (or None), and a replacement on its way.
        The pool still holds it (`holds`) until `handed` says the run's supervisor does:
        recovery must never take it for a waiting container while it is renamed."""
        key = warm_key(spec) if self.size else None
        if key is None:
            return None
        taken: Workload | None = None
        while taken is None:
            with self._lock:
                queue = self._idle.get(key) or []
                # a ready one, else the oldest booting one (the furthest in its import)
                index = next((i for i, item in enumerate(queue) if item.ready), 0)
                idle = queue.pop(index) if queue else None
                if idle is not None:
                    self._handing.add(idle.container.id)
            if idle is None:
                break
            if time.monotonic() - idle.started < self.ttl - _TAKE_MARGIN:
                with contextlib.suppress(RuntimeTrouble):
                    if self.runtime.is_running(idle.container):
                        taken = idle.container
                        break
            self._remove(idle.container)
            self.handed(idle.container)
        self._refill(spec, key)
        return taken

    def prewarm(self, spec: ContainerSpec) -> None:
        """Bring this spec's configuration up to its share now, ahead of a run that will
        want it (ahead.py); only in free places or those a configuration holds beyond its
        share: a run not yet claimed never evicts what runs in use keep warm."""
        key = warm_key(spec) if self.size else None
        if key is not None:
            self._refill(spec, key, surplus_only=True)

    def _count(self, key: str) -> int:
        return len(self._idle.get(key, [])) + self._starting.get(key, 0)

    def _refill(self, spec: ContainerSpec, key: str, surplus_only: bool = False) -> None:
        """Bring `key` up to its share; at the bound, in place of the waiting containers of
        the configurations used longest ago (`surplus_only`: of those above their share)."""
        evicted: list[_Idle] = []
        with self._lock:
            if self._closed:
                return
            in_use = {k for k in set(self._idle) | set(self._starting) if self._count(k)}
            share = max(1, self.size // len(in_use | {key}))
            total = sum(self._count(k) for k in in_use)
            planned = 0
            while self._count(key) + planned < share:
                if total + planned >= self.size:
                    others = [(q[-1].started, k)  # by each configuration's latest use
                              for k, q in self._idle.items() if q and k != key
                              and not (surplus_only and self._count(k) <= share)]
                    if not others:
                        break
                    evicted.append(self._idle[min(others)[1]].pop(0))
                    total -= 1
                planned += 1
            if not planned:
                return
            self._starting[key] = self._starting.get(key, 0) + planned
        threading.Thread(target=self._start, args=(spec, key, planned, evicted),
                         name=f"warm-{key[:8]}", daemon=True).start()

    def _start(self, spec: ContainerSpec, key: str, count: int, evicted: list[_Idle]) -> None:
        """Start `count` containers, then follow each until it is ready (a thread each)."""
        metrics.WARM_EVICTIONS.inc(len(evicted))
        for item in evicted:
            self._remove(item.container)
        booting: list[_Idle] = []
        for _ in range(count):
            try:
                container: Workload | None = self.runtime.start(warm_spec(spec, key, self.ttl))
            except RuntimeTrouble as exc:
                log.warning("could not start a warm container for %s: %s",
                            spec.create_kwargs.get("image"), exc)
                container = None
            with self._lock:
                self._starting[key] -= 1
                keep = container is not None and not self._closed
                if keep:
                    booting.append(_Idle(container, time.monotonic()))
                    self._idle.setdefault(key, []).append(booting[-1])
            if keep:
                log.info("warm container %s started for runs of %s", container.name,
                         spec.create_kwargs.get("image"))
            elif container is not None:
                self._remove(container)
        for item in booting:  # each on its own: they boot side by side, in any order
            threading.Thread(target=self._await_ready, args=(key, item),
                             name=f"warm-ready-{item.container.name[-6:]}", daemon=True).start()

    def _await_ready(self, key: str, item: _Idle) -> None:
        """Mark `item` ready when it says so; drop it when it ended before (a broken image, a
        failed import: no run should be handed to it)."""
        try:
            ready = self.runtime.wait_ready(item.container, BOOT_TIMEOUT)
        except RuntimeTrouble:
            ready = False
        if ready:
            with self._lock:
                item.ready = True
            log.info("warm container %s is ready (Prefect imported)", item.container.name)
            return
        ended = True
        with contextlib.suppress(RuntimeTrouble):
            ended = not self.runtime.is_running(item.container)
        if not ended:
            return  # slow, not broken: still a head start
        with self._lock:
            queue = self._idle.get(key) or []
            if item not in queue:  # taken meanwhile (booting), or removed
                return
            queue.remove(item)
        log.warning("warm container %s ended before it was ready; removing it",
                    item.container.name)
        self._remove(item.container)

    def waiting(self) -> int:
        """How many containers wait for a run (for the metrics)."""
        with self._lock:
            return sum(len(queue) for queue in self._idle.values())

    def ready(self) -> int:
        """How many waiting containers are ready (for the metrics)."""
        with self._lock:
            return sum(item.ready for queue in self._idle.values() for item in queue)

    def expire(self) -> None:
        """Remove waiting containers whose entry script has timed out (or is about to)."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for key, queue in self._idle.items():
                expired += [item for item in queue if now - item.started > self.ttl - _TAKE_MARGIN]
                self._idle[key] = [item for item in queue if item not in expired]
        metrics.WARM_EVICTIONS.inc(len(expired))
        for item in expired:
            self._remove(item.container)

    def handed(self, workload: Workload) -> None:
        """A container `take` gave out is held by its run's supervisor now (or was removed)."""
        with self._lock:
            self._handing.discard(workload.id)

    def holds(self) -> set[str]:
        """Ids of the containers waiting here or being handed over (recovery must not take
        them for leftovers)."""
        with self._lock:
            waiting = {item.container.id for queue in self._idle.values() for item in queue}
            return waiting | self._handing

    def close(self) -> None:
        """The worker is leaving: remove every container still waiting for a run."""
        with self._lock:
            self._closed = True
            idle = [item for queue in self._idle.values() for item in queue]
            self._idle.clear()
        for item in idle:
            self._remove(item.container)

    def _remove(self, workload: Workload) -> None:
        try:
            self.runtime.remove(workload)
        except RuntimeTrouble as exc:
            log.warning("could not remove warm container %s: %s", workload.name, exc)
