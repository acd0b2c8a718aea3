"""Each run's own resource report: peak memory against its limit, CPU, wall time, exit, image.

When a run's container ends, one line in the run's logs says what it used, read from the
engine: so users can right-size `mem_limit` and see what a run cost.

Why it is sampled while the container runs: once a container has exited its cgroup is gone
and the stats API answers zeros. What makes a few cheap readings enough:

- cgroup v1 keeps the cgroup's own peak (`memory_stats.max_usage`) and cumulative CPU
  (`cpu_usage.total_usage`) since the container started, so the *last* reading carries the
  whole run up to that moment: no need to catch the peak as it happens, and a worker that
  adopts a container after a restart still gets figures for the whole run.
- A one-shot reading (`stream=false&one-shot=true`, API 1.41) does not wait for a second
  sample. Docker's stats collector answers at once when it is idle and otherwise at its next
  tick (≤ 1 s; readings taken together share a tick), so readings due together are taken
  together, by a small pool.

One `UsageWatch` per worker: one sampler thread (and a pool of at most `batch` callers) while
any container is watched, none when none is; each container is read 0.25 s after it is
watched, then at a tenth of its age (at least every second, at most every 30 s), and all
readings together at most `rate` a second (2): a reading costs the worker ~3 ms of CPU, so
however many runs are in flight and however young, readings take under 1 % of a core (50 long
runs read every 5 s took 3 %; docs/benchmarks.md, "many runs in flight"). When more are due
than the budget allows they wait their turn: a container never read first, then the longest
due. The CPU and memory used after the last reading is not counted, and the line says how long
before the end that reading was. A container that ended before its first reading gets a line
too, with the figures it has (wall time, exit, image) and "unknown" for the others. On cgroup
v2 the engine gives no peak: the line gives the highest reading as a lower bound and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import metrics

if TYPE_CHECKING:
    from .containers import ExitReport
    from .runtime import Runtime, Workload

log = logging.getLogger(__name__)
_MIB = 1024 * 1024
_UNSET_TIME = "0001-01-01"  # the engine's zero time: not running / not finished


@dataclass(frozen=True)
class Usage:
    """One reading of a running container's cgroup accounting."""

    read_at: datetime  # the engine's clock
    memory: int | None = None  # bytes in use now
    peak: int | None = None  # the cgroup's own peak since the container started (cgroup v1)
    limit: int | None = None  # what the cgroup may use (the host's memory when no mem_limit)
    cpu_ns: int | None = None  # CPU since the container started, cumulative


def engine_time(value: object) -> datetime | None:
    """A timestamp of the engine's (RFC 3339, nanoseconds); None for its zero time."""
    text = str(value or "")
    if not text or text.startswith(_UNSET_TIME):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def parse_stats(stats: dict[str, Any]) -> Usage | None:
    """A one-shot stats answer as a reading; None when the container is not running (the
    engine then answers its zero time and empty figures)."""
    read_at = engine_time(stats.get("read"))
    memory = stats.get("memory_stats") or {}
    cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
    if read_at is None or not memory:
        return None

    def number(value: object) -> int | None:
        return int(value) if isinstance(value, int | float) else None

    return Usage(read_at=read_at, memory=number(memory.get("usage")),
                 peak=number(memory.get("max_usage")), limit=number(memory.get("limit")),
                 cpu_ns=number(cpu.get("total_usage")))


@dataclass
class Seen:
    """What the readings of one container's life add up to."""

    readings: int = 0
    peak: int | None = None  # the cgroup's peak (v1), or the highest reading (v2)
    peak_is_cgroup: bool = True  # False: only a lower bound (no reading carried a peak)
    cpu_ns: int | None = None  # from the latest reading
    last_read: datetime | None = None

    def add(self, usage: Usage) -> None:
        self.readings += 1
        if usage.peak is not None:
            self.peak = max(self.peak or 0, usage.peak)
        elif usage.memory is not None:
            self.peak = max(self.peak or 0, usage.memory)
            self.peak_is_cgroup = False
        if usage.cpu_ns is not None and (self.cpu_ns is None or usage.cpu_ns >= self.cpu_ns):
            self.cpu_ns = usage.cpu_ns
        if self.last_read is None or usage.read_at > self.last_read:
            self.last_read = usage.read_at


@dataclass
class _Watched:
    workload: Workload
    since: float  # monotonic: when watching began
    due: float
    seen: Seen = field(default_factory=Seen)
    busy: bool = False  # a reading is under way


class UsageWatch:
    """Readings of the running containers of one worker, from one sampler thread that exists
    only while some container is watched."""

    def __init__(self, runtime: Runtime, *, first: float = 0.25, every_min: float = 1.0,
                 every_max: float = 30.0, batch: int = 8, rate: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.first = first
        self.every_min = every_min
        self.every_max = every_max
        self.batch = batch
        self.rate = rate  # readings a second, all containers together (a token bucket)
        self.clock = clock
        self._tokens = float(batch)
        self._filled_at = clock()
        self._watched: dict[str, _Watched] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, workload: Workload) -> None:
        """Begin reading this container (again: a no-op)."""
        now = self.clock()
        with self._cond:
            if workload.id in self._watched:
                return
            self._watched[workload.id] = _Watched(workload, now, now + self.first)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="usage-sampler",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def release(self, workload: Workload, patience: float = 3.0) -> Seen:
        """Stop reading it; what its readings add up to (a reading under way is awaited)."""
        deadline = time.monotonic() + patience
        with self._cond:
            while (entry := self._watched.get(workload.id)) is not None and entry.busy:
                if (left := deadline - time.monotonic()) <= 0:
                    break
                self._cond.wait(left)
            entry = self._watched.pop(workload.id, None)
            self._cond.notify_all()
        return entry.seen if entry is not None else Seen()

    @property
    def active(self) -> bool:
        """The sampler thread exists (for tests: none is left behind)."""
        with self._cond:
            return self._thread is not None

    def _interval(self, age: float) -> float:
        return min(self.every_max, max(self.every_min, age / 10))

    def _loop(self) -> None:
        pool: ThreadPoolExecutor | None = None
        try:
            while True:
                with self._cond:
                    if not self._watched:
                        self._thread = None
                        return
                    now = self.clock()
                    self._tokens = min(float(self.batch),
                                       self._tokens + (now - self._filled_at) * self.rate)
                    self._filled_at = now
                    idle = [w for w in self._watched.values() if not w.busy]
                    # never read first (without a reading its line says "unknown"), then
                    # the longest due
                    due = sorted((w for w in idle if w.due <= now + 0.05),
                                 key=lambda w: (w.seen.readings > 0, w.due)
                                 )[:min(self.batch, int(self._tokens))]
                    if not due:
                        wake = min((w.due for w in idle), default=now + self.every_max)
                        if self._tokens < 1:  # readings are due but the budget is spent
                            wake = max(wake, now + (1 - self._tokens) / self.rate)
                        self._cond.wait(max(0.01, wake - now))
                        continue
                    self._tokens -= len(due)
                    for entry in due:
                        entry.busy = True
                # the next reading is due an interval after this one was asked for: a reading
                # waits up to a second for the collector's tick, which is not added to it
                asked = now
                if len(due) > 1 and pool is None:
                    pool = ThreadPoolExecutor(self.batch, thread_name_prefix="usage-read")
                readings = (list(pool.map(self._read, due)) if len(due) > 1 and pool
                            else [self._read(due[0])])
                with self._cond:
                    for entry, usage in zip(due, readings, strict=True):
                        entry.busy = False
                        if usage is not None and self._watched.get(entry.workload.id) is entry:
                            entry.seen.add(usage)
                        entry.due = asked + self._interval(asked - entry.since)
                    self._cond.notify_all()
        finally:
            if pool is not None:
                pool.shutdown(wait=False)

    def _read(self, entry: _Watched) -> Usage | None:
        """One reading; None when there is none (not running, gone, the engine away)."""
        from .runtime import RuntimeTrouble  # runtime.py imports this module's types

        try:
            return self.runtime.usage(entry.workload)
        except RuntimeTrouble as exc:
            log.debug("no usage reading of container %s: %s", entry.workload.name, exc)
        except Exception:  # the sampler outlives any one reading
            log.exception("reading the usage of container %s failed", entry.workload.name)
        return None


# --- the line ---------------------------------------------------------------------------------
def _mib(value: int) -> str:
    return f"{value / _MIB:.1f} MiB"


def _limit(value: int) -> str:
    mib = value / _MIB
    return f"{mib:.0f} MiB" if mib == int(mib) else f"{mib:.1f} MiB"


def resource_line(report: ExitReport, seen: Seen, *, warm: bool = False,
                  unread: str | None = None) -> str:
    """The run's resource report, one line: what the engine says, "unknown" where it said
    nothing (never a guess). `unread`: why the runtime reads no usage (Swarm jobs), said
    instead of the short-run note, which would be untrue."""
    limit = report.memory_limit
    if seen.peak is None:
        memory = "peak memory unknown"
    else:
        memory = ("peak memory " if seen.peak_is_cgroup else "memory at least ") + _mib(seen.peak)
        if limit:
            memory += f" of {_limit(limit)} limit ({100 * seen.peak / limit:.0f} %)"
            metrics.PEAK_MEMORY_RATIO.observe(seen.peak / limit)
        else:
            memory += " (no mem_limit)"
    cpu = "CPU unknown" if seen.cpu_ns is None else f"CPU {seen.cpu_ns / 1e9:.1f} s"
    wall = "wall unknown"
    if report.started is not None and report.finished is not None:
        wall = f"wall {max(0.0, (report.finished - report.started).total_seconds()):.1f} s"
    exit_ = f"exit {report.exit_code}" + (" (out of memory)" if report.oom_killed else "")
    parts = [memory, cpu, wall, exit_]
    if report.image:
        parts.append(f"image {report.image}")
    line = "resources: " + ", ".join(parts)
    notes = []
    if unread is not None:
        notes.append(unread)
    elif seen.readings == 0:
        notes.append("the container ended before its usage could be read")
    elif seen.last_read is not None and report.finished is not None:
        gap = max(0.0, (report.finished - seen.last_read).total_seconds())
        notes.append(f"memory and CPU as read {gap:.1f} s before the end")
    if seen.readings and not seen.peak_is_cgroup:
        notes.append("the engine gives no peak: the highest reading is shown")
    if warm:
        notes.append("a warm container: counted from its start, before the hand-over")
    return line + "".join(f"; {note}" for note in notes)
