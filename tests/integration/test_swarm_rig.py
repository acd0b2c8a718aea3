"""The Swarm rig itself (testrig/swarm.py): `docker_gwbridge` is a host-wide name, so a second
Swarm engine fails loudly instead of clobbering the first, a `docker_gwbridge` no SwarmEngine
made is never touched, and what a killed run left (its dockerd, data, bridges) is cleaned by
the next start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from testrig.engine import _alive
from testrig.swarm import GWBRIDGE, GWBRIDGE_MARK, SwarmEngine


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True,
                          check=False).returncode == 0


def test_a_second_swarm_engine_fails_loudly_and_touches_nothing(
    swarm_engine: SwarmEngine
) -> None:
    other = SwarmEngine(root="/tmp/dwr17x", bridge="dwr17x-br0", bridge_cidr="172.30.19.1/24")
    with pytest.raises(RuntimeError, match="another Swarm engine"):
        other.start()
    assert not Path("/tmp/dwr17x").exists()
    assert not link_exists("dwr17x-br0")
    assert swarm_engine.client.info()["Swarm"]["LocalNodeState"] == "active"
    assert link_exists(GWBRIDGE)


def test_a_killed_runs_leftovers_are_cleaned_by_the_next_start(
    swarm_engine: SwarmEngine
) -> None:
    """The session's engine is "killed" (its process's locks released, as the kernel does, its
    dockerd left running); a new SwarmEngine on the root cleans up and comes up. Afterwards the
    session's engine is started again (empty: load_images fills it when a test needs it)."""
    old_pid = swarm_engine._daemon_pid()
    assert old_pid is not None
    swarm_engine._unlock()
    swarm_engine._unlock_swarm()
    swarm_engine.process, swarm_engine._client, swarm_engine._swarm = None, None, False
    mark = Path(GWBRIDGE_MARK)
    try:
        fresh = SwarmEngine()
        fresh.start()
        try:
            assert not _alive(old_pid)
            assert fresh._daemon_pid() not in (None, old_pid)
            assert fresh.client.info()["Swarm"]["LocalNodeState"] == "active"
            assert fresh.client.images.list() == []  # the leftover's data dir went with it
        finally:
            fresh.stop()
        assert not link_exists(GWBRIDGE) and not mark.exists()
        assert not fresh.root.exists() and not link_exists(fresh.bridge)

        # a docker_gwbridge with no mark is not a SwarmEngine's: never deleted
        subprocess.run(["ip", "link", "add", GWBRIDGE, "type", "bridge"], check=True)
        with pytest.raises(RuntimeError, match="no SwarmEngine made it"):
            SwarmEngine().start()
        assert link_exists(GWBRIDGE)
    finally:
        if link_exists(GWBRIDGE) and not mark.exists():
            subprocess.run(["ip", "link", "delete", GWBRIDGE], check=False)
        swarm_engine.start()
