"""Job variables: prefect-docker compatibility of the template, merge order, validation."""

from __future__ import annotations

from typing import Any

import pytest
from prefect_docker.worker import DockerWorker

from dockerworker.jobs import (
    DEFAULT_IMAGE,
    InvalidJobVariables,
    default_base_job_template,
    merge_job_variables,
    resolve_job,
)


def _types(spec: dict[str, Any]) -> set[str]:
    """A variable's JSON types, with `$ref`s and `anyOf` flattened."""
    if "anyOf" in spec:
        return set().union(*(_types(option) for option in spec["anyOf"]))
    if "$ref" in spec:
        return {"object"}
    return {spec.get("type", "any")}


PREFECT_DOCKER = DockerWorker.get_default_base_job_template()


@pytest.mark.parametrize("name", sorted(PREFECT_DOCKER["variables"]["properties"]))
def test_every_prefect_docker_variable_has_the_same_type_and_default(name: str) -> None:
    theirs = PREFECT_DOCKER["variables"]["properties"][name]
    ours = default_base_job_template()["variables"]["properties"][name]
    assert _types(ours) == _types(theirs)
    assert ours.get("default") == theirs.get("default")
    assert default_base_job_template()["job_configuration"][name] == "{{ " + name + " }}"


def test_pool_defaults_then_deployment_then_flow_run() -> None:
    template = default_base_job_template()
    template["variables"]["properties"]["image"]["default"] = "pool/image:1"
    template["variables"]["properties"]["env"]["default"] = {"A": "pool", "B": "pool"}
    values = merge_job_variables(
        {"image": "deploy/image:2", "env": {"B": "deployment", "C": "deployment"}, "mem_limit": "1g"},
        {"mem_limit": "2g", "env": {"C": "run"}},
    )
    job = resolve_job(template, values)
    assert job.image == "deploy/image:2"
    assert job.mem_limit == "2g"
    assert job.env == {"A": "pool", "B": "deployment", "C": "run"}


def test_unset_values_fall_back_to_model_defaults() -> None:
    job = resolve_job(default_base_job_template(), {})
    assert job.image == DEFAULT_IMAGE
    assert job.stream_output is True and job.auto_remove is False
    assert job.env == {} and job.volumes == []


def test_dotted_keys_set_nested_values() -> None:
    job = resolve_job(default_base_job_template(), merge_job_variables({"env.FOO": 1}, None))
    assert job.env == {"FOO": "1"}


def test_template_with_text_around_placeholders() -> None:
    template = {
        "job_configuration": {"image": "registry.local/{{ flavour }}:{{ tag }}", "command": "{{ cmd }}"},
        "variables": {"properties": {"tag": {"type": "string", "default": "3"}}},
    }
    job = resolve_job(template, {"flavour": "prefect"})
    assert job.image == "registry.local/prefect:3"
    assert job.command is None


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"mem_limit": "lots"}, ["mem_limit", "'lots' is not a memory size"]),
        ({"memswap_limit": "1x"}, ["memswap_limit"]),
        ({"auto_remove": "sometimes"}, ["auto_remove"]),
        ({"image_pull_policy": "Sometimes"}, ["image_pull_policy", "Sometimes"]),
        ({"volumes": "/a:/b"}, ["volumes"]),
        ({"infra_retries": 11}, ["infra_retries", "less than or equal to 10"]),
        ({"infra_retries": -1}, ["infra_retries", "greater than or equal to 0"]),
    ],
)
def test_invalid_values_name_the_variable(values: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(InvalidJobVariables) as caught:
        resolve_job(default_base_job_template(), values)
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize("size", ["64m", "1g", "10000000", "1.5g", "512MB", "6m"])
def test_memory_sizes_docker_accepts(size: str) -> None:
    job = resolve_job(default_base_job_template(), {"mem_limit": size, "memswap_limit": "-1"})
    assert job.mem_limit == size and job.memswap_limit == "-1"
    assert resolve_job(default_base_job_template(),
                       {"mem_limit": size, "memswap_limit": size}).memswap_limit == size


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mem_limit": "-1"}, "mem_limit: '-1' is below Docker's minimum of 6m"),
        ({"mem_limit": "0"}, "mem_limit: '0' is below Docker's minimum of 6m"),
        ({"mem_limit": "4m"}, "below Docker's minimum"),
        ({"mem_limit": "100000"}, "below Docker's minimum"),
        ({"memswap_limit": "1g"}, "memswap_limit: needs mem_limit"),
        ({"mem_limit": "1g", "memswap_limit": "512m"}, "memswap_limit: '512m' is below mem_limit"),
        ({"mem_limit": "lots"}, "mem_limit: 'lots' is not a memory size"),
    ],
)
def test_memory_sizes_docker_refuses_are_refused_before_anything_starts(
    values: dict, message: str
) -> None:
    with pytest.raises(InvalidJobVariables) as caught:
        resolve_job(default_base_job_template(), values)
    assert message in str(caught.value)
