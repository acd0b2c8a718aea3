"""GET /metrics of a real worker moves as real runs end (issue 18): read through
prometheus-client's own text parser."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from testrig.prefect_rig import PrefectRig, free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_follow_runs_of_each_kind(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    port = free_port()
    start_worker(unique_pool, "--health-port", str(port))
    kinds = {
        ("completed", "flow"): ("flows.py:hello", {}, {}),
        ("failed", "flow"): ("flows.py:fails", {}, {}),
        ("crashed", "oom"): ("flows.py:allocate", {"mem_limit": "256m"}, {"mb": 768}),
        ("cancelled", "cancelled"): ("flows.py:sleepy", {}, {"seconds": 120}),
        ("crashed", "refused"): ("flows.py:hello", {"privileged": True}, {}),
    }
    runs = {}
    for kind, (entry, job, parameters) in kinds.items():
        deployment = rig.create_deployment(unique_pool, entry, {"image": flow_image, **job})
        runs[kind] = rig.create_flow_run(deployment, parameters=parameters)
    rig.wait_for_state(runs[("cancelled", "cancelled")], "RUNNING", timeout=120)
    rig.set_state(runs[("cancelled", "cancelled")], "CANCELLING", force=True)
    for kind, run_id in runs.items():
        assert rig.wait_for_final(run_id, timeout=180)["state"]["type"] == kind[0].upper()

    finished = "dockerworker_runs_finished_total"
    deadline = time.monotonic() + 60
    while True:  # the worker's verdicts follow the runs' final states
        samples = scrape(port)
        counts = {kind: value(samples, finished, state=kind[0], reason=kind[1]) for kind in kinds}
        if all(count == 1 for count in counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counts == dict.fromkeys(kinds, 1.0), counts
    assert value(samples, "dockerworker_runs_claimed_total") == 5
    assert value(samples, "dockerworker_runs_started_total", start="cold") == 4
    assert value(samples, "dockerworker_claim_to_container_start_seconds_count") == 4
    assert value(samples, "dockerworker_container_lifetime_seconds_count") == 4
    assert value(samples, "dockerworker_pickup_seconds_count") == 5
    assert value(samples, "dockerworker_container_start_to_running_seconds_count") >= 1
    assert value(samples, "dockerworker_prefect_api_requests_total",
                 endpoint="/flow_runs/{id}/set_state", method="POST", status="2xx") >= 5
    assert value(samples, "dockerworker_runs_in_flight") == 0
    assert value(samples, "dockerworker_log_lines_shipped_total") > 0
    assert value(samples, "dockerworker_event_stream_connected") == 1
    assert any(name == "dockerworker_build_info" for name, _ in samples)
    labels = {dict(label_set).get("endpoint", "") for _, label_set in samples}
    assert not any(run_id in label for label in labels for run_id in runs.values())


def test_json_logs_every_line_parses_run_lines_carry_the_run_no_secret(
    rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str, tmp_path
) -> None:
    import json

    from testrig.workers import WorkerProcess, worker_env

    key = "pnu_json_logs_secret_0123456789"
    env = worker_env(prefect_server.url, PREFECT_API_KEY=key)
    worker = WorkerProcess(["--pool", unique_pool, "--name", f"{unique_pool}-j",
                            "--poll-interval", "1", "--log-format", "json",
                            "--log-level", "DEBUG"], env, tmp_path / "worker.log")
    try:
        worker.wait_for_output('"message": "worker ')
        deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
        run_id = rig.create_flow_run(deployment)
        assert rig.wait_for_final(run_id, timeout=120)["state"]["type"] == "COMPLETED"
        worker.wait_for_output("exited with code 0")
    finally:
        worker.stop()
    lines = [line for line in worker.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    about_the_run = [r for r in records if run_id in r["message"] or r.get("flow_run_id")]
    assert about_the_run and all(r.get("flow_run_id") == run_id for r in about_the_run)
    assert any(r["logger"] == "dockerworker.output" for r in about_the_run)  # its output
    assert key not in worker.output()
