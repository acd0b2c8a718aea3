"""The worker's console: the plain format people read, or one JSON object a line for log
aggregators (`--log-format json`). Both pass through the secrets mask (policy.py)."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Every line about a run names it as the supervisor's label does: flow run 'NAME' (UUID).
_RUN = re.compile(r"flow run '(?P<name>[^']*)' \((?P<id>[0-9a-f-]{36})\)")
_RESOURCE = re.compile(r"prefect\.flow-run\.(?P<id>[0-9a-f-]{36})")  # events name runs so
_console_lock = threading.Lock()
_json_output = False


class JsonFormatter(logging.Formatter):
    """time, level, logger, message; and flow_run_id/flow_run_name when the line is about a
    run. Tracebacks go into `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        entry.update(run_fields(message))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def run_label(name: str, flow_run_id: object) -> str:
    """How every line about a run names it; `_RUN` reads it back for the JSON format."""
    return f"flow run {name!r} ({flow_run_id})"


def run_fields(message: str) -> dict[str, str]:
    if match := _RUN.search(message):
        return {"flow_run_id": match["id"], "flow_run_name": match["name"]}
    if match := _RESOURCE.search(message):
        return {"flow_run_id": match["id"]}
    return {}


def configure(level: str, log_format: str = "console") -> None:
    """The root handler on stderr in the chosen format; chatty libraries at WARNING. A handler
    that fails stays silent: logging's own error report would print the record unmasked."""
    global _json_output
    logging.raiseExceptions = False
    _json_output = log_format == "json"
    formatter = JsonFormatter() if _json_output else logging.Formatter(CONSOLE_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def echo(prefix: str, line: str, flow_run_id: str | None = None) -> None:
    """A container's line on the worker's console, prefixed with its flow run's name (or, in
    JSON, as an object with the run's id). The line was masked by its run already."""
    if _json_output:
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                 "level": "INFO", "logger": "dockerworker.output", "message": line,
                 "flow_run_name": prefix}
        if flow_run_id:
            entry["flow_run_id"] = flow_run_id
        text = json.dumps(entry, ensure_ascii=False)
    else:
        text = f"{prefix} | {line}"
    with _console_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
