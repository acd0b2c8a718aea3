"""--log-format json: every line parses, run lines carry the run, secrets stay masked."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from dockerworker import logformat
from dockerworker.policy import Masker, mask_logging


@pytest.fixture
def json_console(capsys):
    """The worker's JSON console, its log lines in a buffer (stderr is pytest's)."""
    root = logging.getLogger()
    handlers, level, raising = root.handlers[:], root.level, logging.raiseExceptions
    logformat.configure("DEBUG", "json")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    mask_logging(Masker({"pnu_secret_key_123"}))
    yield buffer, capsys
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.raiseExceptions = raising
    logformat.configure.__globals__["_json_output"] = False


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_line_is_an_object_and_run_lines_name_the_run(json_console) -> None:
    run_id = str(uuid.uuid4())
    logging.getLogger("dockerworker.runs").info("flow run 'calm-otter' (%s): claimed", run_id)
    logging.getLogger("websockets.client").debug("> Authorization: Bearer pnu_secret_key_123")
    try:
        raise RuntimeError("token pnu_secret_key_123 in a traceback")
    except RuntimeError:
        logging.getLogger("dockerworker.worker").exception("round failed")
    logformat.echo("calm-otter", "a line the flow printed", run_id)
    buffer, capsys = json_console
    captured = capsys.readouterr()
    assert "pnu_secret_key_123" not in buffer.getvalue() + captured.out
    records = lines(buffer.getvalue())
    assert [r["logger"] for r in records] == ["dockerworker.runs", "websockets.client",
                                             "dockerworker.worker"]
    assert records[0]["flow_run_id"] == run_id and records[0]["flow_run_name"] == "calm-otter"
    assert records[1]["message"] == "> Authorization: Bearer ***"
    assert "flow_run_id" not in records[1]
    assert "RuntimeError: token *** in a traceback" in records[2]["exception"]
    (output,) = lines(captured.out)
    assert output == {**output, "flow_run_id": run_id, "message": "a line the flow printed",
                      "logger": "dockerworker.output"}
    assert {"time", "level"} <= set(records[0])


def test_the_console_format_stays_as_it_was(capsys) -> None:
    logformat.configure("INFO", "console")
    logformat.echo("calm-otter", "hello")
    assert capsys.readouterr().out == "calm-otter | hello\n"
