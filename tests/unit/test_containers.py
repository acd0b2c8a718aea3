"""The container spec a run gets: env, labels, network mode, and how exits are described."""

from __future__ import annotations

import uuid

from dockerworker.api import Deployment, Flow, FlowRun, WorkPool
from dockerworker.containers import ExitReport, build_spec, container_name
from dockerworker.jobs import JobVariables

RUN = FlowRun(id=uuid.uuid4(), name="gorgeous-otter", flow_id=uuid.uuid4())
POOL = WorkPool(id=uuid.uuid4(), name="pool-a", type="docker")
DEPLOYMENT = Deployment(id=uuid.uuid4(), name="nightly", flow_id=RUN.flow_id)
FLOW = Flow(id=RUN.flow_id, name="etl")


def spec_for(job: JobVariables, api_url: str = "http://127.0.0.1:4200/api", **kw):
    return build_spec(
        job, flow_run=RUN, deployment=DEPLOYMENT, flow=FLOW, pool=POOL, worker_name="w1",
        api_url=api_url, auth_env=kw.get("auth_env", {}),
    )


def test_env_has_run_identity_and_job_env_but_nothing_of_the_worker(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", "/worker/home")
    monkeypatch.setenv("SECRET_OF_THE_WORKER", "x")
    spec = spec_for(JobVariables(env={"A": "1", "PREFECT_LOGGING_LEVEL": "DEBUG", "DROP": None}),
                    auth_env={"PREFECT_API_KEY": "k"})
    env = spec.create_kwargs["environment"]
    assert env["PREFECT__FLOW_RUN_ID"] == str(RUN.id)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["PREFECT_API_KEY"] == "k"
    assert env["A"] == "1" and env["PREFECT_LOGGING_LEVEL"] == "DEBUG"
    assert "DROP" not in env and "PREFECT_HOME" not in env and "SECRET_OF_THE_WORKER" not in env


def test_labels_ours_win_over_the_jobs() -> None:
    job = JobVariables(labels={"io.prefect.flow-run-id": "forged", "team": "data",
                               "example.com/owner": "me"})
    labels = spec_for(job).create_kwargs["labels"]
    assert labels["io.prefect.flow-run-id"] == str(RUN.id)
    assert labels["io.prefect.work-pool-name"] == "pool-a"
    assert labels["io.prefect.worker-name"] == "w1"
    assert labels["io.prefect.deployment-id"] == str(DEPLOYMENT.id)
    assert labels["team"] == "data" and labels["com.example.owner"] == "me"


def test_local_api_means_host_network_like_prefect_docker() -> None:
    assert spec_for(JobVariables()).create_kwargs["network_mode"] == "host"
    bridged = spec_for(JobVariables(network_mode="bridge")).create_kwargs
    assert bridged["environment"]["PREFECT_API_URL"] == "http://host.docker.internal:4200/api"
    assert bridged["extra_hosts"] == {"host.docker.internal": "host-gateway"}
    remote = spec_for(JobVariables(networks=["a", "b"]), api_url="http://prefect:4200/api")
    assert "network_mode" not in remote.create_kwargs
    assert remote.create_kwargs["network"] == "a" and remote.extra_networks == ["b"]


def test_a_shared_or_host_namespace_gets_no_gateway_alias() -> None:
    for job in (JobVariables(networks=["host"]), JobVariables(network_mode="container:db"),
                JobVariables(networks=["container:db", "b"]), JobVariables(network_mode="none")):
        kwargs = spec_for(job).create_kwargs
        assert "extra_hosts" not in kwargs, job  # Docker refuses it with container:…
        assert kwargs["environment"]["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_auto_remove_is_never_handed_to_docker() -> None:
    spec = spec_for(JobVariables(auto_remove=True,
                                 container_create_kwargs={"auto_remove": True, "cpu_shares": 2}))
    assert "auto_remove" not in spec.create_kwargs and spec.auto_remove
    assert spec.create_kwargs["cpu_shares"] == 2


def test_container_names_are_docker_safe_and_unique_per_run() -> None:
    name = container_name("my flow/run: #1", RUN.id)
    assert name == f"my-flow-run-1-{RUN.id.hex[:8]}"
    assert container_name("***", RUN.id).startswith("flow-run-")


def test_exit_descriptions() -> None:
    assert "out of memory (mem_limit 64m)" in ExitReport(137, True, "").describe("64m")
    assert "SIGKILL" in ExitReport(137, False, "").describe(None)
    assert "SIGTERM" in ExitReport(143, False, "").describe(None)
    assert ExitReport(3, False, "").describe(None) == "exited with code 3"


def test_watch_options_survive_a_round_trip_through_labels() -> None:
    from dockerworker.containers import WatchOptions

    job = JobVariables(auto_remove=True, stream_output=False, max_log_bytes=123, stop_timeout=7,
                       mem_limit="64m", env={"PREFECT_LOGGING_TO_API_ENABLED": "false"})
    options = WatchOptions.from_job(job)
    assert WatchOptions.from_labels(spec_for(job).create_kwargs["labels"]) == options
    assert options.skip_engine_records is False and options.mem_limit == "64m"
    assert WatchOptions.from_labels({}) == WatchOptions()


def test_the_default_command_is_the_engine_behind_the_entry_script_with_stdin_open() -> None:
    default = spec_for(JobVariables()).create_kwargs
    assert default["command"][:2] == ["python", "-c"]
    assert "prefect.engine" in default["command"][2] and "cancel" in default["command"][2]
    assert default["stdin_open"] is True
    assert default["labels"]["io.dockerworker.control"] == "stdin"
    own = spec_for(JobVariables(command="python my_flow.py")).create_kwargs
    assert own["command"] == "python my_flow.py"
    assert "stdin_open" not in own and "io.dockerworker.control" not in own["labels"]


def test_the_entry_script_is_valid_python() -> None:
    from dockerworker.entry import ENTRY_SCRIPT

    compile(ENTRY_SCRIPT, "<entry script>", "exec")
