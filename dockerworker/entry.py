"""What runs in a flow container by default, and how the worker talks to it.

The default command is Prefect's engine (`python -m prefect.engine`: one process, where
`prefect flow-run execute` runs two) started through a small entry script (entry_script.py,
a standalone module, shipped as `python -c` text). The script does what
`prefect flow-run execute` does for cancellation: it plays the runner's side of
Prefect's control channel (`PREFECT__CONTROL_PORT`/`TOKEN`, loopback inside the container),
so a cancellation reaches the engine as a cancellation — Cancelling → Cancelled, with the
flow's on_cancellation hooks — and not as a bare SIGTERM, which Prefect reports as Crashed.
The worker asks for it by writing `cancel` to the container's stdin. With a time-out argument
the script is a warm container: it imports Prefect, then waits on stdin for the run's
identity (see warm.py). An image whose Prefect has no control channel still runs; its
cancellation is then the plain SIGTERM.
"""

from __future__ import annotations

import base64
import json
from importlib import resources

from docker.models.containers import Container

from . import entry_script

LABEL_CONTROL = "io.dockerworker.control"  # "stdin": the container reads `cancel` there
CANCEL_LINE = entry_script.CANCEL_LINE  # what the worker writes there to cancel
SECRETS_ENV = entry_script.SECRETS_ENV  # names the secrets the script waits for
SECRETS_DIR = entry_script.SECRETS_DIR  # where it writes them (a tmpfs)
READY_LINE = entry_script.READY_LINE  # what a warm container prints once Prefect is imported
SECRETS_MOUNTED_ENV = entry_script.SECRETS_MOUNTED_ENV  # Swarm mounted them: nothing to wait for

ENTRY_SCRIPT_MODULE = "entry_script.py"


def _read_entry_script() -> str:
    """The entry script's source, read from the installed package (wheel, sdist or tree)."""
    return resources.files(__package__).joinpath(ENTRY_SCRIPT_MODULE).read_text(encoding="utf-8")


# What `python -c` runs: the module file's text, unchanged (entry_script.py; it must stay
# standalone, since the container has Prefect but not dockerworker).
ENTRY_SCRIPT = _read_entry_script()


def entry_command(wait_seconds: float | None = None) -> list[str]:
    """The default command; with `wait_seconds`, a warm container's."""
    command = ["python", "-c", ENTRY_SCRIPT]
    if wait_seconds is not None:
        command.append(str(int(wait_seconds)))
    return command


def write_secrets(container: Container, files: dict[str, bytes]) -> None:
    """The run's secrets to the entry script waiting for them (`receive_secrets`)."""
    values = {name: base64.b64encode(value).decode() for name, value in files.items()}
    write_line(container, json.dumps(values))


def write_line(container: Container, line: str) -> None:
    """One line to the container's stdin (it was created with stdin open)."""
    stdin = container.attach_socket(params={"stdin": 1, "stream": 1})
    try:
        getattr(stdin, "_sock", stdin).sendall(line.encode() + b"\n")
    finally:
        stdin.close()
