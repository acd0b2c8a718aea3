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


def test_credentials_are_swarm_secrets_never_environment_values() -> None:
    """As compose/docker-compose.yml: files made Swarm secrets, `*_FILE` variables, the
    server's shell reading them; no password in any service's environment."""
    spec = stack()
    assert spec["secrets"] == {
        "prefect_auth_string": {"file": "${SECRETS_DIR:-./secrets}/prefect_auth_string"},
        "postgres_password": {"file": "${SECRETS_DIR:-./secrets}/postgres_password"}}
    services = spec["services"]
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_AUTH_STRING_FILE"] == (
        "/run/secrets/prefect_auth_string")
    (secret,) = worker["secrets"]
    # the worker's user (10001) alone reads it: Swarm, unlike compose, sets owner and mode
    assert (secret["source"], secret["uid"], secret["mode"]) == ("prefect_auth_string",
                                                                 "10001", 0o400)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/postgres_password")
    assert services["postgres"]["secrets"] == ["postgres_password"]
    assert {s["source"] for s in services["server"]["secrets"]} == {
        "prefect_auth_string", "postgres_password"}
    assert "/run/secrets/prefect_auth_string" in " ".join(services["server"]["command"])
    for name, service in services.items():
        for key, value in service["environment"].items():
            assert "PASSWORD" not in key or key.endswith("_FILE"), (name, key)
            assert "AUTH_STRING" not in key or key.endswith("_FILE"), (name, key)
            assert "prefect:${" not in str(value), (name, key)  # no password in a URL
