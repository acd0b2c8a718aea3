"""Every flow container's output, in the flow run's logs on the server: once, in order, bounded.

Two pieces:
- `RunOutput` follows one container's stdout and stderr (with Docker's timestamps), drops what
  Prefect's engine already shipped itself, applies the per-run cap (`max_log_bytes`), echoes
  to the worker's console (`stream_output`) and hands log entries to the shipper.
- `LogShipper`, one per worker, sends entries in batches (by count, size and a short interval)
  to `POST /logs/`, retrying with backoff while the server is away. A batch the server answers
  with an error is split in halves until the lines it refuses are found; each is cleaned (NUL,
  lone surrogates) and sent again, or dropped with a notice in its run's logs, so one poison
  line never holds up the output of every run. Its buffer is bounded: when it is full,
  followers stop reading (the output waits in Docker's log), each run for at most a minute
  while the shipper makes no progress; what still does not fit is dropped, counted and
  reported in a notice. A run never blocks.

What the engine already shipped: inside the container, Prefect's engine sends the records of
its flow-run and task-run loggers to the API and also prints them to stderr as
`HH:MM:SS.mmm | LEVEL   | Flow run 'name' - message` (or `Task run`), a traceback following on
the next lines. Those lines, and their continuation lines written in the same burst, are not
shipped again; everything else (plain prints, tracebacks before the engine runs, output of a
non-Prefect command, the engine's own supervisor lines) is shipped exactly once. A job that
sets `PREFECT_LOGGING_TO_API_ENABLED=false` gets every line shipped.

Resuming after a worker restart: the server holds the cursor. Container lines are shipped with
their Docker timestamps, made strictly increasing per run so the server's order is the
container's order; the newest `dockerworker.container` and `dockerworker.container.stderr`
logs of a run (each stream read on its own, so however many lines were shipped) say how far
shipping got.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from docker.models.containers import Container

from . import metrics
from .api import PrefectAPI, PrefectAPIError

log = logging.getLogger(__name__)

STDOUT_LOGGER = "dockerworker.container"
STDERR_LOGGER = "dockerworker.container.stderr"
NOTICE_LOGGER = "dockerworker"
MAX_LINE_CHARS = 64 * 1024
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS + 64  # a line's UTF-8 and its timestamp, at most
ENTRY_OVERHEAD = 512  # what one buffered entry costs in memory beyond its text, roughly
BACKPRESSURE_SECONDS = 60.0  # a run's wait for room while the shipper is stuck, then drops
# Answers that say "not now" rather than "not this": the batch is retried as it is.
_AWAY_STATUSES = frozenset({401, 403, 408, 429, 502, 503, 504})
_SURROGATE = re.compile("[\ud800-\udfff]")

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


def stream_lines(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """The lines of a byte stream as they complete (the unterminated rest last). A line
    longer than `limit` is cut there and the rest of it dropped: output without newlines
    costs the worker `limit` bytes, not all of it (found by an audit)."""
    pending = bytearray()
    overflow = False  # the current line went past `limit`: given cut, the rest dropped
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            if not overflow:
                pending += piece
                yield bytes(pending[:limit])
            pending.clear()
            overflow = False
        if not overflow:
            pending += rest
            if len(pending) > limit:
                yield bytes(pending[:limit])
                pending.clear()
                overflow = True
    if pending and not overflow:
        yield bytes(pending)


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
    dropped: int = 0  # for want of room in the buffer
    failures: int = 0  # attempts while the server was away
    cleaned: int = 0  # lines the server refused until NUL and the like were replaced
    refused: int = 0  # lines the server refused even cleaned: dropped with a notice


class _Away(Exception):
    """No answer, or an answer that says "not now": try the same lines again later."""


class _Refused(Exception):
    """The server answered these lines with an error (or they cannot be encoded)."""


def clean_text(text: str) -> str:
    """What a database may refuse, replaced by U+FFFD: NUL (PostgreSQL's text type has no
    place for it) and lone surrogates (not encodable as UTF-8; invalid UTF-8 from a container
    is replaced when it is decoded)."""
    return _SURROGATE.sub("\ufffd", text.replace("\x00", "\ufffd"))


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
        max_backoff: float = 5.0,
    ) -> None:
        self.api = api
        self.max_buffer_bytes = max_buffer_bytes
        self.batch_entries = batch_entries
        self.batch_bytes = batch_bytes
        self.interval = interval
        self.max_backoff = max_backoff
        self.stats = ShipperStats()
        self._pending = _Pending()
        metrics.watch(metrics.SHIPPER_QUEUE, lambda: len(self._pending.entries))
        self._dropped: dict[UUID, int] = {}
        self._in_flight = 0
        self.progress = 0  # batches taken from the buffer so far: room was made
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)

    def start(self) -> LogShipper:
        self._thread.start()
        return self

    def submit(self, entry: dict[str, Any], wait: float = 0.0,
               abort: threading.Event | None = None) -> bool:
        """Queue one entry. When the buffer is full, wait up to `wait` seconds for room (the
        container's output waits in Docker meanwhile), then drop it and count it for a notice.
        `abort` (the follower stopped: a later one resumes after the last line shipped) ends
        the wait without counting the entry."""
        size = len(entry["message"]) + ENTRY_OVERHEAD
        deadline = time.monotonic() + wait
        with self._cond:
            while self._pending.bytes + size > self.max_buffer_bytes:
                if abort is not None and abort.is_set():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    run = UUID(entry["flow_run_id"])
                    self._dropped[run] = self._dropped.get(run, 0) + 1
                    self.stats.dropped += 1
                    metrics.LOG_LINES_DROPPED.inc()
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
        stats = self.stats
        log.info(
            "log shipper: %d entries sent in %d requests, %d dropped, %d failed attempts, "
            "%d lines cleaned and %d refused by the server",
            stats.entries, stats.requests, stats.dropped, stats.failures, stats.cleaned,
            stats.refused,
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
        self.progress += 1
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
        """Send one batch: while the server is away, the same lines again with backoff; lines
        it refuses are found by halving and cleaned or dropped (`_attempt`), in order."""
        todo = [batch]  # the last is next
        failures = 0
        while todo:
            segment = todo.pop()
            try:
                todo.extend(self._attempt(segment))
            except _Away as exc:
                failures += 1
                self.stats.failures += 1
                if failures in (1, 10) or failures % 50 == 0:
                    log.warning("shipping %d log lines failed (%s); retrying", len(segment), exc)
                todo.append(segment)
                pause = min(self.max_backoff, 0.5 * 2 ** min(failures - 1, 10))
                time.sleep(pause * random.uniform(0.5, 1.0))
                continue
            failures = 0

    def _attempt(self, segment: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Ship `segment`; returns what is left to ship instead: its halves when the server
        refused it (the first half last, so it goes first). Raises _Away."""
        try:
            self._post(segment)
        except _Refused as exc:
            if len(segment) > 1:
                middle = len(segment) // 2
                return [segment[middle:], segment[:middle]]
            self._salvage(segment[0], exc)
        return []

    def _salvage(self, entry: dict[str, Any], why: _Refused) -> None:
        """One line the server refused: send it cleaned (or, clean already, once more: the
        error may have passed), or drop it with a notice. The notice doubles as a probe: when
        the server refuses that too, the fault is the server's, and the line waits (_Away)
        instead of being dropped."""
        message = entry["message"]
        cleaned = clean_text(message)
        try:
            self._post([{**entry, "message": cleaned}])
            self.stats.cleaned += cleaned != message
            return
        except _Refused as exc:
            why = exc
        run = UUID(entry["flow_run_id"])
        said = (f"dockerworker: the server refused an output line of this run "
                f"({len(message)} characters, printed at {entry['timestamp']}), so it was "
                "dropped")
        for notice in (f"{said}: {clean_text(str(why))[:300]}", said):  # the reason may echo it
            try:
                self._post([_notice(run, notice)])
                break
            except _Refused as exc:
                refused = exc
        else:
            raise _Away(f"the server refuses even a plain notice: {refused}")
        self.stats.refused += 1
        metrics.LOG_LINES_DROPPED.inc()
        log.warning("the server refused an output line of flow run %s, dropped it: %s",
                    entry["flow_run_id"], why)

    def _post(self, entries: list[dict[str, Any]]) -> None:
        """One request; its failure sorted into _Away (try again) or _Refused (the content)."""
        self.stats.requests += 1
        try:
            self.api.send_logs(entries, patience=0)
        except PrefectAPIError as exc:
            metrics.LOG_POST_FAILURES.inc()
            if exc.status is None or exc.status in _AWAY_STATUSES:
                raise _Away(str(exc)) from exc
            raise _Refused(str(exc)) from exc
        except (UnicodeError, ValueError, TypeError) as exc:  # not even encodable as JSON
            metrics.LOG_POST_FAILURES.inc()
            raise _Refused(f"{exc.__class__.__name__}: {exc}") from exc
        self.stats.entries += len(entries)
        metrics.LOG_BATCHES.inc()
        metrics.LOG_LINES_SHIPPED.inc(len(entries))
        metrics.LOG_BYTES_SHIPPED.inc(sum(len(str(e.get("message", ""))) for e in entries))


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
        backpressure: float = BACKPRESSURE_SECONDS,
    ) -> None:
        """`backpressure`: how long this run's followers wait in all for room in the
        shipper's buffer while it makes no progress, before lines are dropped (counted)."""
        self.shipper = shipper
        self.backpressure = backpressure
        self._stalled = 0.0  # seconds waited in vain since the shipper last made room
        self._progress = shipper.progress
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

    def follow_polled(self, read: Callable[[str, datetime | None], bytes],
                      ended: Callable[[], bool], resume: ResumePoint | None = None,
                      interval: float = 1.0) -> None:
        """For engines whose following hangs once the workload ended (Swarm's service logs):
        `read(stream, since)` every `interval` until `ended()`, then until a read brings
        nothing new (the engine's logs may lag the end; at most 5 reads); each line is
        shipped once (by its timestamp; with `resume`, nothing up to what was shipped)."""
        filters = {stream: EngineEchoFilter() for stream in ("stdout", "stderr")}
        newest: dict[str, datetime | None] = {
            stream: resume.newest.get(stream) if resume else None for stream in filters}
        settling = 0  # reads after the end: the engine's log broker may lag the task's end
        while not self._stopped.is_set():
            done = ended()
            new = 0
            for stream, engine_filter in filters.items():
                for raw in read(stream, newest[stream]).split(b"\n"):
                    if not raw.strip():
                        continue
                    line = parse_docker_line(raw, stream)
                    if newest[stream] is None or line.timestamp > newest[stream]:
                        newest[stream] = line.timestamp
                        self.add(line, engine_filter)
                        new += 1
            if done:
                settling += 1
                if settling > 1 and (not new or settling > 5):
                    return
            self._stopped.wait(interval)

    def note(self, message: str) -> None:
        """A worker's line about the run (not the container's output) in its logs."""
        self.shipper.submit(_notice(self.flow_run_id, self.mask(message)))

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
        for raw in stream_lines(self._unless_stopped(chunks), MAX_LINE_BYTES):
            if self._stopped.is_set():  # not even the unterminated rest: its new owner's
                return
            if raw.strip():
                line = parse_docker_line(raw, stream)
                if boundary is None or line.timestamp > boundary:
                    self.add(line, engine_filter)

    def _unless_stopped(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._stopped.is_set():
                return
            yield chunk

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
        # A line is shipped stamped with its own time or just after its predecessor, never
        # earlier: lines after `newest` were not shipped; the tail ends among the others.
        by_time = next((i for i, line in enumerate(shippable) if line.timestamp > newest),
                       len(shippable))
        start = first_unshipped([clean_text(self._outgoing(line.text))
                                 for line in shippable[:by_time]],
                                [clean_text(text) for text in tail])
        for line in shippable[by_time if start is None else start:]:
            self.add(line)
        return until

    def _outgoing(self, text: str) -> str:
        """A line's text as it is shipped."""
        return self.mask(_clip(text))

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
        text = self._outgoing(line.text)
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
        self._submit({
            "name": STDOUT_LOGGER if line.stream == "stdout" else STDERR_LOGGER,
            "level": logging.INFO if line.stream == "stdout" else logging.WARNING,
            "message": text,
            "timestamp": stamp.isoformat(),
            "flow_run_id": str(self.flow_run_id),
        })

    def _submit(self, entry: dict[str, Any]) -> None:
        """Hand a line to the shipper, waiting for room only while this run's budget lasts:
        a stuck shipper costs the run `backpressure` seconds in all, not that much per line.
        Once the shipper makes room again, the budget is whole again."""
        with self._lock:
            if self.shipper.progress != self._progress:
                self._progress, self._stalled = self.shipper.progress, 0.0
            budget = max(0.0, self.backpressure - self._stalled)
        began = time.monotonic()
        kept = self.shipper.submit(entry, wait=budget, abort=self._stopped)
        with self._lock:
            self._stalled = 0.0 if kept else self._stalled + time.monotonic() - began

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


PAGE = 200  # the most rows the server sends for one read
# Prefect's text search over message and logger name, one query per stream.
_STREAM_QUERIES = ((STDOUT_LOGGER, "stdout", f"{STDOUT_LOGGER} -{STDERR_LOGGER}"),
                   (STDERR_LOGGER, "stderr", STDERR_LOGGER))


def resume_point(api: PrefectAPI, flow_run_id: UUID, depth: int = 20) -> ResumePoint:
    """Read the cursor off the server: each stream's newest shipped lines, however many lines
    the run shipped and whatever other loggers wrote since. The server's text search narrows
    the read to each stream; a server without it (422) has every log of the run read, newest
    first, until both tails are found."""
    try:
        found: dict[str, list[dict[str, Any]]] = {}
        for name, _, query in _STREAM_QUERIES:
            found.update(_newest_rows(api, flow_run_id, depth, {name}, query))
    except PrefectAPIError as exc:
        if exc.status != 422:
            raise
        found = _newest_rows(api, flow_run_id, depth, {STDOUT_LOGGER, STDERR_LOGGER}, None)
    tails: dict[str, list[str]] = {}
    newest: dict[str, datetime] = {}
    for name, stream, _ in _STREAM_QUERIES:
        if rows := found.get(name):
            tails[stream] = [row["message"] for row in reversed(rows)]
            newest[stream] = datetime.fromisoformat(rows[0]["timestamp"])
    return ResumePoint(tails, newest)


def _newest_rows(api: PrefectAPI, flow_run_id: UUID, depth: int, names: set[str],
                 text: str | None) -> dict[str, list[dict[str, Any]]]:
    """Up to `depth` newest rows of each logger in `names`, paging until all are found or
    the run's logs (matching `text`) are exhausted."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    offset = 0
    while any(len(kept) < depth for kept in rows.values()):
        page = api.read_logs_newest_first(flow_run_id, limit=PAGE, offset=offset, text=text)
        offset += len(page)
        for row in page:
            kept = rows.get(row["name"])
            if kept is not None and len(kept) < depth:
                kept.append(row)
        if len(page) < PAGE:
            break
    return rows


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
