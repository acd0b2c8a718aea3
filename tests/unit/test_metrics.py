"""The metrics move as the runs go, labels stay bounded, and /metrics serves them."""

from __future__ import annotations

import threading
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dockerworker import __version__
from dockerworker.api import StateType
from dockerworker.health import serve_health
from dockerworker.metrics import endpoint, sample

from .fakes import Script, make_worker, settle, wait_until

FINISHED = "dockerworker_runs_finished_total"


def finished(state: str, reason: str) -> float:
    return sample(FINISHED, {"state": state, "reason": reason})


def run_one(api, runtime, script: Script | None = None, **run_kw):
    if script is not None:
        runtime.script_for = lambda spec: script
    run = api.add_run(**run_kw)
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    return run, worker


@pytest.mark.parametrize(
    ("script", "run_kw", "state", "reason"),
    [
        (Script(), {}, "completed", "flow"),
        (Script(final_state=StateType.FAILED), {}, "failed", "flow"),
        (Script(exit_code=1, final_state=None), {}, "crashed", "exit_code"),
        (Script(exit_code=137, oom=True, final_state=None), {}, "crashed", "oom"),
        (Script(exit_code=137, final_state=None), {}, "crashed", "signal"),
        (Script(exit_code=143, final_state=None), {}, "rescheduled", "stopped"),
        (Script(final_state=StateType.PAUSED), {}, "paused", "suspended"),
        (None, {"job_variables": {"privileged": True}}, "crashed", "refused"),
        (None, {"job_variables": {"mem_limit": "lots"}}, "crashed", "invalid"),
    ],
    ids=["completed", "failed", "exit", "oom", "signal", "stopped", "suspended", "refused",
         "invalid"],
)
def test_each_end_is_counted_by_state_and_reason(api, runtime, script, run_kw, state,
                                                 reason) -> None:
    before = finished(state, reason)
    claimed = sample("dockerworker_runs_claimed_total")
    run_one(api, runtime, script, **run_kw)
    assert finished(state, reason) == before + 1
    assert sample("dockerworker_runs_claimed_total") == claimed + 1


def test_a_started_run_counts_its_start_and_its_times(api, runtime) -> None:
    cold = sample("dockerworker_runs_started_total", {"start": "cold"})
    starts = sample("dockerworker_claim_to_container_start_seconds_count")
    lifetimes = sample("dockerworker_container_lifetime_seconds_count")
    pulls = sample("dockerworker_image_pulls_total", {"result": "present"})
    run_one(api, runtime)
    assert sample("dockerworker_runs_started_total", {"start": "cold"}) == cold + 1
    assert sample("dockerworker_claim_to_container_start_seconds_count") == starts + 1
    assert sample("dockerworker_container_lifetime_seconds_count") == lifetimes + 1
    assert sample("dockerworker_image_pulls_total", {"result": "present"}) >= pulls


def test_a_lost_claim_is_counted(api, runtime) -> None:
    lost = sample("dockerworker_claims_lost_total")
    run = api.add_run(state=StateType.PENDING, message="claimed by dockerworker w9")
    worker = make_worker(api, runtime)
    worker._start(run, lambda supervisor: supervisor.run())
    settle(worker)
    assert sample("dockerworker_claims_lost_total") == lost + 1


def test_a_vanished_container_counts_as_rescheduled(api, runtime) -> None:
    before = finished("rescheduled", "vanished")
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold)
    run = api.add_run()
    worker = make_worker(api, runtime)
    worker.poll()
    wait_until(lambda: runtime.of_run(run.id) is not None)
    runtime.vanish(run.id)
    settle(worker)
    assert finished("rescheduled", "vanished") == before + 1


def test_gauges_read_the_worker_at_scrape_time(api, runtime) -> None:
    hold = threading.Event()
    runtime.script_for = lambda spec: Script(hold=hold)
    api.add_run()
    worker = make_worker(api, runtime, limit=3)
    worker.poll()
    wait_until(lambda: sample("dockerworker_runs_in_flight") == 1)
    assert sample("dockerworker_limit") == 3
    hold.set()
    settle(worker)
    assert sample("dockerworker_runs_in_flight") == 0


@pytest.mark.parametrize(
    ("path", "label"),
    [
        (f"/flow_runs/{uuid.uuid4()}/set_state", "/flow_runs/{id}/set_state"),
        (f"flow_runs/{uuid.uuid4()}", "/flow_runs/{id}"),
        ("/work_pools/my-pool/get_scheduled_flow_runs",
         "/work_pools/{name}/get_scheduled_flow_runs"),
        ("/deployments/name/etl/nightly", "/deployments/name/{flow}/{deployment}"),
        (f"/flow_run_states/?flow_run_id={uuid.uuid4()}", "/flow_run_states/"),
        ("/logs/", "/logs/"),
        # names a job chooses ({{ prefect.variables.X }}, {{ prefect.blocks.T.N }}): found by
        # an audit, each was a series of its own
        ("/variables/name/db-host-7", "/variables/name/{name}"),
        ("/block_types/slug/secret/block_documents/name/git-token?include_secrets=true",
         "/block_types/slug/{slug}/block_documents/name/{name}"),
    ],
    ids=["set-state", "flow-run", "poll", "deployment", "run-states", "logs", "variable",
         "block"],  # no random ids:
)  # pytest-xdist's processes must collect the same names
def test_endpoint_labels_are_bounded(path: str, label: str) -> None:
    assert endpoint(path) == label


def test_metrics_are_served_in_prometheus_text_format(api, runtime) -> None:
    worker = make_worker(api, runtime)
    server = serve_health(worker, 0, host="127.0.0.1")
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
            text = answer.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {"dockerworker_runs_finished", "dockerworker_runs_in_flight",
            "dockerworker_claim_to_container_start_seconds", "dockerworker_build_info",
            "dockerworker_prefect_api_requests", "dockerworker_loop_round_failures"} <= families
    info = sample("dockerworker_build_info", {"version": __version__,
                                              "prefect_server_version": "3.9.1",
                                              "docker_engine_version": "fake-1.0"})
    assert info == 1
