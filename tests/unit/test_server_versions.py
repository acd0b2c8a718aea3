"""What follows from the server's version (api.ServerInfo), job variables under either name,
the pool template's default image, CSRF tokens (over a stand-in transport), and the entry
script on a Prefect 2-shaped package (no prefect.flow_engine, no control channel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from dockerworker.api import (
    AuthRejected,
    CsrfRefused,
    Deployment,
    PrefectAPI,
    ServerInfo,
)
from dockerworker.entry import ENTRY_SCRIPT
from dockerworker.jobs import (
    DEFAULT_IMAGE,
    default_base_job_template,
    resolve_job,
    with_default_image,
)

from .fakes import FakeAPI, FakeRuntime, make_worker


def test_a_2x_server_gets_a_prefect_2_image_of_its_own_version() -> None:
    info = ServerInfo("2.20.27", event_stream=False)
    assert info.major == 2
    assert info.default_image == "prefecthq/prefect:2.20.27-python3.11"
    assert not info.basic_auth
    assert any("event stream" in line for line in info.limitations())


def test_a_3x_server_keeps_the_prefect_3_default() -> None:
    info = ServerInfo("3.9.1")
    assert (info.major, info.default_image, info.event_stream) == (3, DEFAULT_IMAGE, True)
    assert info.limitations() == []
    assert ServerInfo("unknown").major == 3


def test_job_variables_are_read_under_either_name() -> None:
    base = {"id": "0" * 32, "name": "d", "flow_id": "1" * 32}
    assert Deployment.model_validate({**base, "infra_overrides": {"image": "a"}}
                                     ).job_variables == {"image": "a"}
    assert Deployment.model_validate({**base, "job_variables": {"image": "b"}}
                                     ).job_variables == {"image": "b"}


def test_the_pool_template_defaults_to_the_servers_image() -> None:
    image = ServerInfo("2.20.27").default_image
    template = default_base_job_template(image)
    assert template["variables"]["properties"]["image"]["default"] == image
    assert resolve_job(template, {}).image == image
    assert resolve_job(template, {"image": "mine:1"}).image == "mine:1"


def test_a_pool_without_an_image_default_gets_the_servers_and_one_with_it_keeps_it() -> None:
    cli_made = {"job_configuration": {"image": "{{ image }}", "env": "{{ env }}"},
                "variables": {"properties": {"image": {"type": "string"},
                                             "env": {"type": "object"}}}}
    filled = with_default_image(cli_made, "prefecthq/prefect:2.20.27-python3.11")
    assert filled["variables"]["properties"]["image"] == {
        "type": "string", "default": "prefecthq/prefect:2.20.27-python3.11"}
    assert "default" not in cli_made["variables"]["properties"]["image"]  # a copy
    own = default_base_job_template("my/own:1")
    assert with_default_image(own, "other:2")["variables"]["properties"]["image"][
        "default"] == "my/own:1"
    assert resolve_job(with_default_image({}, "x:1"), {}).image == "x:1"


def _api(handler) -> tuple[PrefectAPI, list[httpx.Request]]:
    """A PrefectAPI whose HTTP goes to `handler` (request -> response); requests recorded."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    api = PrefectAPI("http://server/api", patience=0)
    api._client = httpx.Client(base_url="http://server/api/", transport=httpx.MockTransport(record))
    return api, seen


def _token(value: str, seconds: float = 3600) -> httpx.Response:
    expires = datetime.now(UTC) + timedelta(seconds=seconds)
    return httpx.Response(200, json={"token": value, "expiration": expires.isoformat()})


def test_writes_carry_the_token_and_a_refused_one_is_refreshed() -> None:
    tokens = iter(["t1", "t2"])
    valid = {"t2"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            assert request.url.params["client"]
            return _token(next(tokens))
        if request.headers.get("Prefect-Csrf-Token") not in valid:
            return httpx.Response(403, json={"detail": "Invalid CSRF token or client identifier."})
        return httpx.Response(200, json=[])

    api, seen = _api(handler)
    api.send_logs([{"message": "x"}])
    writes = [r for r in seen if r.method == "POST"]
    assert [r.headers["Prefect-Csrf-Token"] for r in writes] == ["t1", "t2"]
    assert len({r.headers["Prefect-Csrf-Client"] for r in writes}) == 1
    api.send_logs([{"message": "y"}])  # the fresh token is kept
    assert [r.url.path for r in seen].count("/api/csrf-token") == 2


def test_threads_refused_together_fetch_one_new_token() -> None:
    tokens = iter(["t1", "t2", "t3"])

    def handler(request: httpx.Request) -> httpx.Response:
        return _token(next(tokens))

    api, seen = _api(handler)
    assert api._csrf_headers("POST")["Prefect-Csrf-Token"] == "t1"
    # Two writes refused with t1: the first fetches t2, the second uses it (a second fetch
    # would replace t2 on the server and refuse the first writer's retry).
    assert api._csrf_headers("POST", refused="t1")["Prefect-Csrf-Token"] == "t2"
    assert api._csrf_headers("POST", refused="t1")["Prefect-Csrf-Token"] == "t2"
    assert len(seen) == 2


def test_protection_turned_on_after_the_first_ask_is_noticed() -> None:
    state = {"on": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            if not state["on"]:
                return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
            return _token("t")
        if state["on"] and request.headers.get("Prefect-Csrf-Token") != "t":
            return httpx.Response(403, json={"detail": "Missing CSRF token."})
        return httpx.Response(200, json=[])

    api, _ = _api(handler)
    api.send_logs([{"message": "x"}])
    state["on"] = True  # the server restarted with protection on
    api.send_logs([{"message": "y"}])
    assert api.csrf_protected


def test_reads_carry_no_token_and_protection_off_is_asked_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
        assert "Prefect-Csrf-Token" not in request.headers
        return httpx.Response(200, json=[])

    api, seen = _api(handler)
    api.health()
    for _ in range(3):
        api.send_logs([{"message": "x"}])
    assert [r.url.path for r in seen].count("/api/csrf-token") == 1


def test_an_expiring_token_is_fetched_again_before_use() -> None:
    tokens = iter(["old", "new"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            return _token(next(tokens), seconds=5)  # within the refresh margin
        return httpx.Response(200, json=[])

    api, seen = _api(handler)
    api.send_logs([{"message": "x"}])
    api.send_logs([{"message": "y"}])
    assert [r.headers.get("Prefect-Csrf-Token") for r in seen if r.method == "POST"] == [
        "old", "new"]


def test_a_csrf_refusal_is_not_rejected_credentials() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/csrf-token":
            return _token("t")
        if request.url.path == "/api/logs/":
            return httpx.Response(403, json={"detail": "Invalid CSRF token or client identifier."})
        return httpx.Response(403, json={"detail": "Forbidden"})

    api, _ = _api(handler)
    with pytest.raises(CsrfRefused) as refused:
        api.send_logs([{"message": "x"}])
    assert not isinstance(refused.value, AuthRejected)
    with pytest.raises(AuthRejected):
        api.probe_work_pools()


def test_server_info_is_asked_once_and_2x_events_follow_the_setting() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/admin/version":
            return httpx.Response(200, json="2.20.27")
        if request.url.path == "/api/admin/settings":
            return httpx.Response(200, json={"PREFECT_EXPERIMENTAL_EVENTS": True})
        return httpx.Response(404, json={"detail": "Not Found"})

    api, seen = _api(handler)
    assert api.server == ServerInfo("2.20.27", event_stream=True)
    assert api.server.major == 2
    assert [r.url.path for r in seen] == ["/api/admin/version", "/api/admin/settings"]


# --- the entry script on a Prefect 2-shaped package ---------------------------------------
@pytest.fixture
def prefect2_shaped(tmp_path: Path) -> dict[str, str]:
    """`prefect` with an engine but no flow_engine and no attempt_control (as in 2.20)."""
    package = tmp_path / "prefect"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "engine.py").write_text(
        "import os, time\n"
        "if __name__ == '__main__':\n"
        "    print('run', os.environ.get('RUN_ID'), os.environ.get('PREFECT__CONTROL_PORT'),"
        " flush=True)\n"
        "    time.sleep(float(os.environ.get('SLEEP', '0')))\n"
    )
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}


def test_the_script_runs_a_prefect_2_engine_cold_and_warm(prefect2_shaped: dict) -> None:
    for args, stdin, env in (([], "", {"RUN_ID": "cold"}),
                             (["30"], json.dumps({"RUN_ID": "warm"}) + "\n", {})):
        proc = subprocess.run([sys.executable, "-c", ENTRY_SCRIPT, *args], input=stdin,
                              env={**prefect2_shaped, **env}, capture_output=True, text=True,
                              timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        run = proc.stdout.splitlines()[-1].split()  # a warm one said it was ready first
        assert run[:2] == ["run", env.get("RUN_ID", "warm")]
        assert run[2] == "None"  # no control channel offered


def test_cancel_on_a_prefect_2_engine_is_sigterm(prefect2_shaped: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-c", ENTRY_SCRIPT],
                            env={**prefect2_shaped, "RUN_ID": "r", "SLEEP": "30"}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().startswith("run r")
        proc.stdin.write("cancel\n")
        proc.stdin.flush()
        assert proc.wait(30) == -15
    finally:
        proc.kill()
        proc.communicate()


def test_a_worker_on_a_server_without_events_does_not_subscribe() -> None:
    api = FakeAPI()
    runtime = FakeRuntime(api)
    api.server = ServerInfo("2.20.27", event_stream=False)
    worker = make_worker(api, runtime, start=False, run_once=True)
    assert worker._loop() == 0
    assert worker.events is None
