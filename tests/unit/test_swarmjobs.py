"""`--runtime swarm`: a run's container settings as a Swarm job, what a job cannot be, how
its tasks tell its end, and its polled output shipped once."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from itertools import chain, repeat
from types import SimpleNamespace

import docker.errors
import pytest
import requests
from pydantic import ValidationError

from dockerworker.api import FlowRun, State, StateType, WorkPool
from dockerworker.containers import (
    LABEL_FLOW_RUN_ID,
    ContainerSpec,
    ExitReport,
    build_spec,
    gpu_request,
)
from dockerworker.entry import LABEL_CONTROL, SECRETS_ENV, SECRETS_MOUNTED_ENV
from dockerworker.jobs import JobVariables
from dockerworker.logs import LogShipper, ResumePoint, RunOutput
from dockerworker.ownership import Claim
from dockerworker.policy import Policy
from dockerworker.resources import Seen, resource_line
from dockerworker.runtime import EngineError, WorkloadGone
from dockerworker.settings import WorkerSettings
from dockerworker.swarmjobs import (
    CANCEL_SIGNAL,
    ONCE_ENV,
    SwarmJobs,
    _secret_ids,
    main_task,
    orphan_secrets,
    run_secret_name,
    secret_owner,
    service_kwargs,
    service_name,
    task_exit,
)

from .fakes import FakeAPI, FakeRuntime, Script, make_worker, settle

BASE = {"image": "flows:1", "command": ["python", "-c", "x"], "stdin_open": True,
        "environment": {"PREFECT__FLOW_RUN_ID": "r1"}, "init": True,
        "labels": {LABEL_CONTROL: "stdin", "io.prefect.flow-run-id": "r1"}}


def test_a_container_spec_becomes_a_one_shot_job() -> None:
    kwargs = service_kwargs("etl-run-1234abcd", {**BASE, "mem_limit": "512m",
                                                 "network_mode": "host",
                                                 "volumes": ["/srv/data:/data:ro", "cache:/c"]},
                            job_cpus=1.5, placement=["node.labels.tier==batch"],
                            stop_timeout=20, extra_networks=["prefect"])
    assert kwargs["mode"] == {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
    assert kwargs["restart_policy"]["Condition"] == "none"
    assert kwargs["args"] == ["python", "-c", "x"]  # the image's entrypoint stays
    assert "PREFECT__FLOW_RUN_ID=r1" in kwargs["env"]
    assert kwargs["networks"] == ["host", "prefect"]
    assert kwargs["constraints"] == ["node.labels.tier==batch"]
    resources = kwargs["resources"]
    assert resources["Limits"] == {"NanoCPUs": 1_500_000_000, "MemoryBytes": 512 * 1024**2}
    assert resources["Reservations"] == resources["Limits"]
    assert kwargs["stop_grace_period"] == 20 * 10**9
    assert kwargs["stop_signal"] == CANCEL_SIGNAL  # the entry script's cancel request
    assert "DOCKERWORKER_WATCH_CANCEL=2" in kwargs["env"]
    assert kwargs["labels"][LABEL_CONTROL] == "signal"
    assert kwargs["container_labels"]["io.prefect.flow-run-id"] == "r1"
    (data, cache) = kwargs["mounts"]
    assert (data["Type"], data["Source"], data["Target"], data["ReadOnly"]) == (
        "bind", "/srv/data", "/data", True)
    assert (cache["Type"], cache["Source"]) == ("volume", "cache")


def test_the_policy_s_limits_carry_over() -> None:
    kwargs = service_kwargs("x", {**BASE, "pids_limit": 512, "nano_cpus": 500_000_000},
                            None, [], 30, [])
    assert kwargs["resources"]["Limits"] == {"NanoCPUs": 500_000_000, "Pids": 512}


def test_a_gpu_count_is_a_reservation_of_the_operator_s_generic_resource() -> None:
    """`gpus: 2` (a device request of count 2, as build_spec makes it) reserves two of the
    kind: Swarm places the job where that many are free."""
    request = gpu_request(2)
    kwargs = service_kwargs("x", {**BASE, "device_requests": [request]}, None, [], 30, [])
    assert kwargs["resources"]["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}]
    own = service_kwargs("x", {**BASE, "device_requests": [gpu_request(1)]}, None, [], 30, [],
                         gpu_kind="gpu")
    assert own["resources"]["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "gpu", "Value": 1}}]
    assert "Reservations" not in service_kwargs("x", BASE, None, [], 30, [])["resources"]
    with pytest.raises(EngineError, match='"all"'):
        service_kwargs("x", {**BASE, "device_requests": [gpu_request("all")]}, None, [], 30, [])


def test_a_command_given_as_a_string_is_split_as_the_engine_splits_it() -> None:
    """A container takes `command: "sh -c 'echo hi'"`; a service takes only a list (the
    engine answered "cannot unmarshal string into ... Args of type []string")."""
    given = {**BASE, "command": "sh -c 'echo a b'"}
    assert service_kwargs("x", given, None, [], 30, [])["args"] == ["sh", "-c", "echo a b"]
    listed = {**BASE, "command": ["python", "-m", "x"]}
    assert service_kwargs("x", listed, None, [], 30, [])["args"] == ["python", "-m", "x"]


def test_a_job_s_own_command_is_stopped_with_sigterm() -> None:
    kwargs = service_kwargs("x", {**BASE, "labels": {}}, None, [], 30, [])
    assert kwargs["stop_signal"] is None and LABEL_CONTROL not in kwargs["labels"]


@pytest.mark.parametrize(("extra", "reason"), [
    ({"privileged": True}, "cannot run privileged"),
    ({"device_requests": [{"Count": -1, "Capabilities": [["gpu"]]}]},
     'gpus: "all" cannot be a Swarm reservation'),
    ({"device_requests": [{"DeviceIDs": ["0", "2"], "Capabilities": [["gpu"]]}]},
     "by count, not by device id"),
    ({"device_requests": [{"Count": 1, "Capabilities": [["tpu"]]}]}, "no device requests"),
    ({"memswap_limit": "1g"}, "no swap limit"),
    ({"network_mode": "container:db"}, "cannot join 'container:db'"),
    ({"shm_size": "1g"}, "cannot take container_create_kwargs ['shm_size']"),
    ({"extra_hosts": {"host.docker.internal": "host-gateway"}}, "cannot use host-gateway"),
    ({"security_opt": ["no-new-privileges:true"]}, "set `no_new_privileges = false`"),
    ({"security_opt": ["seccomp=unconfined"]}, "take no security_opt"),
])
def test_what_a_service_cannot_be_is_refused_with_the_reason(extra, reason) -> None:
    with pytest.raises(EngineError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        service_kwargs("x", {**BASE, **extra}, None, [], 30, [])


def test_service_names_stay_within_swarm_s_limit_and_keep_the_short_id() -> None:
    name = "a" * 60 + "-1234abcd"
    assert len(service_name(name)) == 63 and service_name(name).endswith("-1234abcd")
    assert service_name("short-1234abcd") == "short-1234abcd"


def task(state: str, at: str, exit_code: int | None = None, err: str = "",
         container: str = "") -> dict:
    status: dict = {"State": state, "Timestamp": at, "Err": err}
    if container or exit_code is not None:
        status["ContainerStatus"] = {"ContainerID": container or "c1", "ExitCode": exit_code}
    return {"Status": status, "Spec": {"ContainerSpec": {"Image": "flows:1@sha256:abc"}}}


def test_the_task_that_tells_is_the_running_one_else_the_latest_that_ran() -> None:
    duplicate = task("complete", "2026-11-30T10:00:05Z", 0, container="c2")
    original = task("running", "2026-11-30T10:00:01Z", container="c1")
    assert main_task([duplicate, original]) is original
    pending = task("pending", "2026-11-30T10:00:09Z", err="no suitable node")
    failed = task("failed", "2026-11-30T10:00:03Z", 1, container="c1")
    assert main_task([pending, failed]) is failed
    assert main_task([pending]) is pending and main_task([]) is None


def test_a_task_s_end_reads_as_a_container_s() -> None:
    done = task_exit(task("complete", "2026-11-30T10:00:05.5Z", 0), None)
    assert (done.exit_code, done.oom_killed, done.error, done.image) == (0, False, "", "flows:1")
    oom = task_exit(task("failed", "2026-11-30T10:00:05Z", 137, err="task: non-zero exit (137)"),
                    256 * 1024**2)
    assert oom.oom_killed and oom.describe("256m").startswith("killed: out of memory")
    failed = task_exit(task("failed", "2026-11-30T10:00:05Z", 1, err="task: non-zero exit (1)"),
                       None)
    # Swarm's Err only restates the code: the run's message says "exited with code 1", as a
    # container's does, not "Docker reported an error: task: non-zero exit (1)"
    assert failed.exit_code == 1 and failed.error == ""
    assert failed.describe(None) == "exited with code 1"
    rejected = task_exit(task("rejected", "2026-11-30T10:00:05Z", err="No such image: x"), None)
    assert rejected.exit_code == -1 and rejected.error == "No such image: x"
    orphaned = task_exit(task("orphaned", "2026-11-30T10:00:05Z", err="node is down"), None)
    assert rejected.by_infrastructure and orphaned.by_infrastructure  # the cluster's doing
    assert not (failed.by_infrastructure or oom.by_infrastructure or done.by_infrastructure)
    with pytest.raises(WorkloadGone):
        task_exit(None, None)


def test_polled_output_is_shipped_once_each_line(api: FakeAPI) -> None:
    """Each poll re-reads from `since` (whole seconds): what was shipped is not shipped again;
    after the end, one last read; with a resume point, nothing up to it."""
    shipper = LogShipper(api).start()
    run_id = uuid.uuid4()
    output = RunOutput(shipper, run_id, max_bytes=10**6)
    out = [b"2026-11-30T10:00:01.100000000Z one", b"2026-11-30T10:00:01.200000000Z two",
           b"2026-11-30T10:00:02.000000000Z three"]
    # the last line shows up only after the end (the engine's logs lag): read on until a
    # read brings nothing new
    polls = chain([out[:1], out[:2], out[:2]], repeat(out))
    ended = chain([False, False], repeat(True))

    def read(stream: str, since: datetime | None) -> bytes:
        if stream == "stderr":
            return b""
        return b"\n".join(next(polls))

    output.follow_polled(read, lambda: next(ended), interval=0)
    assert shipper.flush(5)
    assert api.messages(run_id) == ["one", "two", "three"]

    other = uuid.uuid4()
    resumed = RunOutput(shipper, other, max_bytes=10**6)
    point = ResumePoint(tails={}, newest={"stdout": datetime(2026, 11, 30, 10, 0, 1, 150000,
                                                              tzinfo=UTC)})
    resumed.follow_polled(lambda s, since: b"\n".join(out) if s == "stdout" else b"",
                          lambda: True, point, interval=0)
    assert shipper.flush(5)
    assert api.messages(other) == ["two", "three"]
    shipper.stop()


def test_polling_stops_when_asked(api: FakeAPI) -> None:
    output = RunOutput(LogShipper(api), uuid.uuid4(), max_bytes=10**6)
    threading.Timer(0.2, output.stop).start()
    output.follow_polled(lambda s, since: b"", lambda: False, interval=0.05)
    assert output.stopped


def test_a_swarm_worker_starts_only_with_a_policy_that_does_without_no_new_privileges() -> None:
    """Refused at start (a usage error), not on every run."""
    with pytest.raises(ValidationError, match="set `no_new_privileges = false`"):
        WorkerSettings(pool="p", runtime="swarm")
    settings = WorkerSettings(pool="p", runtime="swarm", policy=Policy(no_new_privileges=False))
    assert settings.runtime == "swarm"


def test_a_swarm_job_s_resource_line_says_usage_is_not_read_there() -> None:
    """#17: the manager has no stats of a task on another node; the line must not blame the
    run's brevity (resources.resource_line)."""
    unread = SwarmJobs(client=None).unread_usage()  # type: ignore[arg-type]
    assert unread is not None
    line = resource_line(ExitReport(0, False, ""), Seen(), unread=unread)
    assert line.endswith("; memory and CPU are not read for Swarm jobs (the task's node has them)")
    assert "ended before" not in line


# --- flow secrets as Swarm secrets ---------------------------------------------------------------
def _secret_spec(**job: object) -> dict:
    run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4())
    pool = WorkPool(id=uuid.uuid4(), name="p", type="docker")
    return build_spec(JobVariables(secrets=["db_password"], **job), flow_run=run,
                      deployment=None, flow=None, pool=pool, worker_name="w",
                      api_url="http://prefect:4200/api", auth_env={}).create_kwargs


def test_a_job_with_secrets_has_swarm_mount_them_and_the_script_wait_for_nothing() -> None:
    kwargs = service_kwargs("x", _secret_spec(), None, [], 30, [], mounted_secrets=True)
    env = dict(item.split("=", 1) for item in kwargs["env"])
    assert env[SECRETS_MOUNTED_ENV] == "1"  # no stdin on Swarm: the files are there already
    assert env[SECRETS_ENV] == "db_password"  # the names only (an adopting worker masks them)
    assert "mounts" not in kwargs or not [m for m in kwargs["mounts"] if m["Type"] == "tmpfs"]
    # the container runtime's tmpfs at /run/secrets is not made; any other tmpfs still refused
    with pytest.raises(EngineError, match="tmpfs"):
        service_kwargs("x", _secret_spec(), None, [], 30, [])
    with pytest.raises(EngineError, match="tmpfs mounts are not given to Swarm jobs"):
        service_kwargs("x", _secret_spec(container_create_kwargs={"tmpfs": {"/t": ""}}),
                       None, [], 30, [], mounted_secrets=True)
    plain = service_kwargs("x", BASE, None, [], 30, [])
    assert not any(item.startswith(SECRETS_MOUNTED_ENV) for item in plain["env"])


@pytest.mark.parametrize(("user", "owner"), [
    (None, ("0", "0")), ("", ("0", "0")), ("root", ("0", "0")), ("1000", ("1000", "0")),
    ("1000:1001", ("1000", "1001")), ("0:root", ("0", "0")),
])
def test_secret_files_belong_to_the_container_s_user_by_number(user, owner) -> None:
    assert secret_owner(user) == owner


@pytest.mark.parametrize("user", ["prefect", "1000:staff", "../1"])
def test_a_user_by_name_is_refused_rather_than_given_files_it_cannot_read(user) -> None:
    with pytest.raises(EngineError, match="by number"):
        secret_owner(user)


def test_run_secret_names_are_unique_within_swarm_s_limit() -> None:
    run_id = str(uuid.uuid4())
    short = run_secret_name(run_id, 0, "db_password")
    assert short.startswith(f"dw-{run_id.replace('-', '')[:12]}-") and short.endswith(
        "-0-db_password")
    assert run_secret_name(run_id, 0, "db_password") != short  # a retried run: new names
    long = run_secret_name(run_id, 1, "x" * 128)
    assert len(long) == 64 and "-1-x" in long


def test_orphans_are_old_run_secrets_no_service_refers_to() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    found = [{"ID": "in-use", "CreatedAt": "2026-11-30T11:00:00.123456789Z"},
             {"ID": "orphan", "CreatedAt": "2026-11-30T11:50:00Z"},
             {"ID": "young", "CreatedAt": "2026-11-30T11:59:00Z"},  # its job is being made
             {"ID": "no-time"}]
    assert orphan_secrets(found, {"in-use"}, now) == ["orphan"]


def test_a_swarm_worker_removes_a_job_given_secrets_when_it_ends(
        api: FakeAPI, runtime: FakeRuntime, tmp_path) -> None:
    """Swarm keeps a secret while a service refers to it, and updating a job's service runs
    it again: a job with secrets is removed once it ends (auto_remove), its secrets with it."""
    (tmp_path / "db_password").write_text("pg-value")
    specs: dict[str, object] = {}
    runtime.script_for = lambda spec: specs.setdefault(spec.name, spec) and Script()
    worker = make_worker(api, runtime, secrets_dir=tmp_path, runtime="swarm",
                         policy=Policy(no_new_privileges=False, allowed_secrets=["db_*"]))
    with_secrets = api.add_run("secretive", job_variables={"secrets": ["db_password"]})
    api.add_run("plain")
    worker.poll()
    settle(worker)
    assert worker.shipper.flush(5)
    (secretive,) = [s for s in specs.values() if s.name.startswith("secretive")]
    (plain,) = [s for s in specs.values() if s.name.startswith("plain")]
    removed = {name for call, name in runtime.calls if call == "remove"}
    assert secretive.name in removed and plain.name not in removed
    assert secretive.create_kwargs["labels"]["io.dockerworker.auto-remove"] == "true"
    assert secretive.create_kwargs["labels"][LABEL_FLOW_RUN_ID] == str(with_secrets.id)
    assert secretive.secret_files == {"db_password": b"pg-value"}
    assert any("removed when it ends" in m for m in api.messages(with_secrets.id))


def _refused(why: str) -> docker.errors.APIError:
    """The engine's answer 400 (a refusal, not its absence)."""
    response = requests.Response()
    response.status_code = 400
    return docker.errors.APIError(why, response=response, explanation=why)


class _Obj:
    """A docker-py model: an id and its attrs."""

    def __init__(self, id_: str, attrs: dict, on_remove=None) -> None:
        self.id, self.attrs, self.name = id_, attrs, attrs.get("Spec", {}).get("Name", id_)
        self._on_remove = on_remove

    def reload(self) -> None:
        pass

    def remove(self) -> None:
        self._on_remove(self.id)


class FakeSwarmClient:
    """The calls SwarmJobs makes for secrets, over dicts; a secret a service refers to cannot
    be removed (as Swarm's "secret is in use")."""

    def __init__(self, image_user: str = "") -> None:
        self.secret_store: dict[str, dict] = {}
        self.service_store: dict[str, dict] = {}
        self.fail_create: Exception | None = None
        self.image_user = image_user
        self.api = SimpleNamespace(secrets=self.secrets_list, services=self.services_list,
                                   remove_secret=self.remove_secret)
        self.secrets = type("S", (), {"create": self._create_secret})()
        self.services = type("V", (), {"create": self._create_service,
                                       "get": self._get_service})()
        self.images = type("I", (), {"get": lambda _, image: _Obj(
            image, {"Config": {"User": self.image_user}})})()
        self.configs = type("C", (), {"list": lambda _, filters: []})()
        self.swarm = SimpleNamespace(attrs={"ID": "c1"})

    def _create_secret(self, name: str, data: bytes, labels: dict) -> _Obj:
        secret_id = uuid.uuid4().hex
        self.secret_store[secret_id] = {"ID": secret_id, "CreatedAt": "2026-01-01T10:00:00Z",
                                        "Spec": {"Name": name, "Labels": labels},
                                        "data": data}
        return _Obj(secret_id, self.secret_store[secret_id])

    def _create_service(self, **kwargs: object) -> _Obj:
        if self.fail_create is not None:
            raise self.fail_create
        service_id = uuid.uuid4().hex
        self.service_store[service_id] = {"ID": service_id, "Spec": {
            "Name": kwargs["name"], "Labels": kwargs.get("labels") or {},
            "TaskTemplate": {"ContainerSpec": {"Env": kwargs.get("env"),
                                               "Secrets": kwargs.get("secrets")}}}}
        return self._get_service(service_id)

    def _get_service(self, service_id: str) -> _Obj:
        if service_id not in self.service_store:
            raise docker.errors.NotFound("no such service")
        return _Obj(service_id, self.service_store[service_id],
                    lambda i: self.service_store.pop(i))

    # client.api's
    def remove_secret(self, secret_id: str) -> None:
        if secret_id not in self.secret_store:
            raise docker.errors.NotFound("no such secret")
        if any(secret_id in _secret_ids(s) for s in self.service_store.values()):
            raise _refused("secret is in use")
        del self.secret_store[secret_id]

    def secrets_list(self, filters: dict) -> list[dict]:
        wanted = dict(item.split("=", 1) for item in filters["label"])
        return [s for s in self.secret_store.values()
                if all(s["Spec"]["Labels"].get(k) == v for k, v in wanted.items())]

    def services_list(self, filters: dict) -> list[dict]:
        return list(self.service_store.values())


def _swarm(client: FakeSwarmClient) -> SwarmJobs:
    return SwarmJobs(client)  # type: ignore[arg-type]


def _run_spec(user: str | None = None) -> ContainerSpec:
    run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4())
    pool = WorkPool(id=uuid.uuid4(), name="p", type="docker")
    spec = build_spec(JobVariables(image="flows:1", secrets=["db_password", "api_key"],
                                   network_mode="host", container_create_kwargs=(
                                       {"user": user} if user else {})),
                      flow_run=run, deployment=None, flow=None, pool=pool, worker_name="w",
                      api_url="http://prefect:4200/api", auth_env={})
    spec.secret_files = {"db_password": b"pg-value", "api_key": b"key-value"}
    return spec


def test_a_job_s_secrets_are_made_referenced_and_removed_with_its_service() -> None:
    client = FakeSwarmClient(image_user="1000")
    swarm = _swarm(client)
    workload = swarm.start(_run_spec())
    labels = {s["Spec"]["Name"]: s["Spec"]["Labels"] for s in client.secret_store.values()}
    assert len(labels) == 2 and {v["data"] for v in client.secret_store.values()} == {
        b"pg-value", b"key-value"}
    assert all(label[LABEL_FLOW_RUN_ID] == workload.labels[LABEL_FLOW_RUN_ID]
               and label["io.prefect.work-pool-name"] == "p" for label in labels.values())
    refs = client.service_store[workload.id]["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]
    assert sorted(r["File"]["Name"] for r in refs) == ["api_key", "db_password"]
    assert {(r["File"]["UID"], r["File"]["Mode"]) for r in refs} == {("1000", 0o400)}  # image's
    assert "pg-value" not in repr(client.service_store)
    assert swarm._forget_secrets("p") is None and len(client.secret_store) == 2  # in use
    swarm.remove(workload)
    assert client.service_store == {} and client.secret_store == {}
    swarm.remove(workload)  # gone already: fine


def test_a_job_carries_the_claim_it_was_made_under_for_its_entry_script_to_check() -> None:
    """The entry script runs the flow only while the run is PENDING under exactly this claim
    (entry_script.refuse_a_duplicate): the worker's and the Swarm's, as runs.claim sets it."""
    client = FakeSwarmClient(image_user="1000")
    workload = _swarm(client).start(_run_spec())
    env = client.service_store[workload.id]["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"]
    claim = Claim("w", "swarm-c1")
    assert f"{ONCE_ENV}={claim.message}" in env
    assert Claim.of(State(type=StateType.PENDING, message=claim.message)) == claim


def test_the_job_s_own_user_wins_and_one_by_name_is_refused_before_any_secret() -> None:
    client = FakeSwarmClient(image_user="1000")
    workload = _swarm(client).start(_run_spec(user="2000:2000"))
    refs = client.service_store[workload.id]["Spec"]["TaskTemplate"]["ContainerSpec"]["Secrets"]
    assert {(r["File"]["UID"], r["File"]["GID"]) for r in refs} == {("2000", "2000")}
    named = FakeSwarmClient(image_user="prefect")
    with pytest.raises(EngineError, match="by number"):
        _swarm(named).start(_run_spec())
    assert named.secret_store == {} and named.service_store == {}


def test_secrets_made_for_a_service_that_could_not_be_made_are_removed() -> None:
    client = FakeSwarmClient()
    client.fail_create = _refused("network x not found")
    with pytest.raises(EngineError, match="network x not found"):
        _swarm(client).start(_run_spec())
    assert client.secret_store == {}


def test_the_removal_round_removes_old_secrets_of_services_that_are_gone() -> None:
    client = FakeSwarmClient()
    swarm = _swarm(client)
    kept = swarm.start(_run_spec())
    gone = swarm.start(_run_spec())
    client.service_store.pop(gone.id)  # `docker service rm` by hand: its secrets stay behind
    assert swarm.forget_owners("p", {kept.id}) == 0
    left = {ref for s in client.service_store.values() for ref in _secret_ids(s)}
    assert set(client.secret_store) == left and len(left) == 2
    young = swarm.start(_run_spec())
    first, _ = _secret_ids(client.service_store.pop(young.id))
    client.secret_store[first]["CreatedAt"] = datetime.now(UTC).isoformat()  # being made now?
    swarm.forget_owners("p", {kept.id})
    assert set(client.secret_store) == left | {first}
