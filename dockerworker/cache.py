"""Reads the worker repeats for every run, answered from memory for a short while.

Runs of one deployment share its deployment, its flow and the pool's base job template; asking
the server for them at every run costs three requests that almost always answer the same.
`ShortLived` keeps each answer for a few seconds (an edit on the server counts within that
time), for a bounded number of keys; only answers are kept, never errors (a deployment
deleted is seen as gone at the first read after its entry expired).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar
from uuid import UUID

from .api import Deployment, Flow, PrefectAPI, WorkPool

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

POOL_SECONDS = 10.0  # an operator's edit of the pool's template counts within this
DEPLOYMENT_SECONDS = 10.0  # an edit of a deployment's job variables counts within this
FLOW_SECONDS = 60.0  # a flow's name is all the worker reads of it
MAX_ENTRIES = 256


class ShortLived(Generic[K, V]):
    """A small map whose entries expire `ttl` seconds after they were stored; the least
    recently stored goes first when it is full. Thread-safe; `clock` for tests."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The value stored for `key` if it is still fresh, else `load()`'s (then stored).
        What `load` raises is raised, and nothing is stored."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self.clock() < entry[0]:
                return entry[1]
        value = load()  # outside the lock: a slow read never holds up other keys
        self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (self.clock() + self.ttl, value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class CachedReads:
    """The deployment, flow and pool reads of the worker's runs, shared by its supervisors."""

    def __init__(self, api: PrefectAPI, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.pools: ShortLived[str, WorkPool] = ShortLived(POOL_SECONDS, clock=clock)
        self.deployments: ShortLived[UUID, Deployment] = ShortLived(DEPLOYMENT_SECONDS,
                                                                    clock=clock)
        self.flows: ShortLived[UUID, Flow] = ShortLived(FLOW_SECONDS, clock=clock)

    def pool(self, name: str) -> WorkPool:
        return self.pools.get(name, lambda: self.api.read_work_pool(name))

    def deployment(self, deployment_id: UUID) -> Deployment:
        return self.deployments.get(deployment_id,
                                    lambda: self.api.read_deployment(deployment_id))

    def flow(self, flow_id: UUID) -> Flow:
        return self.flows.get(flow_id, lambda: self.api.read_flow(flow_id))
