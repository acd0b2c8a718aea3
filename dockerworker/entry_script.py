"""dockerworker's entry script: the default command of a flow container.

It is shipped as the text of `python -c` (see entry.py), so it runs with only the image's
Python and Prefect: standard library and `prefect` imports only, never `dockerworker`, and
nothing newer than the oldest Python Prefect supports. Importing it runs nothing; `main()`
runs when it is executed (`__name__ == "__main__"` under `python -c`).

It runs on Prefect 2 and 3 images alike. It plays the runner's side of Prefect's control
channel (`PREFECT__CONTROL_PORT`/`TOKEN`, loopback inside the container), so a `cancel` line
on stdin reaches the engine as a cancellation (Cancelling -> Cancelled, on_cancellation hooks)
and not as a bare SIGTERM, which Prefect 3 reports as Crashed. Engines without a control
channel (Prefect 2, older 3.x) get the SIGTERM; a 2.x engine then proposes Crashed, which the
server refuses while the run is Cancelling, and runs the flow's on_cancellation hooks. With a
time-out argument it is a warm container: it imports Prefect, then waits on stdin for the
run's identity (a JSON object of environment variables). A run given secrets gets one more
line, their values, which it writes into the tmpfs at /run/secrets (`receive_secrets`); a
Swarm job's secrets are mounted there by Swarm, and the script only checks they are there.
"""

from __future__ import annotations

import base64
import gc
import importlib
import importlib.util
import json
import logging
import os
import runpy
import secrets
import select
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import BinaryIO

CANCEL_LINE = "cancel"
SECRETS_ENV = "DOCKERWORKER_SECRETS"  # the names of the run's secrets, comma-separated
SECRETS_DIR = "/run/secrets"  # a tmpfs of the container (containers.py)
SECRETS_WAIT = 120.0  # seconds the script waits for them before giving up
# What a warm container prints once Prefect is imported: the worker hands runs to ready ones
# first (warm.py). It stays in the output, so the run's logs show its head start.
READY_LINE = "dockerworker: warm and ready"

# What Prefect 3's engine imports only once it has a run (measured on 3.9: ~0.2 s of a warm
# run's start): a warm container imports them while it waits. Each is optional: another
# Prefect version may lack one or never need it.
WARM_PRELOAD = (
    "anyio._backends._asyncio", "pydantic.v1", "prefect._internal.observers",
    "prefect._internal._observation_delivery", "rich._emoji_codes", "encodings.idna", "runpy",
)

# Set on Swarm jobs (swarmjobs.py): the engine mounted the secrets itself (Swarm's service
# secrets); there is no stdin to wait on, only files to find.
SECRETS_MOUNTED_ENV = "DOCKERWORKER_SECRETS_MOUNTED"


class Lines:
    """Stripped lines from the raw descriptor: a reader blocked there never stalls the exit
    (a buffered `sys.stdin` reader did keep a failed engine from exiting)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.pending = b""

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while b"\n" not in self.pending:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise StopIteration
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode().strip()

    def within(self, timeout: float) -> str:
        """The next line if it begins within `timeout` seconds; "" if not or at the end.
        A line already read along with an earlier one counts at once."""
        if b"\n" not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return ""
        return next(self, "")


def read_lines(fd: int = 0) -> Lines:
    return Lines(fd)


def wait_for_identity(lines: Lines, fd: int, timeout: float) -> dict[str, str] | None:
    """A warm container's wait: the run's environment from the first line on `fd`, or None
    when nothing came within `timeout` seconds (or stdin closed)."""
    line = lines.within(timeout)
    if not line:
        return None
    return json.loads(line)


def receive_secrets(lines: Lines, directory: str = SECRETS_DIR,
                    timeout: float = SECRETS_WAIT) -> None:
    """The run's secrets (SECRETS_ENV names them): one line on stdin, a JSON object of name
    to base64 value, written as files readable by this user only into `directory`, a tmpfs:
    never on a disk, in the environment or in `docker inspect`. Exits when they do not come.
    With SECRETS_MOUNTED_ENV (a Swarm job) the engine put them there already: nothing is read
    from stdin, and a missing one ends the run with its name before the engine starts."""
    names = [name for name in os.environ.pop(SECRETS_ENV, "").split(",") if name]
    mounted = os.environ.pop(SECRETS_MOUNTED_ENV, "")
    if not names:
        return
    if mounted:
        absent = [name for name in names if not os.path.isfile(os.path.join(directory, name))]
        if absent:
            sys.exit(f"dockerworker: the secrets {', '.join(absent)} are not in {directory}")
        return
    line = lines.within(timeout)
    try:
        values = json.loads(line) if line and line != CANCEL_LINE else {}
    except ValueError:
        values = {}
    missing = [name for name in names if name not in values]
    if missing:
        sys.exit(f"dockerworker: the secrets {', '.join(missing)} never arrived")
    for name in names:
        path = os.path.join(directory, name)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o400)
        with os.fdopen(descriptor, "wb") as file:
            file.write(base64.b64decode(values[name]))
    try:
        os.chmod(directory, 0o555)  # read-only from here on (as root; else the tmpfs's 1777)
    except OSError:
        pass


def serve(
    server: socket.socket, token: str, hello: int, engine: list[tuple[socket.socket, BinaryIO]]
) -> None:
    """Accept the engine's control connection (it connects once its SIGTERM bridge is in
    place) and keep it in `engine` when it proves it knows the token."""
    conn, _ = server.accept()
    reader = conn.makefile("rb")
    if reader.readline().strip() != token.encode():
        return
    conn.settimeout(1)
    try:
        reader.read(hello)  # a version-two hello; as a version-one runner we do not answer
    except OSError:
        pass
    engine.append((conn, reader))


def _terminate() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def request_cancel(
    engine: list[tuple[socket.socket, BinaryIO]],
    intent: bytes | None,
    terminate: Callable[[], None] = _terminate,
) -> None:
    """Tell the engine it is a cancellation (when it is connected and Prefect knows the
    intent), wait for its acknowledgement, then SIGTERM ourselves."""
    if engine and intent:
        conn, reader = engine[0]
        try:
            conn.sendall(intent)
            conn.settimeout(2)
            reader.read(1)  # the engine acknowledges the intent before the signal
        except OSError:
            pass
    terminate()


def cancel_on_request(
    lines: Iterator[str],
    engine: list[tuple[socket.socket, BinaryIO]],
    intent: bytes | None,
    terminate: Callable[[], None] = _terminate,
) -> None:
    """On a `cancel` line: `request_cancel`. Stdin closing without `cancel` does nothing."""
    for line in lines:
        if line == CANCEL_LINE:
            break
    else:
        return
    request_cancel(engine, intent, terminate)


def cancel_on_signal(engine: list[tuple[socket.socket, BinaryIO]], intent: bytes | None) -> None:
    """A Swarm job has no stdin: its service's stop signal, SIGUSR1, is the cancel request
    (swarmjobs.py). The handler only starts the request: it must not block the engine."""
    def handler(signum: int, frame: object) -> None:
        threading.Thread(target=request_cancel, args=(engine, intent), daemon=True).start()

    signal.signal(signal.SIGUSR1, handler)


def cancel_on_cancelling(engine: list[tuple[socket.socket, BinaryIO]], intent: bytes | None,
                         every: float) -> None:
    """A Swarm job has no stdin, and Docker 20.10 does not stop the running task of a job
    service that is removed: the script itself watches the run's state, every `every`
    seconds, and turns CANCELLING into `request_cancel`. Errors are retried: the engine
    reports what it cannot reach."""
    from prefect.client.orchestration import get_client

    run_id = os.environ["PREFECT__FLOW_RUN_ID"]
    with get_client(sync_client=True) as client:
        while True:
            time.sleep(every)
            try:
                state = client.read_flow_run(run_id).state
            except Exception:  # noqa: BLE001, S112 - the next look may succeed
                continue
            if state is not None and state.type.value == "CANCELLING":
                request_cancel(engine, intent)
                return


def refuse_a_duplicate() -> None:
    """With DOCKERWORKER_ONCE (Swarm jobs: the claim the job was made under): run the flow
    only while its run is PENDING under that claim, as the worker left it. Swarm may start a
    second task for one job (a known bug); that one finds the run RUNNING (or ended) and
    exits without running it."""
    claim = os.environ.get("DOCKERWORKER_ONCE")
    if not claim:
        return
    from prefect.client.orchestration import get_client

    run_id = os.environ["PREFECT__FLOW_RUN_ID"]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    kind = state.type.value if state is not None else "without a state"
    if kind != "PENDING" or state is None or state.message != claim:
        print(f"dockerworker: flow run {run_id} is {kind} (not PENDING under this job's claim): "
              "another task runs or ran it; this one does not run it again",
              file=sys.stderr, flush=True)
        sys.exit(0)


def open_control_channel(engine: list[tuple[socket.socket, BinaryIO]]) -> bytes | None:
    """Listen for the engine on loopback and tell it where (PREFECT__CONTROL_*); return the
    cancel intent byte, or None when this Prefect has no control channel."""
    try:
        from prefect._internal.attempt_control import BYTE_FOR_INTENT, NEGOTIATION_FRAME_SIZE

        intent = BYTE_FOR_INTENT["cancel"]
        server = socket.create_server(("127.0.0.1", 0))
    except (ImportError, KeyError, OSError):
        return None
    token = secrets.token_hex(16)
    os.environ["PREFECT__CONTROL_PORT"] = str(server.getsockname()[1])
    os.environ["PREFECT__CONTROL_TOKEN"] = token
    threading.Thread(
        target=serve, args=(server, token, NEGOTIATION_FRAME_SIZE, engine), daemon=True
    ).start()
    return intent


def missing_needs(needs: list[dict[str, str]]) -> list[str]:
    """Of what the run's pull steps need (DOCKERWORKER_PULL_NEEDS, see flowcode.py), the
    messages of what this image lacks."""
    def absent(need: dict[str, str]) -> bool:
        if need.get("command"):
            return shutil.which(need["command"]) is None
        return bool(need.get("module")) and importlib.util.find_spec(need["module"]) is None

    return [need["message"] for need in needs if absent(need)]


class GitErrors(logging.Handler):
    """Prefect 3 keeps git's own words of a failed clone ("Remote branch x not found", "Host
    key verification failed") at DEBUG and tells the run a generic hint, the same for a
    missing branch as for a missing repository. Installed on `prefect.runner.storage`, this
    prints that one DEBUG record (credentials already stripped by Prefect) to stderr, where
    the worker reads it, and passes every other record on as propagation would have."""

    def __init__(self) -> None:
        super().__init__()
        self.printed: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.getLogger("prefect").getEffectiveLevel():
            logging.getLogger("prefect.runner").handle(record)
        elif str(record.msg).startswith("git clone failed"):
            text = record.getMessage()
            if text not in self.printed:  # Prefect retries a clone; once is enough
                self.printed.add(text)
                print(text, file=sys.stderr, flush=True)

    @classmethod
    def install(cls) -> None:
        storage = logging.getLogger("prefect.runner.storage")
        storage.addHandler(cls())
        storage.setLevel(logging.DEBUG)
        storage.propagate = False


def check_pull_needs() -> None:
    """Before the engine: exit with one clear line per thing the pull steps need and the
    image lacks, where Prefect would fail later with a traceback."""
    needs = json.loads(os.environ.get("DOCKERWORKER_PULL_NEEDS") or "[]")
    missing = missing_needs(needs)
    for message in missing:
        print(message, file=sys.stderr, flush=True)
    if missing:
        sys.exit(1)
    if any(need.get("command") == "git" for need in needs):
        GitErrors.install()


def preload(modules: tuple[str, ...] = WARM_PRELOAD) -> list[str]:
    """Import what the engine would import after the hand-over; the ones imported."""
    done = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001, S112 - a head start, never a reason to fail
                continue
            done.append(module)
    return done


def main() -> None:
    """Import Prefect, (warm: wait for the run), then run Prefect's engine in this process."""
    began = time.monotonic()
    warm = len(sys.argv) > 1
    # Importing Prefect makes ~200,000 objects that live as long as the process: collecting
    # while importing frees nothing (~10 % of the import's CPU), and once frozen they are
    # left out of every later collection, the engine's included.
    gc.disable()
    # Imported before a warm wait: that is the head start a warm container gives a run.
    # Prefect 3 runs flows in prefect.flow_engine; Prefect 2 has no such module (its engine
    # is prefect.engine itself), so it is imported only where it exists.
    import prefect.engine  # noqa: F401

    if importlib.util.find_spec("prefect.flow_engine") is not None:
        importlib.import_module("prefect.flow_engine")
    if warm:
        preload()
    gc.freeze()
    gc.enable()

    stdin = read_lines()
    if warm:  # wait for a run's identity, or time out unused
        print(f"{READY_LINE} (Prefect imported in {time.monotonic() - began:.2f} s)",
              flush=True)
        identity = wait_for_identity(stdin, 0, float(sys.argv[1]))
        if identity is None:
            sys.exit(0)
        os.environ.update(identity)
        del sys.argv[1:]
    receive_secrets(stdin)
    check_pull_needs()
    refuse_a_duplicate()
    engine: list[tuple[socket.socket, BinaryIO]] = []  # the engine's connection, once made
    intent = open_control_channel(engine)
    cancel_on_signal(engine, intent)
    threading.Thread(target=cancel_on_request, args=(stdin, engine, intent), daemon=True).start()
    if every := float(os.environ.get("DOCKERWORKER_WATCH_CANCEL") or 0):
        threading.Thread(target=cancel_on_cancelling, args=(engine, intent, every),
                         daemon=True).start()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
