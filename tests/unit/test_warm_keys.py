"""Which warm container may serve which run: everything but the run's identity must match."""

from __future__ import annotations

import uuid

from dockerworker.api import Deployment, Flow, FlowRun, WorkPool
from dockerworker.containers import RUN_ENV, RUN_LABELS, build_spec
from dockerworker.jobs import JobVariables
from dockerworker.warm import LABEL_WARM, WARM_NAME_PREFIX, warm_key, warm_spec

POOL = WorkPool(id=uuid.uuid4(), name="pool-a", type="docker")
FLOW = Flow(id=uuid.uuid4(), name="etl")


def spec_for(job: JobVariables, deployment_name: str = "nightly"):
    run = FlowRun(id=uuid.uuid4(), name=f"run-{uuid.uuid4().hex[:6]}", flow_id=FLOW.id)
    deployment = Deployment(id=uuid.uuid4(), name=deployment_name, flow_id=FLOW.id)
    return build_spec(job, flow_run=run, deployment=deployment, flow=FLOW, pool=POOL,
                      worker_name="w1", api_url="http://127.0.0.1:4200/api", auth_env={})


def test_runs_differing_only_in_identity_share_warm_containers() -> None:
    job = JobVariables(image="flows:1", env={"A": "1"}, mem_limit="1g")
    assert warm_key(spec_for(job)) == warm_key(spec_for(job, deployment_name="hourly"))


def test_anything_else_makes_another_key() -> None:
    base = warm_key(spec_for(JobVariables(image="flows:1")))
    for other in (JobVariables(image="flows:2"), JobVariables(image="flows:1", env={"A": "2"}),
                  JobVariables(image="flows:1", mem_limit="1g"),
                  JobVariables(image="flows:1", labels={"team": "x"}),
                  JobVariables(image="flows:1", networks=["a", "b"])):
        assert warm_key(spec_for(other)) != base, other


def test_a_job_with_its_own_command_is_never_warm() -> None:
    assert warm_key(spec_for(JobVariables(image="flows:1", command="python my.py"))) is None


def test_the_warm_spec_carries_no_identity_and_waits_on_stdin() -> None:
    spec = spec_for(JobVariables(image="flows:1", env={"A": "1"}))
    warm = warm_spec(spec, "abcdef0123456789", ttl=600)
    kwargs = warm.create_kwargs
    assert not RUN_ENV & set(kwargs["environment"]) and kwargs["environment"]["A"] == "1"
    assert not RUN_LABELS & set(kwargs["labels"])
    assert kwargs["labels"][LABEL_WARM] == "abcdef0123456789"
    assert kwargs["labels"]["io.prefect.work-pool-name"] == "pool-a"
    assert kwargs["stdin_open"] is True and kwargs["command"][-1] == "600"
    assert kwargs["cpu_shares"] == 2  # it imports Prefect on CPU that running flows leave over
    assert warm.name.startswith(WARM_NAME_PREFIX)
    assert spec.create_kwargs["environment"]["PREFECT__FLOW_RUN_ID"]  # the run's spec untouched
