"""Per-deployment dependency images: built once, cached by content, run from (issue 4)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

from testrig.engine import HOST_CHECK_IMAGE, Engine
from testrig.prefect_rig import PrefectRig

from dockerworker.builds import REPOSITORY_PREFIX, Builder, BuildOptions, BuildPlan

BUILD = "dockerworker.build"


def messages(rig: PrefectRig, run_id: str, name: str | None = None) -> list[str]:
    return [log["message"] for log in rig.read_logs(run_id) if name in (None, log["name"])]


def wait_logged(rig: PrefectRig, run_id: str, text: str, timeout: float = 15) -> list[str]:
    """The run's log messages once one contains `text` (the shipper batches briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        found = messages(rig, run_id)
        if any(text in m for m in found):
            return found
        assert time.monotonic() < deadline, (text, found)
        time.sleep(0.5)


def test_packages_are_built_once_then_cached_and_a_change_rebuilds(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    old = {"image": flow_image, "pip_packages": ["six==1.16.0"]}
    deployment = rig.create_deployment(unique_pool, "flows.py:six_version", old)
    first = rig.create_flow_run(deployment)
    assert rig.wait_for_final(first, timeout=300)["state"]["type"] == "COMPLETED"
    wait_logged(rig, first, "six version 1.16.0")

    second = rig.create_flow_run(deployment)
    assert rig.wait_for_final(second, timeout=120)["state"]["type"] == "COMPLETED"
    logged = wait_logged(rig, second, "six version 1.16.0")
    assert any("cached, no build" in m for m in logged)
    assert not any("built image" in m for m in logged)
    assert messages(rig, second, BUILD) == []

    newer = rig.create_flow_run(deployment, job_variables={"pip_packages": ["six==1.17.0"]})
    assert rig.wait_for_final(newer, timeout=300)["state"]["type"] == "COMPLETED"
    logged = wait_logged(rig, newer, "six version 1.17.0")
    assert any("built image" in m for m in logged)
    assert messages(rig, newer, BUILD)  # the build's output reached the run's logs


def test_a_package_that_does_not_exist_crashes_naming_it(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    job = {"image": flow_image, "pip_packages": ["definitely-not-a-package-xyz"]}
    deployment = rig.create_deployment(unique_pool, "flows.py:six_version", job)
    run = rig.wait_for_final(rig.create_flow_run(deployment), timeout=300)
    assert run["state"]["type"] == "CRASHED"
    assert "definitely-not-a-package-xyz" in run["state"]["message"]
    assert "pip install" in run["state"]["message"]  # the failing step


def _unique_spec(flow_image: str) -> dict:
    """A spec no earlier build had: one package plus a line that changes the hash."""
    return {
        "image": flow_image,
        "pip_packages": ["six==1.16.0"],
        "dockerfile_lines": [f"RUN echo {uuid.uuid4().hex} > /tmp/spec-id"],
    }


def test_runs_arriving_together_share_one_build(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, policy_file
) -> None:
    start_worker(unique_pool, "--policy", policy_file(allow_dockerfile_lines=True))
    deployment = rig.create_deployment(
        unique_pool, "flows.py:six_version", _unique_spec(flow_image)
    )
    runs = [rig.create_flow_run(deployment) for _ in range(3)]
    assert [rig.wait_for_final(r, timeout=300)["state"]["type"] for r in runs] == [
        "COMPLETED"
    ] * 3
    outcomes = [wait_logged(rig, r, REPOSITORY_PREFIX) for r in runs]
    assert sum(any("built image" in m for m in logged) for logged in outcomes) == 1
    assert sum(any("cached, no build" in m for m in logged) for logged in outcomes) == 2


def test_two_worker_processes_share_one_build(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, policy_file
) -> None:
    consent = policy_file(allow_dockerfile_lines=True)
    workers = [start_worker(unique_pool, "--limit", "2", "--policy", consent) for _ in range(2)]
    deployment = rig.create_deployment(
        unique_pool, "flows.py:six_version", _unique_spec(flow_image)
    )
    runs = [rig.create_flow_run(deployment) for _ in range(4)]
    assert [rig.wait_for_final(r, timeout=300)["state"]["type"] for r in runs] == [
        "COMPLETED"
    ] * 4
    builds = sum(w.output().count(f"built image {REPOSITORY_PREFIX}") for w in workers)
    assert builds == 1, [w.output() for w in workers]
    assert all("claimed" in w.output() for w in workers), "both workers should take runs"


def test_extra_pip_packages_are_built_in_not_installed_per_run(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client
) -> None:
    start_worker(unique_pool)
    job = {"image": flow_image, "env": {"EXTRA_PIP_PACKAGES": "six==1.16.0"}}
    deployment = rig.create_deployment(unique_pool, "flows.py:six_version", job)
    run_id = rig.create_flow_run(deployment)
    assert rig.wait_for_final(run_id, timeout=300)["state"]["type"] == "COMPLETED"
    wait_logged(rig, run_id, "six version 1.16.0")
    (container,) = docker_client.containers.list(
        all=True, filters={"label": f"io.prefect.flow-run-id={run_id}"}
    )
    assert container.image.tags[0].startswith(REPOSITORY_PREFIX)  # no pull reaches it
    env = container.attrs["Config"]["Env"]
    assert not any(item.startswith("EXTRA_PIP_PACKAGES=") for item in env)


def test_images_prune_removes_an_old_build_and_keeps_one_in_use(
    own_engine: Engine, docker_client
) -> None:
    """On an engine of the test's own: `prune --older-than 0s` removes every unused build,
    which on the machine's engine would race the builds of tests running beside it."""
    own_engine.load_images(docker_client, HOST_CHECK_IMAGE)
    engine = own_engine.client
    builder = Builder(engine, BuildOptions(), holder="test")
    name = f"prune-{uuid.uuid4().hex[:6]}"
    in_use, unused = (
        builder.ensure(
            HOST_CHECK_IMAGE, BuildPlan([], "", [f"RUN echo {tag} > /tmp/which"]), name, print
        ).tag
        for tag in ("in-use", "unused")
    )
    engine.containers.run(in_use, ["sleep", "60"], detach=True)
    cli = {**os.environ, "DOCKER_HOST": own_engine.host}
    listed = subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "images", "ls"],
        capture_output=True, text=True, check=True, env=cli,
    ).stdout
    assert in_use in listed and unused in listed and name in listed
    pruned = subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "images", "prune", "--older-than", "0s"],
        capture_output=True, text=True, check=True, env=cli,
    ).stdout
    assert f"removed {unused}" in pruned
    assert f"kept {in_use} (in use" in pruned
    assert [i.tags for i in engine.images.list(name=in_use.split(":")[0])] == [[in_use]]


def test_the_pip_step_runs_hardened_as_the_flow_would(
    docker_client, flow_image: str
) -> None:
    """pip_packages need no consent, so a package's setup code runs in the pip container:
    it gets the flow container's limits (memory, CPUs, pids), no-new-privileges and the build
    network, as the policy computed them (read off the container while pip runs)."""
    from pathlib import Path

    from testrig.workers import HOST_CA_BUNDLE

    from dockerworker.builds import BuildLimits

    ca = Path(HOST_CA_BUNDLE) if Path(HOST_CA_BUNDLE).exists() else None
    builder = Builder(docker_client, BuildOptions(network_mode="bridge", ca_bundle=ca),
                      holder=f"hardening-{uuid.uuid4().hex[:6]}")
    limits = BuildLimits(mem_limit="600m", nano_cpus=1_500_000_000, pids_limit=321)
    seen: dict[str, dict] = {}
    events = docker_client.events(decode=True, filters={"type": "container", "event": "create"})

    def watch() -> None:
        for event in events:
            name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
            if name.startswith("dockerworker-pip-"):
                seen[name] = docker_client.api.inspect_container(event["id"])["HostConfig"]
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        marker = f"hardening-{uuid.uuid4().hex[:8]}"  # a plan of its own: never cached
        result = builder.ensure(flow_image, BuildPlan(["six==1.16.0"], f"# {marker}\n", []),
                                marker, print, limits)
        watcher.join(30)
    finally:
        events.close()
    assert result.built
    (host_config,) = seen.values()
    assert host_config["Memory"] == 600 * 1024 * 1024
    assert host_config["NanoCpus"] == 1_500_000_000
    assert host_config["PidsLimit"] == 321
    assert "no-new-privileges:true" in (host_config["SecurityOpt"] or [])
    assert host_config["NetworkMode"] == "bridge"
    docker_client.images.remove(result.tag, force=True)
