"""`{{ prefect.blocks.… }}` / `{{ prefect.variables.… }}` in job variables, resolved as
Prefect's workers resolve them; their secrets masked; a missing one named."""

from __future__ import annotations

import pytest

from dockerworker.api import StateType
from dockerworker.references import References, UnresolvedReference

from .fakes import FakeAPI, FakeRuntime, Script, make_worker, settle


def test_placeholders_resolve_whole_embedded_and_by_path(api: FakeAPI) -> None:
    api.blocks[("secret", "s3-secret")] = {"value": "s3cr3t-value"}
    api.blocks[("json", "cfg")] = {"value": {"hosts": [{"name": "db1"}], "port": 5432}}
    api.blocks[("aws-credentials", "prod")] = {"aws_access_key_id": "AKIA1",
                                               "aws_secret_access_key": "aws-s3cr3t",
                                               "region_name": "eu-west-1"}
    api.variables["team"] = "data"
    references = References(api)
    resolved = references.resolve({
        "env": {"SECRET": "{{ prefect.blocks.secret.s3-secret }}",
                "DSN": "db://{{ prefect.blocks.json.cfg.hosts[0].name }}:"
                       "{{prefect.blocks.json.cfg.port}}/x",
                "KEY": "{{ prefect.blocks.aws-credentials.prod.aws_secret_access_key }}",
                "REGION": "{{ prefect.blocks.aws-credentials.prod.region_name }}",
                "TEAM": "{{ prefect.variables.team }}", "PLAIN": "{{ not.ours }}"},
        "labels": ["{{ prefect.blocks.json.cfg.value.port }}"],
        "cfg": "{{ prefect.blocks.json.cfg }}",
    })
    assert resolved["env"] == {"SECRET": "s3cr3t-value", "DSN": "db://db1:5432/x",
                               "KEY": "aws-s3cr3t", "REGION": "eu-west-1", "TEAM": "data",
                               "PLAIN": "{{ not.ours }}"}
    assert resolved["labels"] == [5432]
    assert resolved["cfg"] == {"hosts": [{"name": "db1"}], "port": 5432}
    assert references.secrets == {"s3cr3t-value", "aws-s3cr3t"}


@pytest.mark.parametrize(("placeholder", "message"), [
    ("{{ prefect.blocks.secret.gone }}", "there is no secret block named 'gone'"),
    ("{{ prefect.blocks.aws-credentials.prod.nope }}", "the block has no 'nope'"),
    ("{{ prefect.variables.missing }}", "there is no variable named 'missing'"),
    ("{{ prefect.blocks.secret }}", "names no block document"),
])
def test_what_the_server_lacks_is_named(api: FakeAPI, placeholder: str, message: str) -> None:
    api.blocks[("aws-credentials", "prod")] = {"region_name": "x"}
    with pytest.raises(UnresolvedReference, match=message):
        References(api).resolve({"env": {"X": placeholder}})


def test_a_run_gets_the_value_and_its_output_is_masked(api: FakeAPI,
                                                       runtime: FakeRuntime) -> None:
    api.blocks[("secret", "token")] = {"value": "tok-from-block"}
    runtime.script_for = lambda spec: Script(lines=[("stdout", "using tok-from-block")],
                                             exit_code=1, final_state=None)
    run = api.add_run(job_variables={"env": {"GIT_PAT": "{{ prefect.blocks.secret.token }}"}})
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    container = runtime.of_run(run.id)
    assert container is not None and container.workload.env["GIT_PAT"] == "tok-from-block"
    message = api.state_of(run.id).message
    assert "using ***" in message and "tok-from-block" not in message


def test_a_missing_block_crashes_the_run_before_any_container(api: FakeAPI,
                                                              runtime: FakeRuntime) -> None:
    run = api.add_run(job_variables={"env": {"X": "{{ prefect.blocks.secret.gone }}"}})
    worker = make_worker(api, runtime)
    worker.poll()
    settle(worker)
    state = api.state_of(run.id)
    assert state.type == StateType.CRASHED
    assert "there is no secret block named 'gone'" in state.message
    assert runtime.containers == {}
