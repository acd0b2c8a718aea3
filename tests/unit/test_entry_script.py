"""The entry script's logic (stdin lines, the warm wait, the control channel), and the script
run as the container runs it (`python -c`) against a stand-in `prefect` package."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockerworker import entry_script
from dockerworker.entry import ENTRY_SCRIPT, READY_LINE, entry_command


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def test_the_shipped_script_is_the_module_file() -> None:
    assert ENTRY_SCRIPT == Path(entry_script.__file__).read_text(encoding="utf-8")
    assert entry_command() == ["python", "-c", ENTRY_SCRIPT]
    assert entry_command(wait_seconds=42.7) == ["python", "-c", ENTRY_SCRIPT, "42"]


def test_the_script_never_imports_dockerworker() -> None:
    assert "dockerworker" not in "".join(
        line for line in ENTRY_SCRIPT.splitlines() if line.lstrip().startswith(("import", "from"))
    )


def test_lines_are_read_across_chunks_and_end_at_eof(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"first\nsec")
    os.write(write_fd, b"ond  \n\nunfinished")
    os.close(write_fd)
    assert list(entry_script.read_lines(read_fd)) == ["first", "second", ""]  # no partial line


def test_a_warm_wait_returns_the_runs_environment(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, json.dumps({"PREFECT__FLOW_RUN_ID": "abc"}).encode() + b"\ncancel\n")
    lines = entry_script.read_lines(read_fd)
    assert entry_script.wait_for_identity(lines, read_fd, 5) == {"PREFECT__FLOW_RUN_ID": "abc"}
    assert next(lines) == "cancel"  # the rest stays for the cancel watcher


def test_a_warm_wait_times_out_unused(pipe: tuple[int, int]) -> None:
    read_fd, _ = pipe
    lines = entry_script.read_lines(read_fd)
    assert entry_script.wait_for_identity(lines, read_fd, 0.05) is None


def test_a_warm_wait_ends_when_stdin_closes(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.close(write_fd)
    lines = entry_script.read_lines(read_fd)
    assert entry_script.wait_for_identity(lines, read_fd, 5) is None


def _serve_one(token_sent: bytes) -> list:
    server = socket.create_server(("127.0.0.1", 0))
    engine: list = []
    thread = threading.Thread(target=entry_script.serve, args=(server, "t0ken", 4, engine))
    thread.start()
    client = socket.create_connection(server.getsockname())
    client.sendall(token_sent + b"\nHELO")
    thread.join(5)
    client.close()
    server.close()
    return engine


def test_the_engine_is_kept_only_with_the_token() -> None:
    assert len(_serve_one(b"t0ken")) == 1
    assert _serve_one(b"wrong") == []


def test_cancel_tells_the_engine_then_terminates() -> None:
    ours, theirs = socket.socketpair()
    engine = [(ours, ours.makefile("rb"))]
    terminated = []

    def engine_side() -> None:
        assert theirs.recv(1) == b"C"
        theirs.sendall(b"k")  # the acknowledgement

    peer = threading.Thread(target=engine_side)
    peer.start()
    entry_script.cancel_on_request(iter(["noise", "cancel"]), engine, b"C",
                                   lambda: terminated.append(True))
    peer.join(5)
    assert terminated == [True]
    ours.close()
    theirs.close()


def test_cancel_without_a_control_channel_is_a_plain_sigterm() -> None:
    terminated = []
    entry_script.cancel_on_request(iter(["cancel"]), [], None, lambda: terminated.append(True))
    assert terminated == [True]


def test_stdin_closing_without_cancel_terminates_nothing() -> None:
    terminated = []
    entry_script.cancel_on_request(iter(["noise"]), [], b"C", lambda: terminated.append(True))
    assert terminated == []


# --- the script itself, against a stand-in `prefect` -------------------------------------
FAKE_ENGINE = """\
import gc, os, socket, sys, threading, time
print("run", os.environ.get("RUN_ID"), flush=True)
if os.environ.get("SHOW_GC"):
    print("engine: collector", gc.isenabled(), "frozen", gc.get_freeze_count() > 0, flush=True)
port = os.environ.get("PREFECT__CONTROL_PORT")
if port and os.environ.get("CONNECT"):
    conn = socket.create_connection(("127.0.0.1", int(port)))
    conn.sendall(os.environ["PREFECT__CONTROL_TOKEN"].encode() + b"\\n")
    # In this process: the script's serve() thread ends once it holds the connection.
    deadline = time.monotonic() + 10
    while any(t.name.endswith("(serve)") for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    print("connected", flush=True)
    print("intent", conn.recv(1), flush=True)
    conn.sendall(b"k")
    time.sleep(30)
"""


@pytest.fixture
def fake_prefect(tmp_path: Path) -> dict[str, str]:
    """A `prefect` package with just what the script touches; the env to run the script."""
    package = tmp_path / "prefect"
    (package / "_internal").mkdir(parents=True)
    (package / "__init__.py").write_text(  # how it was imported
        "import gc, os\nif os.environ.get('SHOW_GC'):\n"
        "    print('import: collector', gc.isenabled(), flush=True)\n")
    (package / "flow_engine.py").write_text("")
    (package / "engine.py").write_text(
        "if __name__ == '__main__':\n    exec(open(__file__ + '.main').read())\n"
    )
    (package / "engine.py.main").write_text(FAKE_ENGINE)
    (package / "_internal" / "__init__.py").write_text("")
    (package / "_internal" / "attempt_control.py").write_text(
        "BYTE_FOR_INTENT = {'cancel': b'C'}\nNEGOTIATION_FRAME_SIZE = 0\n"
    )
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}


def _script(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", ENTRY_SCRIPT, *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_warm_script_runs_the_engine_with_the_runs_identity(fake_prefect: dict) -> None:
    proc = _script(["30"], fake_prefect)
    out, err = proc.communicate(json.dumps({"RUN_ID": "r-1"}) + "\n", timeout=30)
    assert proc.returncode == 0, err
    ready, run = out.splitlines()  # it said it was ready (Prefect imported) before the run
    assert ready.startswith(READY_LINE + " (Prefect imported in ") and run == "run r-1"


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_prefect_is_imported_without_the_collector_and_frozen_for_the_engine(
    fake_prefect: dict, warm: bool
) -> None:
    """Collecting during the import frees nothing; the engine runs with the collector back on
    and the imported objects out of its way."""
    proc = _script(["30"] if warm else [], {**fake_prefect, "SHOW_GC": "1", "RUN_ID": "r"})
    out, err = proc.communicate(json.dumps({"RUN_ID": "r"}) + "\n", timeout=30)
    assert proc.returncode == 0, err
    lines = [line for line in out.splitlines() if not line.startswith(READY_LINE)]
    assert lines == ["import: collector False", "run r", "engine: collector True frozen True"]


def test_warm_script_unused_exits_without_running_the_engine(fake_prefect: dict) -> None:
    proc = _script(["0"], fake_prefect)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [line.split(" (")[0] for line in out.splitlines()] == [READY_LINE]  # no run


def test_cancel_line_reaches_the_engine_as_its_intent(fake_prefect: dict) -> None:
    proc = _script([], {**fake_prefect, "CONNECT": "1", "RUN_ID": "r-2"})
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "run r-2"
        assert proc.stdout.readline().strip() == "connected"
        proc.stdin.write("cancel\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "intent b'C'"
        assert proc.wait(30) == -15  # SIGTERM after the acknowledgement
    finally:
        proc.kill()
        proc.communicate()


def test_preload_imports_what_exists_and_skips_the_rest() -> None:
    sys.modules.pop("colorsys", None)
    done = entry_script.preload(("colorsys", "no_such_module_here", "json"))
    assert done == ["colorsys", "json"] and "colorsys" in sys.modules
