"""Every flow container's output, in the flow run's logs on the server: once, in order, bounded.

Two pieces:
- `RunOutput` follows one container's stdout and stderr (with Docker's timestamps), drops what
  Prefect's engine already shipped itself, applies the per-run cap (`max_log_bytes`), echoes
  to the worker's console (`stream_output`) and hands log entries to the shipper.
- `LogShipper`, one per worker, sends entries in batches (by count, size and a short interval)
  to `POST /logs/`, retrying with backoff while the server is away. Its buffer is bounded: when
  it is full, followers stop reading (the output waits in Docker's log) for up to a minute;
  what still does not fit is dropped, counted and reported in a notice. A run never blocks.

What the engine already shipped: inside the container, Prefect's engine sends the records of
its flow-run and task-run loggers to the API and also prints them to stderr as
`HH:MM:SS.mmm | LEVEL   | Flow run 'name' - message` (or `Task run`), a traceback following on
the next lines. Those lines, and their continuation lines written in the same burst, are not
shipped again; everything else (plain prints, tracebacks before the engine runs, output of a
non-Prefect command, the engine's own supervisor lines) is shipped exactly once. A job that
sets `PREFECT_LOGGING_TO_API_ENABLED=false` gets every line shipped.

Resuming after a worker restart: the server holds the cursor. Container lines are shipped with
their Docker timestamps, made strictly increasing per run so the server's order is the
container's order; the newest `dockerworker.container*` log of a run says how far shipping got.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from docker.models.containers import Container
from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from .api import PrefectAPI, PrefectAPIError, ServerUnreachable

log = logging.getLogger(__name__)

STDOUT_LOGGER = "dockerworker.container"
STDERR_LOGGER = "dockerworker.container.stderr"
NOTICE_LOGGER = "dockerworker"
MAX_LINE_CHARS = 64 * 1024
ENTRY_OVERHEAD = 512  # what one buffered entry costs in memory beyond its text, roughly
BACKPRESSURE_SECONDS = 60.0  # how long a follower waits for room before dropping lines

_ENGINE_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ *\| (?:Flow run|Task run) '")
_ANY_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ *\| ")
_BURST = timedelta(milliseconds=100)
_ONE_MICROSECOND = timedelta(microseconds=1)
RESUME_WINDOW = timedelta(seconds=10)  # how far back to re-read output when resuming


@dataclass
class OutputLine:
    stream: str  # "stdout" or "stderr"
    timestamp: datetime
    text: str


def parse_docker_line(raw: bytes, stream: str) -> OutputLine:
    """`2026-11-29T15:30:38.403123456Z text` (Docker's `timestamps=True`) → OutputLine."""
    stamp, _, text = raw.decode("utf-8", errors="replace").partition(" ")
    return OutputLine(stream, datetime.fromisoformat(stamp), text.rstrip("\r"))


class EngineEchoFilter:
    """Recognises the stderr lines that Prefect's engine printed after shipping them itself."""

    def __init__(self) -> None:
        self._record_until: datetime | None = None

    def shipped_by_engine(self, line: OutputLine) -> bool:
        if _ENGINE_RECORD.match(line.text):
            self._record_until = line.timestamp + _BURST
            return True
        if _ANY_RECORD.match(line.text):  # another logger's record: not shipped by the engine
            self._record_until = None
            return False
        if self._record_until is not None and line.timestamp <= self._record_until:
            self._record_until = line.timestamp + _BURST  # a traceback line of that record
            return True
        self._record_until = None
        return False


@dataclass
class ShipperStats:
    requests: int = 0
    entries: int = 0
    dropped: int = 0
    failures: int = 0


@dataclass
class _Pending:
    entries: deque[dict[str, Any]] = field(default_factory=deque)
    bytes: int = 0


class LogShipper:
    """One thread sending log entries for all runs in batches; `submit` never blocks."""

    def __init__(
        self,
        api: PrefectAPI,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        batch_entries: int = 1000,
        batch_bytes: int = 1024 * 1024,
        interval: float = 0.5,
    ) -> None:
        self.api = api
        self.max_buffer_bytes = max_buffer_bytes
        self.batch_entries = batch_entries
        self.batch_bytes = batch_bytes
        self.interval = interval
        self.stats = ShipperStats()
        self._pending = _Pending()
        self._dropped: dict[UUID, int] = {}
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)

    def start(self) -> LogShipper:
        self._thread.start()
        return self

    def submit(self, entry: dict[str, Any], wait: float = 0.0) -> bool:
        """Queue one entry. When the buffer is full, wait up to `wait` seconds for room (the
        container's output waits in Docker meanwhile), then drop it and count it for a notice."""
        size = len(entry["message"]) + ENTRY_OVERHEAD
        deadline = time.monotonic() + wait
        with self._cond:
            while self._pending.bytes + size > self.max_buffer_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    run = UUID(entry["flow_run_id"])
                    self._dropped[run] = self._dropped.get(run, 0) + 1
                    self.stats.dropped += 1
                    return False
                self._cond.notify_all()
                self._cond.wait(min(remaining, 0.5))
            self._pending.entries.append(entry)
            self._pending.bytes += size
            if len(self._pending.entries) >= self.batch_entries:
                self._cond.notify_all()
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far was sent (or given up on); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._pending.entries or self._in_flight or self._dropped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Send what is queued (within `timeout`), then end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        log.info(
            "log shipper: %d entries sent in %d requests, %d dropped, %d failed attempts",
            self.stats.entries, self.stats.requests, self.stats.dropped, self.stats.failures,
        )

    # --- the thread ---------------------------------------------------------------------
    def _take_batch(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        size = 0
        for run, count in list(self._dropped.items()):
            batch.append(_notice(run, f"dockerworker: {count} output lines of this run were "
                                      "dropped: the Prefect server did not keep up and the "
                                      "worker's log buffer was full"))
            del self._dropped[run]
        pending = self._pending
        while pending.entries and len(batch) < self.batch_entries and size < self.batch_bytes:
            entry = pending.entries.popleft()
            entry_size = len(entry["message"]) + ENTRY_OVERHEAD
            pending.bytes -= entry_size
            size += entry_size
            batch.append(entry)
        self._in_flight = len(batch)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending.entries and not self._dropped:
                    if self._stopping:
                        return
                    self._cond.wait(self.interval)
                elif len(self._pending.entries) < self.batch_entries and not self._stopping:
                    self._cond.wait(self.interval)  # let a batch fill up a little
                batch = self._take_batch()
            if batch:
                self._send(batch)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        """Send one batch, retrying while the server is unreachable; a 4xx drops the batch."""

        def note_failure(state: Any) -> None:
            self.stats.failures += 1
            if state.attempt_number in (1, 10) or state.attempt_number % 50 == 0:
                log.warning("shipping %d log lines failed (%s); retrying",
                            len(batch), state.outcome.exception())

        retrying = Retrying(
            retry=retry_if_exception_type(ServerUnreachable),
            wait=wait_exponential_jitter(multiplier=0.5, max=5),
            before_sleep=note_failure,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.stats.requests += 1
                    self.api.send_logs(batch, patience=0)
        except PrefectAPIError as exc:
            log.error("the server refused %d log lines, dropping them: %s", len(batch), exc)
            return
        self.stats.entries += len(batch)


def log_entry(
    flow_run_id: UUID, message: str, level: int = logging.INFO, name: str = NOTICE_LOGGER
) -> dict[str, Any]:
    """A worker-side line for a flow run's logs, stamped now."""
    return {
        "name": name,
        "level": level,
        "message": message,
        "timestamp": datetime.now().astimezone().isoformat(),
        "flow_run_id": str(flow_run_id),
    }


def _notice(flow_run_id: UUID, message: str) -> dict[str, Any]:
    return log_entry(flow_run_id, message, logging.WARNING)


class RunOutput:
    """One container's output on its way to the server (and the console)."""

    def __init__(
        self,
        shipper: LogShipper,
        flow_run_id: UUID,
        max_bytes: int,
        echo: Any = None,
        skip_engine_records: bool = True,
        mask: Callable[[str], str] = str,
    ) -> None:
        self.shipper = shipper
        self.mask = mask
        self.flow_run_id = flow_run_id
        self.max_bytes = max_bytes
        self.echo = echo
        self.skip_engine_records = skip_engine_records
        self.lines = 0
        self.bytes = 0
        self.left_out_lines = 0
        self.left_out_bytes = 0
        self._last: datetime | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def follow(self, container: Container, resume: ResumePoint | None = None) -> None:
        """Follow stdout and stderr until the container ends or `stop()` (stderr in a helper
        thread). With `resume`, what was already shipped is skipped: no duplicate, no gap."""
        stderr = threading.Thread(
            target=self._follow_stream, args=(container, "stderr", resume), daemon=True
        )
        stderr.start()
        self._follow_stream(container, "stdout", resume)
        stderr.join()

    def stop(self) -> None:
        """Stop following at the next line (the container keeps running)."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _follow_stream(self, container: Container, stream: str, resume: ResumePoint | None):
        engine_filter = EngineEchoFilter()
        boundary: datetime | None = None
        if resume is not None and stream in resume.tails:
            boundary = self._catch_up(container, stream, resume, engine_filter)
        chunks = container.logs(
            stdout=stream == "stdout",
            stderr=stream == "stderr",
            stream=True,
            follow=True,
            timestamps=True,
            since=boundary.timestamp() if boundary else None,
        )
        pending = b""
        for chunk in chunks:
            if self._stopped.is_set():
                return
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = parse_docker_line(raw, stream)
                if boundary is None or line.timestamp > boundary:
                    self.add(line, engine_filter)
        if pending.strip():
            self.add(parse_docker_line(pending, stream), engine_filter)

    def _catch_up(
        self, container: Container, stream: str, resume: ResumePoint, engine_filter: EngineEchoFilter
    ) -> datetime:
        """Re-read the recent output up to now, ship what comes after the shipped tail; return
        the boundary from which to follow."""
        tail, newest = resume.tails[stream], resume.newest[stream]
        until = datetime.now(UTC)
        raw = container.logs(
            stdout=stream == "stdout",
            stderr=stream == "stderr",
            timestamps=True,
            since=(newest - RESUME_WINDOW).timestamp(),
            until=until.timestamp(),
        )
        lines = [parse_docker_line(r, stream) for r in raw.split(b"\n") if r.strip()]
        shippable = [line for line in lines if not self._shipped_by_engine(line, engine_filter)]
        start = first_unshipped([_clip(line.text) for line in shippable], tail)
        if start is None:  # the tail is not in the window: go by time
            start = next((i for i, line in enumerate(shippable) if line.timestamp > newest),
                         len(shippable))
        for line in shippable[start:]:
            self.add(line)
        return until

    def _shipped_by_engine(self, line: OutputLine, engine_filter: EngineEchoFilter) -> bool:
        return (
            self.skip_engine_records
            and line.stream == "stderr"
            and engine_filter.shipped_by_engine(line)
        )

    def add(self, line: OutputLine, engine_filter: EngineEchoFilter | None = None) -> None:
        if self.echo:
            self.echo(self.mask(line.text))
        if engine_filter is not None and self._shipped_by_engine(line, engine_filter):
            return
        text = self.mask(_clip(line.text))
        size = len(text.encode("utf-8", errors="replace")) + 1
        with self._lock:
            if self.bytes + size > self.max_bytes:
                self.left_out_lines += 1
                self.left_out_bytes += size
                return
            self.lines += 1
            self.bytes += size
            # Strictly increasing per run, so the server's order is the container's order.
            stamp = line.timestamp
            if self._last is not None and stamp <= self._last:
                stamp = self._last + _ONE_MICROSECOND
            self._last = stamp
        self.shipper.submit(
            {
                "name": STDOUT_LOGGER if line.stream == "stdout" else STDERR_LOGGER,
                "level": logging.INFO if line.stream == "stdout" else logging.WARNING,
                "message": text,
                "timestamp": stamp.isoformat(),
                "flow_run_id": str(self.flow_run_id),
            },
            wait=BACKPRESSURE_SECONDS,
        )

    def close(self) -> str:
        """After the container ended: the truncation notice, if any; returns a summary."""
        if self.left_out_lines:
            self.shipper.submit(
                _notice(
                    self.flow_run_id,
                    f"dockerworker: output truncated at max_log_bytes={self.max_bytes}: "
                    f"{self.left_out_lines} more lines ({self.left_out_bytes} bytes) were "
                    "not shipped",
                )
            )
        summary = f"{self.lines} output lines ({self.bytes} bytes) queued for the server"
        if self.left_out_lines:
            summary += f", {self.left_out_lines} lines over max_log_bytes left out"
        return summary


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS] + "…"


@dataclass
class ResumePoint:
    """How far a run's output got to the server, per stream: its newest shipped messages
    (oldest first) and the newest shipped timestamp."""

    tails: dict[str, list[str]]
    newest: dict[str, datetime]


def resume_point(api: PrefectAPI, flow_run_id: UUID, depth: int = 20,
                 pages: int = 5) -> ResumePoint:
    """Read the cursor off the server: the run's newest `dockerworker.container*` logs."""
    streams = {STDOUT_LOGGER: "stdout", STDERR_LOGGER: "stderr"}
    tails: dict[str, list[str]] = {}
    newest: dict[str, datetime] = {}
    for page in range(pages):
        rows = api.read_logs_newest_first(flow_run_id, limit=200, offset=page * 200)
        for row in rows:
            stream = streams.get(row["name"])
            if stream is None or len(tails.get(stream, [])) >= depth:
                continue
            tails.setdefault(stream, []).insert(0, row["message"])
            newest.setdefault(stream, datetime.fromisoformat(row["timestamp"]))
        both_full = len(tails) == 2 and all(len(t) >= depth for t in tails.values())
        if len(rows) < 200 or both_full:
            break
    return ResumePoint(tails, newest)


def first_unshipped(texts: list[str], tail: list[str]) -> int | None:
    """Index in `texts` just past the latest place where the shipped `tail` ends: the whole
    tail, or its end where the window begins inside it. None when it is not there."""
    for end in range(len(texts), 0, -1):
        size = min(len(tail), end)
        if texts[end - size:end] == tail[len(tail) - size:] and (
            size == len(tail) or end == size
        ):
            return end
    return None
