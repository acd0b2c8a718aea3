"""Who owns a container on a shared engine, and whether that worker is gone.

Several workers (replicas, or workers of other hosts' pools) may share one Docker engine.
A container belongs to the worker named in its `io.prefect.worker-name` label, until another
worker takes it over: then a takeover record says so. Records are never-started containers
named `dockerworker-owner-<container id>-<generation>`; Docker makes creating a name atomic,
so of the workers that try to take a container over at the same generation exactly one
succeeds (the others get a conflict). The owner is the holder of the highest generation, or
the label's worker when there is no record.

Only the owner touches a container (follows it, judges it, removes it), or another worker once
the owner is provably gone: the pool has not seen its heartbeat for several intervals (the
server marks it OFFLINE), or it has been absent from the pool's workers for as long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .api import PrefectAPI, State, StateType
from .containers import LABEL_WORKER

if TYPE_CHECKING:
    from .runtime import Workload

log = logging.getLogger(__name__)
OWNER_PREFIX = "dockerworker-owner-"
LABEL_OWNER_OF = "io.dockerworker.owner-of"
# not io.prefect.work-pool-name: a record is no workload of the pool (tools that count the
# pool's containers by that label never see one)
LABEL_OWNER_POOL = "io.dockerworker.owner-pool"
LABEL_HOLDER = "io.dockerworker.holder"
LABEL_GENERATION = "io.dockerworker.generation"
GONE_AFTER_BEATS = 3  # as Prefect's server: OFFLINE after 3 missed heartbeat intervals
CLAIM_PREFIX = "claimed by dockerworker "  # the PENDING state's message: Claim.message
_ENGINE = " (engine "


@dataclass(frozen=True)
class Claim:
    """A run's claim, as its PENDING state's message says: the worker that holds it, and the
    engine that worker makes its containers on. A restarted worker knows its own claims by
    it; and only a worker that sees the claim's engine can tell whether its container exists
    (a claim naming no engine was made by an earlier dockerworker: any worker may judge it).
    """

    holder: str
    engine: str = ""

    @property
    def message(self) -> str:
        return CLAIM_PREFIX + self.holder + (f"{_ENGINE}{self.engine})" if self.engine else "")

    @classmethod
    def of(cls, state: State | None) -> Claim | None:
        """The claim a PENDING state records; None: another state, or not a dockerworker's."""
        if state is None or state.type != StateType.PENDING:
            return None
        message = state.message or ""
        if not message.startswith(CLAIM_PREFIX):
            return None
        holder, found, engine = message.removeprefix(CLAIM_PREFIX).rpartition(_ENGINE)
        if found and engine.endswith(")"):
            return cls(holder, engine.removesuffix(")"))
        return cls(message.removeprefix(CLAIM_PREFIX))

    def seen_from(self, engine: str) -> bool:
        """Whether a worker on `engine` can tell whether this claim's container exists."""
        return not self.engine or self.engine == engine


@dataclass(frozen=True)
class Owner:
    """A container's owner: the worker, and the generation of its takeover (0: the label)."""

    name: str
    generation: int = 0


def owner_record_name(workload_id: str, generation: int) -> str:
    """The takeover record's container name: one per container and generation."""
    return f"{OWNER_PREFIX}{workload_id[:32]}-{generation}"


def latest_owners(records: Iterable[tuple[str, dict[str, str]]]) -> dict[str, Owner]:
    """From the takeover records (name, labels): the latest owner of each container, by id.
    A record counts only under the name its takeover gave it, the one Docker creates once:
    anything else carrying such labels is no record."""
    found: dict[str, Owner] = {}
    for name, labels in records:
        workload_id, generation = labels.get(LABEL_OWNER_OF, ""), labels.get(LABEL_GENERATION, "")
        if not generation.isdigit() or name != owner_record_name(workload_id, int(generation)):
            log.warning("%s carries ownership labels but is no ownership record; ignored", name)
            continue
        owner = Owner(labels.get(LABEL_HOLDER, ""), int(generation))
        if owner.generation > found.get(workload_id, Owner("", -1)).generation:
            found[workload_id] = owner
    return found


def owner_of(workload: Workload, records: dict[str, Owner]) -> Owner:
    """The holder of the latest takeover, else the worker that started the container."""
    return records.get(workload.id) or Owner(workload.labels.get(LABEL_WORKER, ""))


def _parse_time(value: Any) -> float | None:
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


class Liveness:
    """Which workers of the pool are gone, from the pool's workers as the server knows them.

    Gone: the server says OFFLINE (its own clock: no skew), or, from a server without a
    status, no heartbeat for GONE_AFTER_BEATS of its intervals; or absent from the pool's
    workers for GONE_AFTER_BEATS of our heartbeat intervals, counted from when we first
    looked (a pool re-created meanwhile forgets its workers; a live one comes back at once).
    """

    def __init__(self, api: PrefectAPI, pool: str, interval: float,
                 patience: float = 2.0) -> None:
        self.api = api
        self.pool = pool
        self.interval = interval
        self.patience = patience
        self._absent_since: dict[str, float] = {}

    def gone(self, names: set[str]) -> set[str]:
        """Those of `names` that are gone (one request to the server)."""
        if not names:
            return set()
        workers = {str(w.get("name")): w
                   for w in self.api.read_workers(self.pool, patience=self.patience)}
        now = time.monotonic()
        found = set()
        for name in names:
            worker = workers.get(name)
            if worker is None:
                first = self._absent_since.setdefault(name, now)
                if now - first > GONE_AFTER_BEATS * self.interval:
                    found.add(name)
                continue
            self._absent_since.pop(name, None)
            if _is_offline(worker):
                found.add(name)
        return found


def _is_offline(worker: dict[str, Any]) -> bool:
    status = worker.get("status")
    if status is not None:
        return str(status).upper() == "OFFLINE"
    last = _parse_time(worker.get("last_heartbeat_time"))
    interval = float(worker.get("heartbeat_interval_seconds") or 30)
    return last is None or time.time() - last > GONE_AFTER_BEATS * interval


def claimant(api: PrefectAPI, flow_run_id: UUID) -> Claim | None:
    """The claim the run's history shows last; None: no dockerworker ever claimed it."""
    found = None
    for state in api.read_flow_run_states(flow_run_id):
        found = Claim.of(state) or found
    return found
