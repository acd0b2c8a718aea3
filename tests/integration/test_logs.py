"""Container output in the flow run's logs on the server (issue 3)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from testrig.prefect_rig import POOL_LABEL, PrefectRig, free_port, start_prefect_server

from dockerworker.api import PrefectAPI
from dockerworker.logs import LogShipper, RunOutput, resume_point

CONTAINER = "dockerworker.container"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding",
               "content-length", "upgrade", "host"}


def container_lines(rig: PrefectRig, run_id: str, stream: str = "") -> list[str]:
    name = CONTAINER + (f".{stream}" if stream else "")
    return [log["message"] for log in rig.read_logs(run_id) if log["name"] == name]


def wait_until_shipped(rig: PrefectRig, run_id: str, timeout: float = 60.0) -> list[str]:
    """The run's log messages once the worker's closing line for its container is among them:
    the shipper sends in order, so every output line queued before it has arrived."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [log["message"] for log in rig.read_logs(run_id)]
        if any("queued for the server" in m for m in messages):
            return messages
        assert time.monotonic() < deadline, f"the run's output was not all shipped: {messages}"
        time.sleep(0.5)


def test_log_prints_lines_appear_exactly_once(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:prints_three", {"image": flow_image})
    run_id = rig.create_flow_run(deployment)
    assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"
    messages = wait_until_shipped(rig, run_id)
    for text in ("line one", "line two", "line three"):
        assert sum(text in m for m in messages) == 1, (text, messages)


def test_import_error_reaches_logs_and_the_crash_message(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(
        unique_pool, "broken_import.py:broken", {"image": flow_image}
    )
    run_id = rig.create_flow_run(deployment)
    run = rig.wait_for_final(run_id)
    # The engine reports the crash first; the worker adds the cause once the container ends.
    deadline = time.monotonic() + 30
    while "nonexistent_pkg_xyz" not in (run["state"]["message"] or ""):
        assert time.monotonic() < deadline, run["state"]
        time.sleep(0.5)
        run = rig.read_flow_run(run_id)
    assert run["state"]["type"] in ("CRASHED", "FAILED")
    traceback_lines = [
        m for m in wait_until_shipped(rig, run_id)
        if "ModuleNotFoundError" in m and "nonexistent_pkg_xyz" in m
    ]
    assert traceback_lines


def test_non_prefect_command_both_streams_and_the_crash(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    worker = start_worker(unique_pool)
    command = "sh -c 'echo hi; echo oops >&2; exit 2'"
    deployment = rig.create_deployment(
        unique_pool, "flows.py:hello", {"image": flow_image, "command": command}
    )
    run_id = rig.create_flow_run(deployment)
    run = rig.wait_for_final(run_id)
    assert run["state"]["type"] == "CRASHED"
    assert "exited with code 2" in run["state"]["message"]
    assert "oops" in run["state"]["message"]
    wait_until_shipped(rig, run_id)
    logs = rig.read_logs(run_id)
    assert [(l["message"], l["level"]) for l in logs if l["name"] == CONTAINER] == [("hi", 20)]
    assert [(l["message"], l["level"]) for l in logs if l["name"] == CONTAINER + ".stderr"] == [
        ("oops", 30)
    ]
    assert f"{run['name']} | hi" in worker.output()  # stream_output echoes to the console


def test_fifty_thousand_lines_in_order_batched_with_bounded_memory(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    worker = start_worker(unique_pool)
    command = "python3 -c 'for i in range(50000): print(f\"line {i}\")'"
    deployment = rig.create_deployment(
        unique_pool,
        "flows.py:hello",
        {"image": flow_image, "command": command, "stream_output": False},
    )
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_final(run_id, timeout=180)
    # Until the worker's closing line is stored: it is sent after every output line. Only the
    # logs past the 50,000th are read (the server stores about 1,500 lines a second).
    deadline = time.monotonic() + 180
    while not any("queued for the server" in log["message"]
                  for log in rig.read_logs_page(run_id, offset=50_000)):
        assert time.monotonic() < deadline, "the 50,000 lines were not all shipped in time"
        time.sleep(2)
    peak_rss_kb = _peak_rss_kb(worker.process.pid)
    worker.stop()
    lines = container_lines(rig, run_id)
    assert lines == [f"line {i}" for i in range(50000)]
    requests = int(re.search(r"entries sent in (\d+) requests", worker.output()).group(1))
    assert requests < 500, requests
    print(f"50,000 lines: {requests} requests, worker peak RSS {peak_rss_kb / 1024:.0f} MiB")
    assert peak_rss_kb < 150 * 1024


def test_lines_over_the_cap_are_left_out_with_a_notice(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    command = "python3 -c 'for i in range(1000): print(f\"line {i:04}\")'"  # 10 bytes a line
    deployment = rig.create_deployment(
        unique_pool,
        "flows.py:hello",
        {"image": flow_image, "command": command, "max_log_bytes": 1000},
    )
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_final(run_id)
    messages = wait_until_shipped(rig, run_id)
    assert [m for m in messages if m.startswith("line ")] == [f"line {i:04}" for i in range(100)]
    assert any("truncated at max_log_bytes=1000: 900 more lines" in m for m in messages)


def test_server_down_for_ten_seconds_loses_no_line(
    start_worker, unique_pool: str, flow_image: str, tmp_path: Path
) -> None:
    port, home = free_port(), tmp_path / "home"
    server = start_prefect_server(port=port, home=home)
    try:
        worker = start_worker(unique_pool, api_url=server.url)
        rig = PrefectRig(server.url)
        command = "sh -c 'for i in $(seq 1 60); do echo tick $i; sleep 0.5; done'"
        deployment = rig.create_deployment(
            unique_pool, "flows.py:hello", {"image": flow_image, "command": command}
        )
        run_id = rig.create_flow_run(deployment)
        deadline = time.monotonic() + 60
        while "tick 3" not in container_lines(rig, run_id):
            assert time.monotonic() < deadline, "no output arrived"
            time.sleep(0.5)
        rig.close()
        server.stop()
        time.sleep(10)
        server = start_prefect_server(port=port, home=home)
        rig = PrefectRig(server.url)
        rig.wait_for_final(run_id, timeout=120)
        wait_until_shipped(rig, run_id)
        assert container_lines(rig, run_id) == [f"tick {i}" for i in range(1, 61)]
        rig.close()
        worker.stop()  # while the server can still take its last log lines
    finally:
        server.stop()


def test_shipping_resumes_where_it_stopped(
    rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str, docker_client
) -> None:
    """A second follower (as after a worker restart) reads the cursor off the server."""
    rig.create_work_pool(unique_pool)
    run_id = UUID(rig.create_orphan_flow_run(unique_pool))
    script = "for i in $(seq 1 60); do echo tick $i; echo err $i >&2; sleep 0.05; done"
    container = docker_client.containers.run(
        flow_image, ["sh", "-c", script], detach=True, labels={POOL_LABEL: unique_pool}
    )
    api = PrefectAPI(prefect_server.url)
    first = LogShipper(api).start()
    before = RunOutput(first, run_id, max_bytes=10**6)
    follower = threading.Thread(target=before.follow, args=(container,))
    follower.start()
    while before.lines < 20:
        time.sleep(0.01)
    before.stop()
    follower.join(10)
    first.stop()
    shipped = len(rig.read_logs(str(run_id)))
    assert 20 <= shipped < 120

    second = LogShipper(api).start()
    after = RunOutput(second, run_id, max_bytes=10**6)
    after.follow(container, resume=resume_point(api, run_id))
    second.stop()
    assert container_lines(rig, str(run_id)) == [f"tick {i}" for i in range(1, 61)]
    assert container_lines(rig, str(run_id), "stderr") == [f"err {i}" for i in range(1, 61)]


class PostgresLikeProxy:
    """A loopback reverse proxy in front of the server that answers 500 to a `POST /logs/`
    whose body holds a NUL (`\\u0000` in JSON), as a server on PostgreSQL does (SQLite takes
    it). Websocket upgrades are refused: the worker polls instead of using the event stream."""

    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.Client(base_url=upstream.removesuffix("/api"), timeout=30)
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.endswith("/logs/") and b"\\u0000" in body:
                    proxy.refused += 1
                    self._answer(500, b'{"detail": "invalid byte sequence for encoding UTF8"}',
                                 {"content-type": "application/json"})
                    return
                if self.headers.get("Upgrade"):
                    self._answer(501, b"no websockets here", {})
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP}
                answer = proxy.upstream.request(self.command, self.path, content=body,
                                                headers=headers)
                self._answer(answer.status_code, answer.content,
                             {k: v for k, v in answer.headers.items()
                              if k.lower() not in _HOP_BY_HOP})

            def _answer(self, status: int, content: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.upstream.close()


@pytest.fixture
def refusing_proxy(prefect_server) -> Iterator[PostgresLikeProxy]:
    proxy = PostgresLikeProxy(prefect_server.url)
    yield proxy
    proxy.close()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout:.0f} s: {what}"
        time.sleep(0.5)


def test_a_poison_line_is_cleaned_and_other_runs_output_keeps_flowing(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, refusing_proxy,
    docker_client,
) -> None:
    """Issue 14: a NUL the server refuses neither stalls the shipper nor costs other lines."""
    # The runs are not Prefect flows: they never report RUNNING, so no start slots bound them.
    worker = start_worker(unique_pool, "--max-starting", "0", api_url=refusing_proxy.url)
    poison = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image,
        "command": "sh -c 'echo a before; printf \"a nul\\000here\\n\"; echo a after; sleep 120'",
    })
    chatty = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "stream_output": False,
        "command": "sh -c 'for i in $(seq 1 3000); do echo b $i; done'",
    })
    poisoned = rig.create_flow_run(poison)
    wait_for(lambda: refusing_proxy.refused, 60, "the poison batch reached the proxy")
    second = rig.create_flow_run(chatty)
    expected = [f"b {i}" for i in range(1, 3001)]
    wait_for(lambda: container_lines(rig, second) == expected, 90, "the second run's output")
    wait_for(lambda: len(container_lines(rig, poisoned)) == 3, 30, "the poisoned run's output")
    assert container_lines(rig, poisoned) == ["a before", "a nul\ufffdhere", "a after"]
    running = docker_client.containers.list(filters={"label": f"{POOL_LABEL}={unique_pool}"})
    assert len(running) == 1  # the poisoned run is still going: nothing waited for its end
    worker.stop()
    assert "1 lines cleaned and 0 refused by the server" in worker.output()


def test_resuming_after_more_than_a_thousand_shipped_lines(
    rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str, docker_client
) -> None:
    """The cursor is exact however many lines were shipped: stderr's last line is older than
    the newest thousand, and neither stream is shipped twice."""
    rig.create_work_pool(unique_pool)
    run_id = UUID(rig.create_orphan_flow_run(unique_pool))
    script = ("for i in 1 2 3; do echo err $i >&2; done; "
              "for i in $(seq 1 3000); do echo tick $i; "
              "if [ $((i % 100)) = 0 ]; then sleep 0.1; fi; done")
    container = docker_client.containers.run(
        flow_image, ["sh", "-c", script], detach=True, labels={POOL_LABEL: unique_pool}
    )
    api = PrefectAPI(prefect_server.url)
    first = LogShipper(api).start()
    before = RunOutput(first, run_id, max_bytes=10**6)
    follower = threading.Thread(target=before.follow, args=(container,))
    follower.start()
    wait_for(lambda: before.lines >= 1300, 60, "1,300 lines followed")
    before.stop()
    follower.join(30)
    first.stop()
    shipped = len(container_lines(rig, str(run_id)))
    assert 1200 <= shipped < 3000, shipped

    second = LogShipper(api).start()
    after = RunOutput(second, run_id, max_bytes=10**6)
    after.follow(container, resume=resume_point(api, run_id))
    second.stop()
    assert container_lines(rig, str(run_id)) == [f"tick {i}" for i in range(1, 3001)]
    assert container_lines(rig, str(run_id), "stderr") == ["err 1", "err 2", "err 3"]


def _peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
