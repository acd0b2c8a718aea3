"""Admission: how many runs this worker takes, and the one registry of its supervisors.

`--limit` bounds the runs in flight (adopted runs count, and are never refused: their
containers exist already); a slot is freed the moment its supervisor ends. `--max-starting` bounds the runs still starting (claimed, not yet seen
RUNNING): a container booting Prefect is CPU-heavy, and a burst booted all at once reaches
RUNNING later for every run. A run stops counting as starting when the event stream or the
worker's check (which runs with the stream too, less often: events can be missed) sees it
RUNNING, or after BOOT_PATIENCE, RUNNING or not. Other workers' starts on the same engine
count against `--max-starting` too (`also_starting`): the containers they started there within
this worker's typical start (`typical_start`: the median of its last runs' claim to RUNNING),
so that replicas sharing a host share the bound instead of multiplying it.

One object owns these numbers behind its own lock; the worker loop and the event thread call
it, nothing else writes its state (arq's semaphore with a done-callback, made explicit).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

BOOT_PATIENCE = 120.0  # a run stops counting as starting after this long, RUNNING or not
FIRST_START_GUESS = 5.0  # the typical start (seconds) before this worker has timed one
S = TypeVar("S")


@dataclass
class _Slot(Generic[S]):
    supervisor: S
    admitted: float  # clock() at admission
    booting: bool


class Admission(Generic[S]):
    """The runs in flight, by flow run id, within `limit` and `max_starting` (0/None: any)."""

    def __init__(self, limit: int | None, max_starting: int | None,
                 patience: float = BOOT_PATIENCE,
                 clock: Callable[[], float] = time.monotonic,
                 also_starting: Callable[[], int] = lambda: 0) -> None:
        self.limit = limit
        self.max_starting = max_starting or 0
        self.also_starting = also_starting  # other workers' starts on this engine
        self.patience = patience
        self._clock = clock
        self._slots: dict[UUID, _Slot[S]] = {}
        self._starts: deque[float] = deque(maxlen=20)  # claim → RUNNING of the last runs
        self._lock = threading.Lock()

    def free(self) -> int | None:
        """How many more runs to take now (None: no bound)."""
        others = self.also_starting() if self.max_starting else 0  # its own lock, not under ours
        with self._lock:
            bounds = []
            if self.limit is not None:
                bounds.append(self.limit - len(self._slots))
            if self.max_starting:
                bounds.append(self.max_starting - len(self._booting()) - others)
        return min(bounds) if bounds else None

    def admit(self, run_id: UUID, make: Callable[[], S], booting: bool = True) -> S | None:
        """A slot for `run_id` and its supervisor (made under the lock), or None: the run is
        already in flight, or the worker is at its limit. An adopted run (not `booting`: its
        container exists already) is never refused for the limit: it runs, or has ended and
        waits for its verdict, watched or not; it counts against the limit all the same."""
        with self._lock:
            if run_id in self._slots:
                return None
            if booting and self.limit is not None and len(self._slots) >= self.limit:
                return None
            supervisor = make()
            self._slots[run_id] = _Slot(supervisor, self._clock(), booting)
        return supervisor

    def release(self, run_id: UUID) -> None:
        """The supervisor has ended: its slot is free."""
        with self._lock:
            self._slots.pop(run_id, None)

    def running(self, run_id: UUID) -> bool:
        """The run was seen RUNNING: it no longer counts as starting. True when that freed
        a start slot (worth polling at once)."""
        with self._lock:
            slot = self._slots.get(run_id)
            if slot is None or not slot.booting:
                return False
            slot.booting = False
            self._starts.append(self._clock() - slot.admitted)
        return bool(self.max_starting)

    def typical_start(self) -> float:
        """Seconds from claim to RUNNING of this worker's recent runs (their median)."""
        with self._lock:
            return statistics.median(self._starts) if self._starts else FIRST_START_GUESS

    def booting(self) -> list[UUID]:
        """The runs still starting (within the patience)."""
        with self._lock:
            return list(self._booting())

    def _booting(self) -> dict[UUID, _Slot[S]]:
        now = self._clock()
        return {run_id: slot for run_id, slot in self._slots.items()
                if slot.booting and now - slot.admitted < self.patience}

    def supervisors(self) -> dict[UUID, S]:
        """A snapshot of the runs in flight."""
        with self._lock:
            return {run_id: slot.supervisor for run_id, slot in self._slots.items()}

    def __contains__(self, run_id: object) -> bool:
        with self._lock:
            return run_id in self._slots

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)
