"""Each run's resource report, read from the engine (resources.py; issue 18, part 4)."""

from __future__ import annotations

import re

from testrig.prefect_rig import PrefectRig

# Writes 150 MiB (every page), frees it, then lives on for 3 s: the cgroup's own peak
# (memory.max_usage_in_bytes) keeps the allocation, so any reading after it carries it, and
# the sampler reads a container this young about every second: no luck in the timing.
ALLOCATE_150 = ("python3 -c 'import time; block = bytes(range(256)) * (150 * 4096); "
                "del block; time.sleep(3)'")
LINE = re.compile(r"resources: peak memory (?P<peak>[\d.]+) MiB of 512 MiB limit \((?P<pct>\d+) "
                  r"%\), CPU (?P<cpu>[\d.]+) s, wall (?P<wall>[\d.]+) s, exit 0, image (?P<image>"
                  r"\S+); memory and CPU as read (?P<gap>[\d.]+) s before the end$")


def resource_lines(rig: PrefectRig, run_id: str) -> list[str]:
    rig.wait_for_log(run_id, "resources:")
    return [log["message"] for log in rig.read_logs(run_id)
            if log["message"].startswith("resources:")]


def test_a_run_s_line_gives_the_peak_of_what_it_allocated(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "command": ALLOCATE_150, "mem_limit": "512m"})
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_final(run_id)
    (line,) = resource_lines(rig, run_id)
    found = LINE.match(line)
    assert found, line
    assert 150 <= float(found["peak"]) < 260, line  # the block, plus Python and page cache
    assert int(found["pct"]) == round(100 * float(found["peak"]) / 512)
    assert 0 < float(found["cpu"]) < 30, line
    assert 3 <= float(found["wall"]) < 30, line
    assert found["image"] == flow_image
    assert float(found["gap"]) < 3, line  # read while it slept


def test_a_run_too_short_to_read_still_gets_its_line(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "command": "sh -c 'exit 4'"})
    run_id = rig.create_flow_run(deployment)
    rig.wait_for_final(run_id)
    (line,) = resource_lines(rig, run_id)
    # Read or not (the container may end before its first reading), the line says which.
    assert re.match(r"resources: (peak memory [\d.]+ MiB \(no mem_limit\), CPU [\d.]+ s"
                    r"|peak memory unknown, CPU unknown), wall [\d.]+ s, exit 4, image "
                    + re.escape(flow_image), line), line
    assert ("the container ended before its usage could be read" in line
            or "memory and CPU as read" in line), line


def test_a_prefect_flow_run_gets_its_line(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str
) -> None:
    start_worker(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                       {"image": flow_image, "mem_limit": "512m"})
    run_id = rig.create_flow_run(deployment)
    assert rig.wait_for_final(run_id)["state"]["type"] == "COMPLETED"
    (line,) = resource_lines(rig, run_id)
    found = LINE.match(line)
    assert found, line
    assert float(found["peak"]) > 50, line  # Prefect's engine alone takes ~120 MiB
    assert float(found["cpu"]) > 0.3, line  # and about a second of CPU to import
