"""A container that ends when the test says so: a fixed `sleep` may end before a slow machine
has done what the test needs done first (stop a worker, cut the server off)."""

from __future__ import annotations

import docker

GATE = "/tmp/dockerworker-test-gate"

# Says "working", waits for the gate, says "giving up" and exits 3 (no final state of its own)
GATED_CRASH = (f"sh -c 'echo working; until [ -e {GATE} ]; do sleep 0.1; done; "
               "echo giving up; exit 3'")


def open_gate(container: docker.models.containers.Container) -> None:
    """Let a GATED_CRASH container go on to its end."""
    result = container.exec_run(["touch", GATE])
    assert result.exit_code == 0, result.output
