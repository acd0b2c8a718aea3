"""Pure logic of output shipping: the engine-echo filter, the per-run cap, ordering."""

from __future__ import annotations

import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from dockerworker.logs import (
    EngineEchoFilter,
    OutputLine,
    RunOutput,
    first_unshipped,
    parse_docker_line,
    stream_lines,
)

T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def line(text: str, ms: float = 0, stream: str = "stderr") -> OutputLine:
    return OutputLine(stream, T0 + timedelta(milliseconds=ms), text)


class ListShipper:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.progress = 0

    def submit(self, entry: dict[str, Any], wait: float = 0, abort: Any = None) -> bool:
        self.entries.append(entry)
        return True


def test_lines_are_cut_at_the_limit_and_what_follows_without_a_newline_is_dropped() -> None:
    """A container printing megabytes without a newline must not make the worker hold them
    (found by an audit: 6.4 MB held with max_log_bytes 1024); lines split across chunks are
    joined, the unterminated rest comes last."""
    chunks = [b"ab", b"c\nde", b"f\n", b"x" * 10, b"y" * 10**6, b"z\nnext", b"\nlast"]
    lines = list(stream_lines(iter(chunks), limit=8))
    assert lines == [b"abc", b"def", b"x" * 8, b"next", b"last"]

    held = []

    def endless():  # 100 MB of one line, a chunk at a time
        for _ in range(100):
            yield b"y" * 10**6
            held.append(1)

    tracemalloc.start()
    try:
        assert [len(line) for line in stream_lines(endless(), limit=64)] == [64]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(held) == 100 and peak < 5 * 10**6  # a chunk or two, never the line


def test_docker_line_with_nanosecond_timestamp() -> None:
    parsed = parse_docker_line(b"2026-11-29T15:30:38.403123456Z hello world\r", "stdout")
    assert parsed.text == "hello world" and parsed.stream == "stdout"
    assert parsed.timestamp == datetime(2026, 11, 29, 15, 30, 38, 403123, tzinfo=UTC)


def test_engine_records_and_their_tracebacks_are_recognised() -> None:
    f = EngineEchoFilter()
    assert f.shipped_by_engine(line("12:00:00.000 | INFO    | Flow run 'x' - line one"))
    assert f.shipped_by_engine(line("12:00:00.001 | ERROR   | Task run 'y-0' - boom", 1))
    assert f.shipped_by_engine(line("Traceback (most recent call last):", 2))
    assert f.shipped_by_engine(line("ValueError: intended failure", 3))
    # another logger's record is not shipped by the engine, nor what follows it
    assert not f.shipped_by_engine(line("12:00:00.010 | ERROR   | prefect.runner - died", 10))
    assert not f.shipped_by_engine(line("Traceback (most recent call last):", 11))


def test_stderr_long_after_an_engine_record_is_not_its_continuation() -> None:
    f = EngineEchoFilter()
    assert f.shipped_by_engine(line("12:00:00.000 | INFO    | Flow run 'x' - hi"))
    assert not f.shipped_by_engine(line("a warning printed much later", 5000))


def test_per_run_cap_then_one_notice() -> None:
    shipper = ListShipper()
    output = RunOutput(shipper, uuid.uuid4(), max_bytes=20)  # type: ignore[arg-type]
    for i in range(5):
        output.add(line(f"line {i}", i, "stdout"))  # 7 bytes each with the newline
    assert [e["message"] for e in shipper.entries] == ["line 0", "line 1"]
    summary = output.close()
    assert "3 lines over max_log_bytes" in summary
    assert "3 more lines (21 bytes)" in shipper.entries[-1]["message"]


def test_timestamps_strictly_increase_and_streams_are_told_apart() -> None:
    shipper = ListShipper()
    output = RunOutput(shipper, uuid.uuid4(), max_bytes=10_000)  # type: ignore[arg-type]
    output.add(line("a", 0, "stdout"))
    output.add(line("b", 0, "stdout"))
    output.add(line("c", 0, "stderr"), EngineEchoFilter())
    stamps = [e["timestamp"] for e in shipper.entries]
    assert stamps == sorted(set(stamps))
    assert [(e["name"], e["level"]) for e in shipper.entries] == [
        ("dockerworker.container", 20),
        ("dockerworker.container", 20),
        ("dockerworker.container.stderr", 30),
    ]


def test_engine_lines_are_echoed_but_not_shipped() -> None:
    shipper, echoed = ListShipper(), []
    output = RunOutput(shipper, uuid.uuid4(), 10_000, echo=echoed.append)  # type: ignore[arg-type]
    output.add(line("12:00:00.000 | INFO    | Flow run 'x' - hi"), EngineEchoFilter())
    assert echoed == ["12:00:00.000 | INFO    | Flow run 'x' - hi"]
    assert shipper.entries == []


def test_first_unshipped_finds_the_end_of_the_shipped_tail() -> None:
    texts = ["a", "b", "c", "d", "e"]
    assert first_unshipped(texts, ["b", "c"]) == 3
    assert first_unshipped(texts, ["x", "y", "a", "b"]) == 2  # the window begins inside the tail
    assert first_unshipped(texts, ["e"]) == 5
    assert first_unshipped(texts, ["q"]) is None
    # repeated lines: the latest full match wins
    assert first_unshipped(["t", "t", "u", "t", "t", "v"], ["t", "t"]) == 5
