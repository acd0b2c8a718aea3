"""Starting runs (issue 8): warm containers that imported Prefect before their run was claimed,
and admission control (not more runs starting at once than --max-starting)."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

from testrig.faultproxy import HOLD, FaultProxy
from testrig.prefect_rig import LOCAL_BASE, POOL_LABEL, PrefectRig, PrefectServer, log_messages

from dockerworker.entry import READY_LINE

WARM_LABEL = "io.dockerworker.warm"


def warm_containers(docker_client, pool: str, waiting: bool | None = None) -> list:
    found = docker_client.containers.list(
        all=True, sparse=True, filters={"label": [f"{POOL_LABEL}={pool}", WARM_LABEL]}
    )
    if waiting is None:
        return found
    return [c for c in found
            if c.attrs["Names"][0].lstrip("/").startswith("dockerworker-warm-") == waiting]


def wait_for_waiting(docker_client, pool: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while True:
        running = [c for c in warm_containers(docker_client, pool, waiting=True)
                   if c.status == "running"]
        if running:
            return running[0]
        assert time.monotonic() < deadline, "no warm container was started"
        time.sleep(0.3)


def test_a_warm_container_serves_the_next_run_with_its_own_parameters(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    worker = start_worker(unique_pool, "--warm", "1")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    first = rig.wait_for_final(rig.create_flow_run(deployment), timeout=90)
    assert first["state"]["type"] == "COMPLETED", first["state"]
    waiting = wait_for_waiting(docker_client, unique_pool)
    # the worker hears it has imported Prefect (the head start); from its own output
    name = waiting.attrs["Names"][0].lstrip("/")
    worker.wait_for_output(f"warm container {name} is ready", timeout=60)

    run_id = rig.create_flow_run(deployment, parameters={"name": "warm"})
    run = rig.wait_for_final(run_id, timeout=60)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["infrastructure_pid"].endswith(":" + waiting.id)
    rig.wait_for_log(run_id, "hello, warm")  # the flow's own print, shipped by the worker
    messages = log_messages(rig.read_logs(run_id))
    assert any("took over the run" in m for m in messages), messages
    assert any(m.startswith(READY_LINE) for m in messages), messages  # its boot, shipped
    served = docker_client.containers.get(waiting.id)
    assert not served.name.startswith("dockerworker-warm-")  # renamed after the run
    # its run's whole id: what tells a restarted worker which run it serves (warm.serves)
    assert served.name.startswith(run["name"][:30]) and served.name.endswith(
        "-" + run_id.replace("-", "")), served.name
    assert served.attrs["State"]["ExitCode"] == 0
    assert served.attrs["HostConfig"]["CpuShares"] == 1024  # waiting at 2, the run at the default

    wait_for_waiting(docker_client, unique_pool)  # a replacement for the next run
    worker.stop()
    assert warm_containers(docker_client, unique_pool, waiting=True) == []


def test_a_run_scheduled_ahead_starts_warm_though_first_of_its_configuration(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    """Without warming ahead the first run of a configuration is cold: here the worker sees
    the run before it is due, warms for it without claiming it, and hands it that container."""
    worker = start_worker(unique_pool, "--warm", "1")
    worker.wait_for_output("subscribed to the server's flow-run events", timeout=30)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    due = datetime.now(UTC) + timedelta(seconds=25)  # claimed 10 s ahead (--prefetch-seconds)
    run_id = rig.create_flow_run_due(deployment, due, parameters={"name": "ahead"})
    waiting = wait_for_waiting(docker_client, unique_pool, timeout=10)
    assert rig.read_flow_run(run_id)["state"]["type"] == "SCHEDULED"  # warmed, not claimed

    run = rig.wait_for_final(run_id, timeout=90)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["infrastructure_pid"].endswith(":" + waiting.id)
    rig.wait_for_log(run_id, "hello, ahead")
    messages = log_messages(rig.read_logs(run_id))
    assert any("took over the run" in m for m in messages), messages
    assert (due - rig.claimed_at(run_id)).total_seconds() < 12  # at its prefetch time, not when warmed


def test_runs_due_later_never_crowd_out_a_due_run_of_a_lower_priority_queue(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    """The server orders a poll by queue priority before time: had warming ahead widened the
    claiming poll, its limit (one start at a time here) would hold the urgent queue's runs due
    later, and the default queue's run due now would wait until they fell due (~35 s)."""
    rig.create_work_pool(unique_pool)
    rig.create_work_queue(unique_pool, "urgent", priority=1)
    urgent = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image},
                                   work_queue_name="urgent")
    later = datetime.now(UTC) + timedelta(seconds=45)
    for _ in range(3):
        rig.create_flow_run_due(urgent, later)
    # one run at a time by --limit, not --max-starting: another test's containers starting on
    # this engine meanwhile would count against a start bound (admission.py)
    start_worker(unique_pool, "--warm", "1", "--limit", "1", "--max-starting", "0")
    normal = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    created = time.monotonic()
    run_id = rig.create_flow_run(normal)
    rig.wait_for_state(run_id, {"PENDING", "RUNNING", "COMPLETED"}, timeout=30)
    assert time.monotonic() - created < 15
    assert rig.wait_for_final(run_id, timeout=90)["state"]["type"] == "COMPLETED"


def test_a_warm_run_is_adopted_after_a_restart_and_can_be_cancelled(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    name = f"{unique_pool}-warm"
    worker = start_worker(unique_pool, "--warm", "1", name=name)
    deployment = rig.create_deployment(unique_pool, "flows.py:sleepy", {"image": flow_image})
    first = rig.wait_for_final(rig.create_flow_run(deployment, parameters={"seconds": 0}),
                               timeout=90)
    assert first["state"]["type"] == "COMPLETED", first["state"]
    waiting = wait_for_waiting(docker_client, unique_pool)
    run_id = rig.create_flow_run(deployment, parameters={"seconds": 120})
    rig.wait_for_state(run_id, "RUNNING", timeout=60)
    assert rig.read_flow_run(run_id)["infrastructure_pid"].endswith(":" + waiting.id)
    spare = wait_for_waiting(docker_client, unique_pool)

    worker.process.send_signal(signal.SIGKILL)
    worker.wait(10)
    restarted = start_worker(unique_pool, "--warm", "1", name=name)
    restarted.wait_for_output("adopting container")
    assert warm_containers(docker_client, unique_pool, waiting=True) == []  # the spare is gone
    assert spare.id not in [c.id for c in warm_containers(docker_client, unique_pool)]

    rig.set_state(run_id, "CANCELLING", force=True)
    run = rig.wait_for_final(run_id, timeout=45)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert "CRASHED" not in rig.read_states(run_id)
    rig.wait_for_log(run_id, "on_cancellation hook ran")


def test_no_more_runs_start_at_once_than_max_starting(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool, "--max-starting", "1")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    run_ids = [rig.create_flow_run(deployment) for _ in range(3)]
    deadline = time.monotonic() + 150
    most_pending = 0
    while True:
        states = [rig.read_flow_run(run_id)["state"]["type"] for run_id in run_ids]
        most_pending = max(most_pending, states.count("PENDING"))
        if all(state in ("COMPLETED", "FAILED", "CRASHED") for state in states):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
    assert states == ["COMPLETED"] * 3
    assert most_pending == 1  # each claimed only once the one before it was RUNNING


HOLD_CLAIM = 20.0  # seconds the proxy holds the first claim before the server sees it


def test_runs_start_while_a_claim_is_on_its_way(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str,
    fault_proxy: FaultProxy, prefect_server: PrefectServer,
) -> None:
    """With --limit 2, the first run's claim is held on its way to the server for 20 s (the
    run stays SCHEDULED there, and the server lists it first): the second run is claimed in
    the other slot at once, and when it has ended the freed slot gets the third, both before
    the held claim lands (a poll must look past the runs this worker is already claiming).
    (--limit, not --max-starting: another test's containers starting on this engine would
    count against a start bound.)"""
    start_worker(unique_pool, "--limit", "2", "--max-starting", "0", api_url=fault_proxy.url)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "env": {"PREFECT_API_URL": prefect_server.url}})
    fault_proxy.inject(HOLD, r"^POST /api/flow_runs/\{id\}/set_state$", delay=HOLD_CLAIM)
    held = rig.create_flow_run(deployment)
    fault_proxy.wait_for(HOLD, timeout=60)  # the worker's only claim so far: the first run's
    second, third = rig.create_flow_run(deployment), rig.create_flow_run(deployment)
    for run_id in (held, second, third):
        assert rig.wait_for_final(run_id, timeout=150)["state"]["type"] == "COMPLETED"

    landed = rig.claimed_at(held)
    second_running = min(datetime.fromisoformat(s["timestamp"])
                         for s in rig.read_state_history(second) if s["type"] == "RUNNING")
    timeline = (f"held claim landed {landed:%T.%f}, second claimed {rig.claimed_at(second):%T.%f}"
                f" and RUNNING {second_running:%T.%f}, third claimed {rig.claimed_at(third):%T.%f}")
    print(timeline)
    assert rig.claimed_at(second) < landed, f"the second run waited for the held claim: {timeline}"
    assert second_running < landed, f"the second run was not RUNNING within the hold: {timeline}"
    assert rig.claimed_at(third) < landed, (
        f"the third run waited for the held claim though a start slot was free: {timeline}")


def test_warm_keeps_the_most_recently_used_configurations_within_its_bound(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool, "--warm", "1")
    first = rig.create_deployment(unique_pool, "flows.py:hello",
                                  {"image": flow_image, "env": {"CONFIG": "a"}})
    second = rig.create_deployment(unique_pool, "flows.py:hello",
                                   {"image": flow_image, "env": {"CONFIG": "b"}})
    assert rig.wait_for_final(rig.create_flow_run(first))["state"]["type"] == "COMPLETED"
    kept_for_first = wait_for_waiting(docker_client, unique_pool)
    assert rig.wait_for_final(rig.create_flow_run(second))["state"]["type"] == "COMPLETED"
    deadline = time.monotonic() + 60
    while True:  # the first configuration's container makes way for the second's
        waiting = warm_containers(docker_client, unique_pool, waiting=True)
        if [c.id for c in waiting] != [kept_for_first.id] and len(waiting) == 1:
            break
        assert time.monotonic() < deadline, waiting
        time.sleep(0.3)
    env = docker_client.containers.get(waiting[0].id).attrs["Config"]["Env"]
    assert "CONFIG=b" in env
    assert kept_for_first.id not in [c.id for c in warm_containers(docker_client, unique_pool)]


def test_one_configuration_in_use_gets_every_warm_place(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool, "--warm", "2")
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
    assert rig.wait_for_final(rig.create_flow_run(deployment))["state"]["type"] == "COMPLETED"
    deadline = time.monotonic() + 60
    while len(warm_containers(docker_client, unique_pool, waiting=True)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    time.sleep(2)
    assert len(warm_containers(docker_client, unique_pool, waiting=True)) == 2  # and no more


def test_the_engine_tells_fresh_starts_of_other_workers_from_ours_and_old_ones(
    docker_client, unique_pool: str
) -> None:
    """What --max-starting shares between workers on one engine (admission.py): running
    containers of other dockerworker workers younger than the window; not ours, not
    stopped ones, not other software's, not older ones."""
    from dockerworker.containers import LABEL_MANAGED, LABEL_WORKER
    from dockerworker.runtime import LocalEngine

    engine = LocalEngine(docker_client)
    me, other = f"{unique_pool}-me", f"{unique_pool}-other"

    def container(worker: str | None, start: bool = True, managed: bool = True):
        labels = {POOL_LABEL: unique_pool}
        if managed:
            labels[LABEL_MANAGED] = "true"
        if worker:
            labels[LABEL_WORKER] = worker
        made = docker_client.containers.create(LOCAL_BASE, ["sleep", "60"], labels=labels)
        if start:
            made.start()
        return made

    made = {"theirs": container(other), "unnamed": container(None), "mine": container(me),
            "not started": container(other, start=False),
            "not ours": container(other, managed=False)}
    try:
        fresh = engine.starts_elsewhere(me, window=60)
        assert {name for name, c in made.items() if c.id in fresh} == {"theirs", "unnamed"}
        assert all(0 <= fresh[made[name].id] < 60 for name in ("theirs", "unnamed"))
        time.sleep(1.1)  # Docker's creation time counts whole seconds
        assert not set(engine.starts_elsewhere(me, window=1.0)) & {c.id for c in made.values()}
    finally:
        for c in made.values():
            c.remove(force=True)
