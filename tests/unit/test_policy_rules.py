"""The operator's policy: refusals name the variable and the rule; hardening; masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockerworker import builds, hostview
from dockerworker.jobs import JobVariables
from dockerworker.policy import Masker, Policy, PolicyError

DEFAULT = Policy()


def refused(job: JobVariables, policy: Policy = DEFAULT) -> str:
    return "; ".join(policy.violations(job))


def test_a_plain_job_passes_the_default_policy() -> None:
    job = JobVariables(image="dockerworker-test/flows:dev", volumes=["/scratch"],
                       networks=["backend"], container_create_kwargs={"cpu_shares": 2})
    assert DEFAULT.violations(job) == []


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (JobVariables(privileged=True), "privileged: privileged containers are not allowed"),
        (JobVariables(volumes=["/:/host"]), "volumes[0]: host path / is not under an allowed prefix"),
        (JobVariables(network_mode="host"), "network_mode: 'host' is not allowed"),
        (JobVariables(network_mode="container:abc"), "network_mode: 'container:abc'"),
        (JobVariables(container_create_kwargs={"cap_add": ["SYS_ADMIN"]}),
         "container_create_kwargs.cap_add: not allowed"),
        (JobVariables(container_create_kwargs={"devices": ["/dev/sda"]}),
         "container_create_kwargs.devices"),
        (JobVariables(container_create_kwargs={"security_opt": ["apparmor=unconfined"]}),
         "container_create_kwargs.security_opt"),
    ],
)
def test_each_refusal_names_variable_and_rule(job: JobVariables, expected: str) -> None:
    assert expected in refused(job)


def test_the_docker_socket_is_never_mounted_even_under_an_allowed_prefix() -> None:
    policy = Policy(allowed_volume_prefixes=["/var", "/srv"])
    assert refused(JobVariables(volumes=["/srv/data:/data"]), policy) == ""
    assert "Docker socket" in refused(JobVariables(volumes=["/var/run/docker.sock:/s"]), policy)
    assert "Docker socket" in refused(JobVariables(volumes=["/var/run:/r"]), policy)
    assert "not under an allowed prefix" in refused(JobVariables(volumes=["/srvx:/x"]), policy)
    relaxed = Policy(allowed_volume_prefixes=["/"], allow_docker_socket=True)
    assert refused(JobVariables(volumes=["/:/host"]), relaxed) == ""


def test_images_by_registry_glob() -> None:
    policy = Policy(allowed_images=["docker.io/library/*", "registry.internal/*"])
    assert refused(JobVariables(image="python:3.12"), policy) == ""
    assert refused(JobVariables(image="registry.internal/team/flow:1"), policy) == ""
    assert "image: 'evil.example/x:1' is not an allowed image" in refused(
        JobVariables(image="evil.example/x:1"), policy)
    assert "is not an allowed image" in refused(JobVariables(image="someone/else:1"), policy)


def test_no_job_names_the_worker_s_own_images_whatever_allowed_images_says() -> None:
    """Another deployment's dependency build holds its private packages; the helper image
    is what the worker's path checks create containers from."""
    own = "dockerworker.invalid/etl-nightly:0123456789abcdef"
    everything = Policy(allowed_images=["*"], allow_dockerfile_lines=True)
    for job in (JobVariables(image=own), JobVariables(image="DockerWorker.invalid/void:1"),
                JobVariables(image="python:3.12", dockerfile_lines=[f"FROM {own} AS deps"])):
        assert "is one of the worker's own images" in refused(job, everything), job
    assert refused(JobVariables(image="dockerworker/flows:1"), everything) == ""


def test_the_worker_s_own_images_are_where_no_pull_reaches() -> None:
    """Under Docker Hub's `dockerworker/`, a job pulling that name with image_pull_policy
    Always would replace another deployment's build (or the helper image) for everyone."""
    assert builds.repository_for("etl-nightly").startswith("dockerworker.invalid/")
    assert hostview.VOID_IMAGE.startswith("dockerworker.invalid/")
    assert builds.pushed_name("registry.internal:5000", "dockerworker.invalid/etl:k") == (
        "registry.internal:5000/dockerworker/etl:k")


def test_kwargs_on_the_safe_list_cannot_reach_the_host_s_scheduling() -> None:
    """ulimits and healthcheck are on the default safe list; the values that would starve
    the host (real-time priority, as the refused cpu_rt_* would; probes the engine runs back
    to back) are refused in either spelling docker-py takes (found by an audit)."""
    def kwargs(**create: object) -> JobVariables:
        return JobVariables(container_create_kwargs=create)

    for limit in ({"name": "rtprio", "soft": 99, "hard": 99}, {"Name": "RTTIME"},
                  {"name": "nice", "soft": 40, "hard": 40}, "rtprio=99", {}):
        assert "is refused: a ulimit must be one of" in refused(kwargs(ulimits=[limit])), limit
    fine = [{"name": "nofile", "soft": 65536, "hard": 65536}, {"Name": "nproc", "Hard": 512}]
    assert refused(kwargs(ulimits=fine)) == ""
    for check in ({"test": ["CMD", "true"], "interval": 1_000_000},
                  {"Test": ["CMD", "true"], "StartInterval": 10},
                  {"test": ["CMD", "true"], "timeout": "1ms"}, ["CMD", "true"]):
        assert "container_create_kwargs.healthcheck: " in refused(kwargs(healthcheck=check))
    assert refused(kwargs(healthcheck={"test": ["CMD", "true"], "interval": 5 * 10**9,
                                       "timeout": 0, "retries": 3})) == ""


def test_hardened_defaults_fill_what_the_job_left_open() -> None:
    policy = Policy(default_mem_limit="512m", default_cpus=1.5, pids_limit=100)
    hardened = policy.harden({"pids_limit": 10_000})
    assert hardened["security_opt"] == ["no-new-privileges:true"]
    assert hardened["pids_limit"] == 100
    assert hardened["mem_limit"] == "512m" and hardened["nano_cpus"] == 1_500_000_000
    assert policy.harden({"mem_limit": "64m", "pids_limit": 50})["pids_limit"] == 50
    assert "security_opt" not in Policy(no_new_privileges=False).harden({})


def test_memory_and_cpu_defaults_are_defaults_not_ceilings() -> None:
    """docs/security.md: a job's own memory or CPU setting replaces the policy's default."""
    policy = Policy(default_mem_limit="512m", default_cpus=1.5)
    assert policy.harden({"mem_limit": "4g"})["mem_limit"] == "4g"
    assert policy.harden({"nano_cpus": 3_000_000_000})["nano_cpus"] == 3_000_000_000
    assert "nano_cpus" not in policy.harden({"cpu_quota": -1})


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[policy]\nallow_privileged = true\nallowed_network_modes = ["host"]\n')
    policy = Policy.load(path)
    assert policy.allow_privileged and policy.allowed_network_modes == ["host"]
    path.write_text("[policy]\nallow_everything = true\n")
    with pytest.raises(PolicyError, match="allow_everything"):
        Policy.load(path)


def test_masker_hides_secret_values() -> None:
    mask = Masker.for_env(
        {"DB_PASSWORD": "hunter22", "PREFECT_API_AUTH_STRING": "admin:s3cr3t!", "NAME": "bob1"},
        {"pk_live_abcdef"},
    )
    text = mask("pw hunter22 auth admin:s3cr3t! alone s3cr3t! key pk_live_abcdef name bob1")
    assert text == "pw *** auth *** alone *** key *** name bob1"


def test_gpus_need_the_policy_and_map_to_device_requests() -> None:
    from dockerworker.containers import gpu_request

    assert "gpus: GPU access ('all') is not allowed (allow_gpus)" in refused(JobVariables(gpus="all"))
    assert refused(JobVariables(gpus=2), Policy(allow_gpus=True)) == ""
    assert gpu_request("all")["Count"] == -1 and gpu_request(2)["Count"] == 2
    assert gpu_request(["0", "3"])["DeviceIDs"] == ["0", "3"]
    assert gpu_request(1)["Capabilities"] == [["gpu"]]
    with pytest.raises(ValueError, match="not \"all\", a count or a list"):
        JobVariables(gpus="some")
