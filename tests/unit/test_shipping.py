"""LogShipper over the fake API: batches, backpressure, drops counted and reported, resuming."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

from dockerworker.logs import (
    STDOUT_LOGGER,
    LogShipper,
    OutputLine,
    RunOutput,
    log_entry,
    resume_point,
)

from .fakes import FakeAPI, wait_until

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
