"""LogShipper over the fake API: batches, backpressure, drops counted and reported, poison
lines found and cleaned or dropped, resuming."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from dockerworker.api import PrefectAPIError, ServerUnreachable, StateType
from dockerworker.logs import (
    STDERR_LOGGER,
    STDOUT_LOGGER,
    LogShipper,
    OutputLine,
    RunOutput,
    clean_text,
    log_entry,
    resume_point,
)

from .fakes import FakeAPI, FakeRuntime, Script, make_worker, settle, wait_until

RUN = uuid.uuid4()


def test_entries_go_in_batches_of_the_configured_size() -> None:
    api = FakeAPI()
    sizes: list[int] = []
    original = api.send_logs
    api.send_logs = lambda logs, patience=None: (sizes.append(len(logs)), original(logs))
    shipper = LogShipper(api, batch_entries=10, interval=0.01)  # type: ignore[arg-type]
    for i in range(25):
        shipper.submit(log_entry(RUN, f"line {i}"))
    shipper.start()
    assert shipper.flush(5)
    shipper.stop(1)
    assert sum(sizes) == 25 and max(sizes) <= 10
    assert api.messages(RUN) == [f"line {i}" for i in range(25)]  # in order


def test_a_full_buffer_drops_and_reports_it_once_room_comes_back() -> None:
    api = FakeAPI()
    shipper = LogShipper(api, max_buffer_bytes=3 * 600, interval=0.01)  # type: ignore[arg-type]
    kept = [shipper.submit(log_entry(RUN, f"line {i}")) for i in range(5)]
    assert kept == [True, True, True, False, False]
    assert shipper.stats.dropped == 2
    shipper.start()
    assert shipper.flush(5)
    shipper.stop(1)
    messages = api.messages(RUN)
    assert messages[0].startswith("dockerworker: 2 output lines of this run were dropped")
    assert messages[1:] == ["line 0", "line 1", "line 2"]


def test_a_follower_waits_for_room_instead_of_dropping() -> None:
    api = FakeAPI()
    shipper = LogShipper(api, max_buffer_bytes=2 * 600, interval=0.01)  # type: ignore[arg-type]
    output = RunOutput(shipper, RUN, max_bytes=10**6)
    now = datetime.now(UTC)
    done = threading.Event()

    def follow() -> None:
        for i in range(6):
            output.add(OutputLine("stdout", now + timedelta(milliseconds=i), f"out {i}"))
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    assert not done.wait(0.1)  # blocked on backpressure, not dropping
    shipper.start()
    wait_until(done.is_set)
    assert shipper.flush(5)
    shipper.stop(1)
    assert shipper.stats.dropped == 0
    assert api.messages(RUN) == [f"out {i}" for i in range(6)]


def test_the_resume_point_is_read_off_the_server() -> None:
    api = FakeAPI()
    now = datetime.now(UTC)
    api.send_logs([{"name": STDOUT_LOGGER, "level": 20, "message": f"m{i}",
                    "timestamp": (now + timedelta(seconds=i)).isoformat(),
                    "flow_run_id": str(RUN)} for i in range(30)])
    point = resume_point(api, RUN, depth=5)  # type: ignore[arg-type]
    assert point.tails == {"stdout": ["m25", "m26", "m27", "m28", "m29"]}
    assert point.newest["stdout"] == now + timedelta(seconds=29)


# --- a server that refuses some content ---------------------------------------------------
class RefusingAPI(FakeAPI):
    """Encodes each request as httpx does (so a lone surrogate fails here, as it would
    there), and answers batches holding `poison` with `status`, like PostgreSQL's refusal
    of NUL seen through Prefect. `down` refuses everything (a broken database)."""

    def __init__(self, poison: str = "\x00", status: int = 500) -> None:
        super().__init__()
        self.poison = poison
        self.status = status
        self.down = False
        self.requests: list[int] = []  # batch sizes, in order

    def send_logs(self, logs: list[dict[str, Any]], patience: float | None = None) -> None:
        self.requests.append(len(logs))
        json.dumps(logs, ensure_ascii=False, allow_nan=False).encode("utf-8")
        if self.down or any(self.poison in entry["message"] for entry in logs):
            error = ServerUnreachable if self.status >= 500 else PrefectAPIError
            raise error(f"HTTP {self.status}: refused", self.status)
        super().send_logs(logs)


def _ship(api: FakeAPI, entries: list[dict[str, Any]], **options: Any) -> LogShipper:
    shipper = LogShipper(api, interval=0.01, max_backoff=0.01, **options)  # type: ignore[arg-type]
    for entry in entries:
        shipper.submit(entry)
    shipper.start()
    assert shipper.flush(5)
    shipper.stop(1)
    return shipper


def test_a_poison_line_is_found_and_cleaned_and_the_other_runs_output_flows() -> None:
    api = RefusingAPI()
    other = uuid.uuid4()
    entries = []
    for i in range(40):
        entries.append(log_entry(RUN, f"a{i}" if i != 17 else "a\x0017"))
        entries.append(log_entry(other, f"b{i}"))
    shipper = _ship(api, entries)
    assert api.messages(other) == [f"b{i}" for i in range(40)]
    assert api.messages(RUN) == [f"a{i}" if i != 17 else "a\ufffd17" for i in range(40)]
    assert shipper.stats.cleaned == 1 and shipper.stats.failures == 0
    assert len(api.requests) < 20  # found by halving, not line by line


def test_a_line_refused_even_cleaned_is_dropped_with_a_notice() -> None:
    api = RefusingAPI(poison="forbidden", status=422)
    shipper = _ship(api, [log_entry(RUN, t) for t in ("one", "a forbidden word", "three")])
    messages = api.messages(RUN)
    assert messages[0] == "one" and messages[-1] == "three"
    assert len(messages) == 3 and "refused an output line of this run" in messages[1]
    assert "forbidden" not in messages[1]  # the reason echoed it: the plain notice went
    assert shipper.stats.refused == 1


def test_a_passing_server_error_costs_no_line() -> None:
    api = RefusingAPI()
    blips = iter([True] * 4)  # l3 fails in 8, 4, 2 lines, and alone: then the error is gone
    original = api.send_logs

    def blip(logs: list[dict[str, Any]], patience: float | None = None) -> None:
        if any(e["message"] == "l3" for e in logs) and next(blips, False):
            raise ServerUnreachable("HTTP 500: deadlock detected", 500)
        original(logs)

    api.send_logs = blip  # type: ignore[method-assign]
    shipper = _ship(api, [log_entry(RUN, f"l{i}") for i in range(8)])
    assert api.messages(RUN) == [f"l{i}" for i in range(8)]
    assert shipper.stats.refused == 0


def test_a_lone_surrogate_that_cannot_be_encoded_is_cleaned() -> None:
    api = RefusingAPI(poison="never")
    shipper = _ship(api, [log_entry(RUN, "x\udcff"), log_entry(RUN, "y")])
    assert api.messages(RUN) == ["x\ufffd", "y"]
    assert shipper.stats.cleaned == 1


def test_a_server_that_refuses_everything_loses_nothing_it_is_waited_for() -> None:
    api = RefusingAPI()
    api.down = True
    shipper = LogShipper(api, interval=0.01, max_backoff=0.01)  # type: ignore[arg-type]
    for i in range(5):
        shipper.submit(log_entry(RUN, f"line {i}"))
    shipper.start()
    wait_until(lambda: shipper.stats.failures >= 3)  # the probe notice is refused too
    api.down = False
    assert shipper.flush(5)
    shipper.stop(1)
    assert api.messages(RUN) == [f"line {i}" for i in range(5)]
    assert shipper.stats.refused == 0


def test_an_unreachable_server_gets_the_same_batch_again() -> None:
    api = RefusingAPI(poison="never")
    calls = {"n": 0}
    original = api.send_logs

    def flaky(logs: list[dict[str, Any]], patience: float | None = None) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ServerUnreachable("cannot reach the Prefect server")  # no answer at all
        original(logs)

    api.send_logs = flaky  # type: ignore[method-assign]
    shipper = _ship(api, [log_entry(RUN, f"l{i}") for i in range(6)])
    assert api.requests == [6]  # not split: the content was not the problem
    assert shipper.stats.failures == 2
    assert api.messages(RUN) == [f"l{i}" for i in range(6)]


# --- backpressure is bounded per run, not per line ----------------------------------------
def test_a_stuck_shipper_costs_a_run_its_budget_once_not_per_line() -> None:
    api = FakeAPI()
    shipper = LogShipper(api, max_buffer_bytes=2 * 600, interval=0.01)  # type: ignore[arg-type]
    output = RunOutput(shipper, RUN, max_bytes=10**6, backpressure=0.2)
    now = datetime.now(UTC)
    began = time.monotonic()
    for i in range(12):  # per line, 10 of them would wait 0.2 s each
        output.add(OutputLine("stdout", now + timedelta(milliseconds=i), f"out {i}"))
    assert time.monotonic() - began < 1.2
    assert shipper.stats.dropped == 10
    shipper.start()  # the shipper moves again: lines wait for room again, none dropped
    wait_until(lambda: shipper.progress > 0)
    for i in range(12, 20):
        output.add(OutputLine("stdout", now + timedelta(milliseconds=i), f"out {i}"))
    assert shipper.flush(5)
    shipper.stop(1)
    assert shipper.stats.dropped == 10
    messages = api.messages(RUN)
    assert "dockerworker: 10 output lines of this run were dropped" in messages[0]
    assert messages[1:] == ["out 0", "out 1"] + [f"out {i}" for i in range(12, 20)]


# --- the resume point ----------------------------------------------------------------------
def _rows(run: uuid.UUID, name: str, texts: list[str], start: datetime) -> list[dict[str, Any]]:
    return [{"name": name, "level": 20, "message": text, "flow_run_id": str(run),
             "timestamp": (start + timedelta(milliseconds=i)).isoformat()}
            for i, text in enumerate(texts)]


def test_the_resume_point_is_exact_however_many_lines_were_shipped() -> None:
    api = FakeAPI()
    now = datetime.now(UTC)
    api.send_logs(_rows(RUN, STDERR_LOGGER, [f"e{i}" for i in range(3)], now))
    api.send_logs(_rows(RUN, STDOUT_LOGGER, [f"o{i}" for i in range(1500)],
                        now + timedelta(seconds=1)))
    api.send_logs(_rows(RUN, "prefect.flow_runs", [f"p{i}" for i in range(1200)],
                        now + timedelta(seconds=5)))
    point = resume_point(api, RUN, depth=250)  # type: ignore[arg-type]
    assert point.tails["stdout"] == [f"o{i}" for i in range(1250, 1500)]  # two pages
    assert point.tails["stderr"] == ["e0", "e1", "e2"]
    assert point.newest["stderr"] == now + timedelta(milliseconds=2)
    assert point.newest["stdout"] == now + timedelta(seconds=1, milliseconds=1499)


def test_a_server_without_text_search_has_every_log_read_until_both_tails_are_found() -> None:
    api = FakeAPI()
    now = datetime.now(UTC)
    api.send_logs(_rows(RUN, STDERR_LOGGER, ["e0", "e1"], now))
    api.send_logs(_rows(RUN, STDOUT_LOGGER, [f"o{i}" for i in range(1100)],
                        now + timedelta(seconds=1)))
    api.fail["read_logs_newest_first"] = PrefectAPIError("HTTP 422: extra_forbidden", 422)
    point = resume_point(api, RUN, depth=5)  # type: ignore[arg-type]
    assert point.tails == {"stdout": [f"o{i}" for i in range(1095, 1100)],
                           "stderr": ["e0", "e1"]}


class StubContainer:
    """`container.logs()` over fixed lines, as Docker answers it (timestamps=True)."""

    def __init__(self, lines: list[tuple[datetime, str]]) -> None:
        self.raw = b"".join(f"{t.isoformat().replace('+00:00', 'Z')} {x}\n".encode()
                            for t, x in lines)

    def logs(self, stdout: bool, stderr: bool, timestamps: bool, stream: bool = False,
             follow: bool = False, since: float | None = None, until: float | None = None):
        if stderr:
            return iter(()) if stream else b""
        return iter(()) if stream else self.raw


def test_resuming_in_repeated_lines_continues_right_after_the_shipped_ones() -> None:
    api = FakeAPI()
    now = datetime.now(UTC) - timedelta(seconds=1)
    printed = [(now + timedelta(milliseconds=i), "tick") for i in range(30)]
    shipper = LogShipper(api, interval=0.01).start()  # type: ignore[arg-type]
    first = RunOutput(shipper, RUN, max_bytes=10**6)
    for stamp, text in printed[:20]:
        first.add(OutputLine("stdout", stamp, text))
    assert shipper.flush(5)
    point = resume_point(api, RUN)  # type: ignore[arg-type]
    RunOutput(shipper, RUN, max_bytes=10**6).follow(StubContainer(printed), point)  # type: ignore[arg-type]
    assert shipper.flush(5)
    shipper.stop(1)
    assert api.messages(RUN) == ["tick"] * 30  # not 20 (a gap), not 40 (duplicates)


def test_resuming_after_a_cleaned_line_finds_it() -> None:
    api = FakeAPI()
    now = datetime.now(UTC) - timedelta(seconds=1)
    printed = [(now + timedelta(milliseconds=i), f"l{i}") for i in range(10)]
    printed[4] = (printed[4][0], "nul\x00here")
    shipped = [clean_text(text) for _, text in printed[:5]]  # as the server kept them
    api.send_logs(_rows(RUN, STDOUT_LOGGER, shipped, now))
    shipper = LogShipper(api, interval=0.01).start()  # type: ignore[arg-type]
    point = resume_point(api, RUN)  # type: ignore[arg-type]
    RunOutput(shipper, RUN, max_bytes=10**6).follow(StubContainer(printed), point)  # type: ignore[arg-type]
    assert shipper.flush(5)
    shipper.stop(1)
    assert api.messages(RUN) == shipped + [f"l{i}" for i in range(5, 10)]


def test_a_stopped_follower_stops_waiting_and_leaves_the_line_for_the_next_one() -> None:
    api = FakeAPI()
    shipper = LogShipper(api, max_buffer_bytes=600, interval=0.01)  # type: ignore[arg-type]
    output = RunOutput(shipper, RUN, max_bytes=10**6)  # a minute's budget
    now = datetime.now(UTC)
    output.add(OutputLine("stdout", now, "fits"))
    waiting = threading.Thread(
        target=output.add, args=(OutputLine("stdout", now + timedelta(milliseconds=1), "w"),))
    waiting.start()
    output.stop()  # the worker is leaving
    waiting.join(2)
    assert not waiting.is_alive()
    assert shipper.stats.dropped == 0  # not "dropped": the next follower ships it


def test_a_run_printing_a_nul_holds_up_neither_its_verdict_nor_another_run_s_output() -> None:
    api = RefusingAPI()
    runtime = FakeRuntime(api)
    poisoned, other = api.add_run("poisoned"), api.add_run("other")
    printed = {str(poisoned.id): ["p1", "p\x002", "p3"],
               str(other.id): [f"o{i}" for i in range(50)]}
    runtime.script_for = lambda spec: Script(lines=[
        ("stdout", text)
        for text in printed[spec.create_kwargs["environment"]["PREFECT__FLOW_RUN_ID"]]
    ])
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)  # both verdicts given, both slots free
    assert worker.shipper.flush(5)

    def shipped(run_id: uuid.UUID) -> list[str]:
        return [e["message"] for e in api.logs
                if e["flow_run_id"] == str(run_id) and e["name"] == STDOUT_LOGGER]

    assert shipped(other.id) == printed[str(other.id)]
    assert shipped(poisoned.id) == ["p1", "p\ufffd2", "p3"]
    assert api.state_of(poisoned.id).type == api.state_of(other.id).type == StateType.COMPLETED
