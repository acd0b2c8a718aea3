"""`dockerworker start`'s options come from WorkerSettings: one default, bound and env name."""

from __future__ import annotations

from typing import Any, NamedTuple

import click
import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from dockerworker import cli
from dockerworker.settings import DEFAULT_API_URL, WorkerSettings, flags


def _start_options() -> dict[str, click.Option]:
    return {p.name: p for p in cli.start.params if isinstance(p, click.Option)}


def test_every_flagged_setting_is_an_option_with_its_env_and_default() -> None:
    options = _start_options()
    for name, flag in flags().items():
        option = options[flag.param or name]
        assert flag.name in option.opts
        assert option.envvar == flag.env
        default = WorkerSettings.model_fields[name].default
        if default not in (None, PydanticUndefined):
            assert option.default == default, name


def test_the_flags_and_env_names_users_know() -> None:
    options = _start_options()
    assert {name: (o.opts, o.envvar) for name, o in options.items()} == {
        "pool": (["--pool", "-p"], "DOCKERWORKER_POOL"),
        "work_queues": (["--work-queue", "-q"], None),
        "name": (["--name", "-n"], "DOCKERWORKER_NAME"),
        "limit": (["--limit", "-l"], "DOCKERWORKER_LIMIT"),
        "poll_interval": (["--poll-interval"], "DOCKERWORKER_POLL_INTERVAL"),
        "poll_interval_with_events": (["--poll-interval-with-events"],
                                      "DOCKERWORKER_POLL_INTERVAL_WITH_EVENTS"),
        "prefetch_seconds": (["--prefetch-seconds"], "DOCKERWORKER_PREFETCH_SECONDS"),
        "heartbeat_interval": (["--heartbeat-interval"], "DOCKERWORKER_HEARTBEAT_INTERVAL"),
        "max_starting": (["--max-starting"], "DOCKERWORKER_MAX_STARTING"),
        "warm": (["--warm"], "DOCKERWORKER_WARM"),
        "run_once": (["--run-once"], None),
        "drain": (["--drain"], "DOCKERWORKER_DRAIN"),
        "health_port": (["--health-port"], "DOCKERWORKER_HEALTH_PORT"),
        "api_url": (["--api-url"], "PREFECT_API_URL"),
        "api_patience": (["--api-patience"], "DOCKERWORKER_API_PATIENCE"),
        "build_network_mode": (["--build-network"], "DOCKERWORKER_BUILD_NETWORK"),
        "build_ca_bundle": (["--build-ca-bundle"], "DOCKERWORKER_BUILD_CA_BUNDLE"),
        "build_timeout": (["--build-timeout"], "DOCKERWORKER_BUILD_TIMEOUT"),
        "build_push": (["--build-push"], "DOCKERWORKER_BUILD_PUSH"),
        "swarm_gpu_kind": (["--swarm-gpu-kind"], "DOCKERWORKER_SWARM_GPU_KIND"),
        "log_level": (["--log-level"], "DOCKERWORKER_LOG_LEVEL"),
        "secrets_dir": (["--secrets-dir"], "DOCKERWORKER_SECRETS_DIR"),
        "runtime": (["--runtime"], "DOCKERWORKER_RUNTIME"),
        "log_format": (["--log-format"], "DOCKERWORKER_LOG_FORMAT"),
        "policy_file": (["--policy"], "DOCKERWORKER_POLICY_FILE"),
    }


@pytest.mark.parametrize(("field", "too_low", "too_high"), [
    ("poll_interval", 0.05, None),
    ("poll_interval_with_events", 0.5, None),
    ("heartbeat_interval", 0.5, None),
    ("build_timeout", 0.5, None),
    ("warm", -1, 33),
    ("limit", 0, None),
    ("health_port", -1, 65536),
])
def test_the_cli_and_the_model_share_bounds(field: str, too_low: Any, too_high: Any) -> None:
    option = _start_options()[field]
    for value in (v for v in (too_low, too_high) if v is not None):
        with pytest.raises(ValidationError):
            WorkerSettings(pool="p", **{field: value})
        with pytest.raises(click.BadParameter):
            option.type.convert(str(value), option, None)


class Started(NamedTuple):
    """What one `start` handed its worker."""

    settings: WorkerSettings
    api_patience: float  # of its API client


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Started]:
    """Run `start` up to the worker: no Docker, no server, no signal handlers."""
    seen: list[Started] = []

    class FakeWorker:
        def __init__(self, settings: WorkerSettings, api: Any, docker_client: Any) -> None:
            seen.append(Started(settings, api.patience))

        def run(self) -> int:
            return 0

    monkeypatch.setattr(cli, "Worker", FakeWorker)
    monkeypatch.setattr(cli, "connect_docker", lambda: None)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)
    monkeypatch.setattr(cli.logformat, "configure", lambda level, log_format: None)
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(key, raising=False)
    return seen


def test_flags_and_env_reach_the_settings(started: list[Started]) -> None:
    result = CliRunner().invoke(
        cli.main, ["start", "-p", "pool-a", "-q", "a", "-q", "b", "--warm", "3", "--run-once"],
        env={"DOCKERWORKER_POLL_INTERVAL": "2.5", "DOCKERWORKER_DRAIN": "1",
             "PREFECT_API_KEY": "k3y", "PIP_INDEX_URL": "https://pypi.example/simple"},
    )
    assert result.exit_code == 0, result.output
    settings = started[0].settings
    assert (settings.pool, settings.work_queues, settings.warm) == ("pool-a", ["a", "b"], 3)
    assert (settings.poll_interval, settings.drain, settings.run_once) == (2.5, True, True)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k3y"
    assert settings.pip_index_url == "https://pypi.example/simple"


def test_unset_flags_leave_the_models_defaults(started: list[Started]) -> None:
    result = CliRunner().invoke(cli.main, ["start", "-p", "pool-b"], env={})
    assert result.exit_code == 0, result.output
    assert started[0].settings.model_dump(exclude={"pool", "policy"}) == WorkerSettings(
        pool="pool-b").model_dump(exclude={"pool", "policy"})
    assert started[0].settings.api_url == DEFAULT_API_URL


def test_the_api_patience_reaches_the_client(started: list[Started]) -> None:
    """How long each call is retried: the client's default unless the operator says."""
    runner = CliRunner()
    assert runner.invoke(cli.main, ["start", "-p", "p"], env={}).exit_code == 0
    assert runner.invoke(cli.main, ["start", "-p", "p"],
                         env={"DOCKERWORKER_API_PATIENCE": "7.5"}).exit_code == 0
    assert runner.invoke(cli.main, ["start", "-p", "p", "--api-patience", "3"]).exit_code == 0
    assert [start.api_patience for start in started] == [120.0, 7.5, 3.0]
    refused = runner.invoke(cli.main, ["start", "-p", "p", "--api-patience", "0"])
    assert refused.exit_code == 2 and "--api-patience" in refused.output


def test_out_of_bounds_env_is_a_usage_error(started: list[Started]) -> None:
    result = CliRunner().invoke(cli.main, ["start", "-p", "p"], env={"DOCKERWORKER_WARM": "40"})
    assert result.exit_code == 2 and "--warm" in result.output and not started


def test_the_policy_flag_reads_the_file_into_the_settings(
    started: list[Started], tmp_path: Any
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\npids_limit = 123\n")
    result = CliRunner().invoke(cli.main, ["start", "-p", "p"],
                                env={"DOCKERWORKER_POLICY_FILE": str(policy)})
    assert result.exit_code == 0, result.output
    assert started[0].settings.policy.pids_limit == 123
    missing = CliRunner().invoke(cli.main, ["start", "-p", "p", "--policy", str(tmp_path / "no")])
    assert missing.exit_code == 2 and "--policy" in missing.output


def test_the_readme_configuration_table_names_every_flag_and_env() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("| `--")}
    for flag in flags().values():
        row = next(env for cell, env in rows.items() if cell.startswith(f"`{flag.name}`"))
        assert row == (f"`{flag.env}`" if flag.env else ""), flag.name


def test_a_compose_replica_is_named_after_its_service_and_number(monkeypatch) -> None:
    from unittest import mock

    client = mock.Mock()
    client.containers.get.return_value.labels = {
        "com.docker.compose.project": "prefect", "com.docker.compose.service": "worker",
        "com.docker.compose.container-number": "2"}
    monkeypatch.setattr(cli.socket, "gethostname", lambda: "3f2a9c")
    assert cli.compose_worker_name(client, in_container=True) == "dockerworker-prefect-worker-2"
    client.containers.get.assert_called_once_with("3f2a9c")
    assert cli.compose_worker_name(client, in_container=False) is None
    client.containers.get.return_value.labels = {}  # a container, not compose's
    assert cli.compose_worker_name(client, in_container=True) is None


def test_the_default_name_is_dockerworker_and_the_hostname(monkeypatch) -> None:
    """Stable across restarts: a restarted worker knows its containers again by it."""
    from dockerworker import settings as settings_module

    monkeypatch.setattr(settings_module.socket, "gethostname", lambda: "etl-host-1")
    settings = settings_module.WorkerSettings.model_validate(
        {"pool": "p", "api_url": "http://127.0.0.1:4200/api"})
    assert settings.name == "dockerworker-etl-host-1"


@pytest.mark.parametrize(("given", "kept"), [
    ("registry.example.com", "registry.example.com"),
    ("127.0.0.1:5000/", "127.0.0.1:5000"),
    ("registry.example.com:443/team/flows", "registry.example.com:443/team/flows"),
    ("  ", None),
])
def test_the_push_registry_is_a_prefix_of_image_names(given: str, kept: str | None) -> None:
    settings = WorkerSettings(pool="p", build_push=given)
    assert settings.build_push == kept and settings.build_options().push == kept


@pytest.mark.parametrize("given", ["https://registry.example.com", "registry:5000/Team",
                                   "registry/flows:1", "user@registry", "a b"])
def test_a_push_registry_that_no_image_name_could_start_with_is_refused(given: str) -> None:
    with pytest.raises(ValidationError, match="host\\[:port\\]\\[/path\\]"):
        WorkerSettings(pool="p", build_push=given)


def test_the_swarm_gpu_kind_is_a_resource_name() -> None:
    assert WorkerSettings(pool="p").swarm_gpu_kind == "NVIDIA-GPU"
    assert WorkerSettings(pool="p", swarm_gpu_kind="gpu").swarm_gpu_kind == "gpu"
    with pytest.raises(ValidationError):
        WorkerSettings(pool="p", swarm_gpu_kind="NVIDIA GPU=1")
