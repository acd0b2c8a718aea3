"""What runs in a flow container by default, and how the worker talks to it.

The default command is Prefect's engine (`python -m prefect.engine`: one process, where
`prefect flow-run execute` runs two) started through a small entry script. The script does
what `prefect flow-run execute` does for cancellation: it plays the runner's side of
Prefect's control channel (`PREFECT__CONTROL_PORT`/`TOKEN`, loopback inside the container),
so a cancellation reaches the engine as a cancellation — Cancelling → Cancelled, with the
flow's on_cancellation hooks — and not as a bare SIGTERM, which Prefect reports as Crashed.
The worker asks for it by writing `cancel` to the container's stdin. With a time-out argument
the script is a warm container: it imports Prefect, then waits on stdin for the run's
identity (see warm.py). An image whose Prefect has no control channel still runs; its
cancellation is then the plain SIGTERM.
"""

from __future__ import annotations

from docker.models.containers import Container

LABEL_CONTROL = "io.dockerworker.control"  # "stdin": the container reads `cancel` there
CANCEL_LINE = "cancel"

ENTRY_SCRIPT = """\
import json, os, runpy, secrets, select, signal, socket, sys, threading, warnings
import prefect.engine, prefect.flow_engine
def read_lines():  # from the raw descriptor: a reader blocked there never stalls the exit
    pending = b""
    while True:
        while b"\\n" not in pending:
            chunk = os.read(0, 4096)
            if not chunk:
                return
            pending += chunk
        line, pending = pending.split(b"\\n", 1)
        yield line.decode().strip()
stdin = read_lines()
if len(sys.argv) > 1:  # warm: wait for a run's identity, or time out unused
    ready, _, _ = select.select([0], [], [], float(sys.argv[1]))
    line = next(stdin, "") if ready else ""
    if not line:
        sys.exit(0)
    os.environ.update(json.loads(line))
    del sys.argv[1:]
engine = []
def serve(server, token, hello):
    conn, _ = server.accept()  # the engine connects once its SIGTERM bridge is in place
    reader = conn.makefile("rb")
    if reader.readline().strip() != token.encode():
        return
    conn.settimeout(1)
    try:
        reader.read(hello)  # a version-two hello; as a version-one runner we do not answer
    except OSError:
        pass
    engine.append((conn, reader))
def cancel_on_request(intent):
    for line in stdin:
        if line == "cancel":
            break
    else:
        return
    if engine and intent:
        conn, reader = engine[0]
        try:
            conn.sendall(intent)
            conn.settimeout(2)
            reader.read(1)  # the engine acknowledges the intent before the signal
        except OSError:
            pass
    os.kill(os.getpid(), signal.SIGTERM)
intent = None
try:
    from prefect._internal.attempt_control import BYTE_FOR_INTENT, NEGOTIATION_FRAME_SIZE
    intent = BYTE_FOR_INTENT["cancel"]
    server = socket.create_server(("127.0.0.1", 0))
    token = secrets.token_hex(16)
    os.environ["PREFECT__CONTROL_PORT"] = str(server.getsockname()[1])
    os.environ["PREFECT__CONTROL_TOKEN"] = token
    threading.Thread(target=serve, args=(server, token, NEGOTIATION_FRAME_SIZE),
                     daemon=True).start()
except (ImportError, KeyError, OSError):
    pass
threading.Thread(target=cancel_on_request, args=(intent,), daemon=True).start()
warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
"""


def entry_command(wait_seconds: float | None = None) -> list[str]:
    """The default command; with `wait_seconds`, a warm container's."""
    command = ["python", "-c", ENTRY_SCRIPT]
    if wait_seconds is not None:
        command.append(str(int(wait_seconds)))
    return command


def write_line(container: Container, line: str) -> None:
    """One line to the container's stdin (it was created with stdin open)."""
    stdin = container.attach_socket(params={"stdin": 1, "stream": 1})
    try:
        getattr(stdin, "_sock", stdin).sendall(line.encode() + b"\n")
    finally:
        stdin.close()
