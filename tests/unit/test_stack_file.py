"""compose/stack.yml's promises that `docker stack deploy` cannot check for us (the integration
test deploys it on a one-node Swarm: tests/integration/test_swarm_stack.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml  # prefect's dependency

STACK = Path(__file__).resolve().parents[2] / "compose" / "stack.yml"


def stack() -> dict[str, Any]:
    return yaml.safe_load(STACK.read_text())


def test_worker_is_global_and_named_per_node() -> None:
    worker = stack()["services"]["worker"]
    assert worker["deploy"]["mode"] == "global"
    assert worker["hostname"] == "{{.Node.Hostname}}"
    assert worker["environment"]["DOCKERWORKER_NAME"] == "dockerworker-{{.Node.Hostname}}"
    # stop-first: the old task of a name is gone before the new one starts
    assert worker["deploy"]["update_config"]["order"] == "stop-first"
    (socket,) = worker["volumes"]
    assert socket["type"] == "bind" and socket["target"] == "/var/run/docker.sock"


def test_server_and_database_are_placed_and_the_network_is_attachable() -> None:
    spec = stack()
    for name in ("postgres", "server"):
        assert spec["services"][name]["deploy"]["placement"]["constraints"], name
    network = spec["networks"]["prefect"]
    assert network["driver"] == "overlay" and network["attachable"] is True
    for name, service in spec["services"].items():
        assert service["networks"] == ["prefect"], name
        # ignored by `docker stack deploy`: a stack file must not count on them
        assert "build" not in service and "depends_on" not in service, name
