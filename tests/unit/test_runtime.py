"""LocalEngine over a stand-in Docker client: errors translated in one place, containers read
as Workloads, the calls the engine gets."""

from __future__ import annotations

from unittest import mock

import docker.errors
import pytest
import requests

from dockerworker.containers import ContainerSpec
from dockerworker.ownership import (
    LABEL_GENERATION,
    LABEL_HOLDER,
    LABEL_OWNER_OF,
    LABEL_OWNER_POOL,
    Owner,
    owner_record_name,
)
from dockerworker.runtime import (
    EngineError,
    EngineUnavailable,
    LocalEngine,
    Runtime,
    Workload,
    WorkloadGone,
    _translated,
    _workload,
    infrastructure_pid,
    parse_infrastructure_pid,
)

from .fakes import FakeAPI, FakeRuntime


def api_error(status: int | None, explanation: str = "why") -> docker.errors.APIError:
    response = mock.Mock(status_code=status) if status is not None else None
    return docker.errors.APIError("message", response=response, explanation=explanation)


@pytest.mark.parametrize("raised, expected", [
    (docker.errors.NotFound("no such container"), WorkloadGone),
    (api_error(500, "OCI runtime create failed"), EngineError),
    (api_error(503, "daemon restarting"), EngineUnavailable),
    (api_error(None), EngineUnavailable),
    (api_error(409, "name in use"), EngineError),
    (api_error(400, "bad option"), EngineError),
    (requests.ConnectionError("socket gone"), EngineUnavailable),
    (ConnectionRefusedError("refused"), EngineUnavailable),
    (docker.errors.DockerException("odd"), EngineError),
], ids=["404", "500", "503", "no answer", "409", "400", "requests", "socket", "other"])
def test_docker_errors_become_the_runtime_s(raised, expected) -> None:
    with pytest.raises(expected), _translated():
        raise raised


def test_the_engine_s_explanation_is_the_message() -> None:
    with pytest.raises(EngineError, match="^bad option$"), _translated():
        raise api_error(400, "bad option")


def test_a_workload_from_an_inspect() -> None:
    container = mock.Mock(id="abc" * 20, attrs={
        "Name": "/etl-1", "State": {"Status": "exited"},
        "Config": {"Labels": {"a": "1"}, "Env": ["X=1", "EMPTY=", "EQ=a=b"]},
    })
    workload = _workload(container)
    assert (workload.name, workload.status, workload.labels) == ("etl-1", "exited", {"a": "1"})
    assert workload.env == {"X": "1", "EMPTY": "", "EQ": "a=b"}
    assert workload.short_id == ("abc" * 20)[:12]


def test_a_workload_from_a_sparse_listing() -> None:
    container = mock.Mock(id="f" * 64, attrs={"Names": ["/dockerworker-warm-x"],
                                              "State": "running", "Labels": {"b": "2"}})
    workload = _workload(container, full=False)
    assert (workload.name, workload.status, workload.labels) == (
        "dockerworker-warm-x", "running", {"b": "2"})


def test_list_workloads_asks_for_this_pool_s_managed_containers() -> None:
    client = mock.Mock()
    client.containers.list.return_value = []
    LocalEngine(client).list_workloads("pool-a", **{"io.prefect.worker-name": "w1"})
    client.containers.list.assert_called_once_with(all=True, sparse=True, filters={"label": [
        "io.prefect.work-pool-name=pool-a", "io.dockerworker.managed=true",
        "io.prefect.worker-name=w1"]})


def test_only_never_started_containers_under_a_record_s_name_are_ownership_records() -> None:
    """A run's container that carries ownership labels (a job may not set them: jobs.py) is
    no record, not even under a record's name: records are never started."""
    victim = "v" * 64

    def record(name: str, generation: str, state: str = "created", holder: str = "w2"):
        return mock.Mock(attrs={"Names": [f"/{name}"], "State": state, "Labels": {
            LABEL_OWNER_POOL: "p", LABEL_OWNER_OF: victim, LABEL_HOLDER: holder,
            LABEL_GENERATION: generation}})

    client = mock.Mock()
    client.containers.list.return_value = [
        record(owner_record_name(victim, 1), "1"),
        record("etl-run-1234abcd", "7", holder="forged"),  # not a record's name
        record(owner_record_name(victim, 12345678), "12345678", state="running",
               holder="forged"),  # a record's name, but a container that ran
        record(owner_record_name(victim, 9), "nine", holder="forged"),  # not a number
    ]
    assert LocalEngine(client).owners("p") == {victim: Owner("w2", 1)}


def test_a_command_container_is_stopped_with_sigterm_and_its_grace() -> None:
    container = mock.Mock()
    notes: list[str] = []
    LocalEngine(mock.Mock()).stop(Workload("id", "etl-1", native=container), 7, notes.append)
    container.stop.assert_called_once_with(timeout=7)
    assert notes == ["stopping container etl-1 (SIGTERM, SIGKILL after 7 s)"]


def test_a_vanished_container_is_said_so_when_stopped() -> None:
    container = mock.Mock()
    container.stop.side_effect = docker.errors.NotFound("gone")
    with pytest.raises(WorkloadGone):
        LocalEngine(mock.Mock()).stop(Workload("id", "x", native=container), 1, print)


def test_remove_is_quiet_about_a_container_already_gone() -> None:
    container = mock.Mock()
    container.remove.side_effect = docker.errors.NotFound("gone")
    LocalEngine(mock.Mock()).remove(Workload("id", "x", native=container))


def test_a_start_refused_by_the_engine_carries_its_reason() -> None:
    client = mock.Mock()
    client.containers.create.return_value.start.side_effect = api_error(
        500, "unable to apply caps: operation not permitted")
    spec = ContainerSpec(name="etl-1", create_kwargs={"image": "i"})
    with pytest.raises(EngineError, match="unable to apply caps"):  # answered: no retry
        LocalEngine(client).start(spec)


def test_infrastructure_pid_round_trip() -> None:
    assert parse_infrastructure_pid(infrastructure_pid("ENGINE:ID", "c0ffee")) == (
        "ENGINE:ID", "c0ffee")
    assert parse_infrastructure_pid(None) == ("", "")


def test_both_runtimes_meet_the_protocol() -> None:
    assert isinstance(LocalEngine(mock.Mock()), Runtime)
    assert isinstance(FakeRuntime(FakeAPI()), Runtime)


def test_a_takeover_is_a_never_started_container_named_after_container_and_generation():
    client = mock.Mock()
    client.containers.get.return_value.attrs = {"Image": "sha256:abc"}
    workload = Workload("c" * 64, "etl-1")
    assert LocalEngine(client).take_over(workload, "pool-a", Owner("w1", 2))
    client.containers.create.assert_called_once_with(
        "sha256:abc", name=f"dockerworker-owner-{'c' * 32}-2", command=["true"], labels={
            "io.dockerworker.owner-pool": "pool-a", "io.dockerworker.owner-of": "c" * 64,
            "io.dockerworker.holder": "w1", "io.dockerworker.generation": "2"})
    client.containers.get.return_value.start.assert_not_called()


def test_a_takeover_another_worker_recorded_first_is_lost() -> None:
    client = mock.Mock()
    client.containers.get.return_value.attrs = {"Image": "sha256:abc"}
    client.containers.create.side_effect = api_error(409, "name in use")
    assert not LocalEngine(client).take_over(Workload("c" * 64, "x"), "p", Owner("w1", 1))


def test_the_owner_is_the_latest_takeover_s_holder() -> None:
    def record(owner_of: str, holder: str, generation: int) -> mock.Mock:
        return mock.Mock(attrs={"Names": [f"/{owner_record_name(owner_of, generation)}"],
                                "State": "created",
                                "Labels": {"io.dockerworker.owner-of": owner_of,
                                           "io.dockerworker.holder": holder,
                                           "io.dockerworker.generation": str(generation)}})

    client = mock.Mock()
    client.containers.list.return_value = [record("a", "w2", 2), record("a", "w1", 1),
                                           record("b", "w3", 1)]
    engine = LocalEngine(client)
    assert engine.owners("p") == {"a": Owner("w2", 2), "b": Owner("w3", 1)}
    assert engine.forget_owners("p", keep={"a"}) == 1
    client.containers.list.return_value[2].remove.assert_called_once_with(force=True)
