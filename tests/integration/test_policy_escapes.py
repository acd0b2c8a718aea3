"""Tried as an attacker who can only write deployments: every route to the host (issue 12).

Each adversarial deployment must end CRASHED naming the rule, with no flow container created;
the same requests must succeed when the operator's policy allows them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker.errors
import pytest
from testrig.prefect_rig import POOL_LABEL, PrefectRig, start_prefect_server
from testrig.workers import WorkerProcess, worker_env

RUN_LABEL = "io.prefect.flow-run-id"


def creates_since(docker_client, since: datetime, pool: str) -> list[str]:
    events = docker_client.events(
        since=since, until=datetime.now(UTC), decode=True,
        filters={"type": "container", "event": "create", "label": f"{POOL_LABEL}={pool}"},
    )
    # `since` reaches Docker in whole seconds: drop what came before it within that second.
    after = int(since.timestamp() * 1e9)
    return [event["id"] for event in events if int(event.get("timeNano", after)) >= after]


@pytest.fixture
def bystander(docker_client, flow_image: str) -> Iterator:
    """Another application's container and its named volume, as on a shared Docker host."""
    name = f"bystander-{uuid.uuid4().hex[:6]}"
    volume = docker_client.volumes.create(f"{name}-data")
    container = docker_client.containers.run(
        flow_image, ["sleep", "300"], name=name, detach=True,
        volumes={volume.name: {"bind": "/data", "mode": "rw"}},
    )
    try:
        yield container, volume.name
    finally:  # with the flow runs that were let in to use them
        users = docker_client.containers.list(all=True, filters={"volume": volume.name})
        for user in [*users, container]:
            with contextlib.suppress(docker.errors.NotFound):
                user.remove(force=True)
        volume.remove(force=True)


def _routes(bystander_container, bystander_volume: str, host_network_id: str) -> dict:
    """Case → (job variables, text the refusal must contain). Two or more variants a route."""
    return {
        "networks host first": ({"networks": ["host", "bridge"]},
                                "networks[0]: 'host' is not allowed"),
        "networks host second": ({"networks": ["bridge", "host"]},
                                 "networks[1]: 'host' is not allowed"),
        "networks container by id": ({"networks": [f"container:{bystander_container.id}"]},
                                     "networks[0]: 'container:"),
        "networks container by name": ({"networks": [f"container:{bystander_container.name}"]},
                                       f"networks[0]: 'container:{bystander_container.name}'"),
        "network_mode container": ({"network_mode": f"container:{bystander_container.name}"},
                                   "network_mode: 'container:"),
        "host network by id": ({"networks": [host_network_id[:12]]},
                               "(the host network) is not allowed"),
        "named volume": ({"volumes": [f"{bystander_volume}:/stolen"]},
                         f"volumes[0]: named volume '{bystander_volume}' is not allowed"),
        "named volume read-only": ({"volumes": [f"{bystander_volume}:/stolen:ro"]},
                                   "named volume"),
        "volumes_from": ({"container_create_kwargs": {"volumes_from": [bystander_container.name]}},
                         "container_create_kwargs.volumes_from: not allowed"),
        "dockerfile_lines FROM": ({"dockerfile_lines": ["FROM dockerworker/local-python:bookworm"]},
                                  "dockerfile_lines: extra Dockerfile instructions need"),
        "dockerfile_lines RUN": ({"dockerfile_lines": ["RUN cat /etc/hostname"]},
                                 "(allow_dockerfile_lines)"),
        "log_config syslog": ({"container_create_kwargs": {"log_config": {
            "type": "syslog", "config": {"syslog-address": "udp://127.0.0.1:1"}}}},
            "container_create_kwargs.log_config: not allowed"),
        "log_config gelf": ({"container_create_kwargs": {"log_config": {"type": "gelf"}}},
                            "container_create_kwargs.log_config: not allowed"),
        "oom_score_adj": ({"container_create_kwargs": {"oom_score_adj": -1000}},
                          "oom_score_adj must be 0 to 1000"),
        "oom_score_adj -1": ({"container_create_kwargs": {"oom_score_adj": -1}},
                             "oom_score_adj must be 0 to 1000"),
        "mem_limit -1": ({"mem_limit": "-1"}, "mem_limit: '-1' is below Docker's minimum"),
        "mem_limit tiny": ({"mem_limit": "1k"}, "below Docker's minimum of 6m"),
        "memswap alone": ({"memswap_limit": "1g"}, "memswap_limit: needs mem_limit"),
    }


def test_each_route_to_the_host_is_refused_naming_the_rule_and_creates_nothing(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, bystander
) -> None:
    container, volume = bystander
    host_network = docker_client.networks.get("host")
    routes = _routes(container, volume, host_network.id)
    since = datetime.now(UTC)
    worker = start_worker(unique_pool)
    runs = {}
    for case, (asked, _) in routes.items():
        deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                           {"image": flow_image, **asked})
        runs[case] = rig.create_flow_run(deployment)
    for case, run_id in runs.items():
        state = rig.wait_for_final(run_id, timeout=60)["state"]
        assert state["type"] == "CRASHED", (case, state)
        assert routes[case][1] in state["message"], (case, state["message"])
    assert creates_since(docker_client, since, unique_pool) == []
    assert worker.alive()


def test_the_effective_pull_policy_is_checked(
    rig: PrefectRig, start_worker, unique_pool: str, docker_client, policy_file
) -> None:
    """An untagged image with no policy pulls Always: refused when only IfNotPresent is."""
    since = datetime.now(UTC)
    start_worker(unique_pool, "--policy",
                 policy_file(allowed_pull_policies=["IfNotPresent", "Never"]))
    for image in ("dockerworker-test/flows", "dockerworker-test/flows:latest"):
        deployment = rig.create_deployment(unique_pool, "flows.py:hello", {"image": image})
        state = rig.wait_for_final(rig.create_flow_run(deployment), timeout=60)["state"]
        assert state["type"] == "CRASHED"
        assert "image_pull_policy: 'Always' (the effective pull policy) is not allowed" in (
            state["message"])
    assert creates_since(docker_client, since, unique_pool) == []


def test_images_named_by_a_build_must_be_allowed(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, policy_file
) -> None:
    """With consent for dockerfile_lines, `FROM`, `COPY --from` and `RUN --mount=from` still
    may only name allowed images (the worker would pull them with its own login)."""
    since = datetime.now(UTC)
    start_worker(unique_pool, "--policy", policy_file(
        allow_dockerfile_lines=True, allowed_images=["docker.io/dockerworker-test/*"]))
    cases = {
        "FROM": ["FROM dockerworker/local-python:bookworm"],
        "COPY --from": ["COPY --from=dockerworker/local-python:bookworm /etc/hostname /x"],
        "RUN --mount": [("RUN --mount=type=bind,from=dockerworker/local-python:bookworm,"
                        "target=/m true")],
    }
    for case, lines in cases.items():
        deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                           {"image": flow_image, "dockerfile_lines": lines})
        state = rig.wait_for_final(rig.create_flow_run(deployment), timeout=60)["state"]
        assert state["type"] == "CRASHED", case
        assert ("dockerfile_lines: 'dockerworker/local-python:bookworm' is not an allowed "
                "image") in state["message"], (case, state["message"])
    assert creates_since(docker_client, since, unique_pool) == []


def test_a_symlink_made_by_an_earlier_run_cannot_escape_the_prefix(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client,
    policy_file, tmp_path: Path
) -> None:
    prefix = tmp_path / "shared"
    prefix.mkdir()
    (prefix / "real").mkdir()
    start_worker(unique_pool, "--policy", policy_file(allowed_volume_prefixes=[str(prefix)]))
    maker = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "volumes": [f"{prefix}:/p"],
        "command": "sh -c 'ln -s /var/run/docker.sock /p/sock && ln -s / /p/root && "
                   "ln -s ../../../.. /p/real/up && ln -s real /p/inside'",
    })
    made = rig.wait_for_final(rig.create_flow_run(maker), timeout=60)["state"]
    assert made["type"] == "CRASHED"  # the command is not a flow; it made the links
    assert (prefix / "sock").is_symlink() and (prefix / "real" / "up").is_symlink()

    since = datetime.now(UTC)
    escapes = {
        "to the socket": [f"{prefix}/sock:/var/run/docker.sock"],
        "to the root": [f"{prefix}/root/etc:/host-etc"],
        "relative, upwards": [f"{prefix}/real/up/etc:/host-etc"],
    }
    runs = {}
    for case, volumes in escapes.items():
        deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                           {"image": flow_image, "volumes": volumes})
        runs[case] = rig.create_flow_run(deployment)
    for case, run_id in runs.items():
        state = rig.wait_for_final(run_id, timeout=60)["state"]
        assert state["type"] == "CRASHED", case
        assert "outside the allowed prefixes (through the symlink" in state["message"], (
            case, state["message"])
    assert creates_since(docker_client, since, unique_pool) == []

    inside = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "volumes": [f"{prefix}/inside:/data:ro"]})
    assert rig.wait_for_final(rig.create_flow_run(inside), timeout=120)["state"]["type"] == (
        "COMPLETED")


def test_the_same_requests_succeed_when_the_policy_allows_them(
    rig: PrefectRig, start_worker, unique_pool: str, flow_image: str, docker_client, bystander,
    policy_file
) -> None:
    container, volume = bystander
    start_worker(unique_pool, "--policy", policy_file(
        allowed_network_modes=["bridge", "host", "container:*"],
        allowed_named_volumes=[volume],
        allowed_create_kwargs=["log_config", "cpu_shares"],
    ))
    allowed = {
        "networks host": {"networks": ["host"]},
        "named volume": {"volumes": [f"{volume}:/data:ro"]},
        "log_config": {"container_create_kwargs": {"log_config": {"type": "json-file"}}},
        "network_mode container": {"network_mode": f"container:{container.name}"},
    }
    runs = {}
    for case, asked in allowed.items():
        deployment = rig.create_deployment(unique_pool, "flows.py:hello",
                                           {"image": flow_image, **asked})
        runs[case] = rig.create_flow_run(deployment)
    # The bystander is on the default bridge, where the loopback server is not: the point is
    # that the request reached Docker as asked.
    joined = runs.pop("network_mode container")
    deadline = time.monotonic() + 60
    while not (created := docker_client.containers.list(
            all=True, filters={"label": f"{RUN_LABEL}={joined}"})):
        assert time.monotonic() < deadline, "the container run was never created"
        time.sleep(0.5)
    assert created[0].attrs["HostConfig"]["NetworkMode"] == f"container:{container.id}"
    for case, run_id in runs.items():
        run = rig.wait_for_final(run_id, timeout=180)
        assert run["state"]["type"] == "COMPLETED", (case, run["state"])


# --- credentials never reach a layer, the history or the console ------------------------------
def _wheel(name: str, version: str) -> bytes:
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{name}-{version}.dist-info/RECORD,,\n"
    files[f"{name}-{version}.dist-info/RECORD"] = record.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return buffer.getvalue()


class PrivateIndex:
    """A PEP 503 index on loopback that serves one wheel only with the right token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.wheel_name = "dwprivate-1.0-py3-none-any.whl"
        self.wheel = _wheel("dwprivate", "1.0")
        self.authorized = 0
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                expected = base64.b64encode(f"user:{index.token}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {expected}":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="private"')
                    self.end_headers()
                    return
                index.authorized += 1
                if self.path.rstrip("/") == "/simple/dwprivate":
                    digest = hashlib.sha256(index.wheel).hexdigest()
                    body = (f'<a href="/files/{index.wheel_name}#sha256={digest}">'
                            f"{index.wheel_name}</a>").encode()
                    content_type = "text/html"
                elif self.path == f"/files/{index.wheel_name}":
                    body, content_type = index.wheel, "application/octet-stream"
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://user:{token}@127.0.0.1:{self.server.server_address[1]}/simple"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_private_index_token_is_in_no_layer_history_log_or_console(
    rig: PrefectRig, prefect_server, start_worker, unique_pool: str, flow_image: str,
    docker_client, tmp_path: Path
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    index = PrivateIndex(token)
    env = worker_env(prefect_server.url, PIP_INDEX_URL=index.url)
    worker = WorkerProcess(["--pool", unique_pool, "--name", f"{unique_pool}-t",
                            "--poll-interval", "1"], env, tmp_path / "worker.log")
    try:
        worker.wait_for_output("polling pool")
        deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
            "image": flow_image, "pip_packages": ["dwprivate==1.0"]})
        run_id = rig.create_flow_run(deployment)
        run = rig.wait_for_final(run_id, timeout=300)
        assert run["state"]["type"] == "COMPLETED", run["state"]
    finally:
        worker.stop()
        index.close()
    assert index.authorized >= 2  # pip used the token: index page and wheel
    (container,) = docker_client.containers.list(
        all=True, filters={"label": f"{RUN_LABEL}={run_id}"})
    image = docker_client.images.get(container.attrs["Image"])
    try:
        assert image.labels.get("io.dockerworker.build") == "true"
        saved = b"".join(image.save(named=True))
        for form in (token, base64.b64encode(f"user:{token}".encode()).decode()):
            assert form.encode() not in saved
        history = json.dumps(image.history())
        assert token not in history
        assert token not in json.dumps(image.attrs)
        assert token not in json.dumps(container.attrs)
        assert token not in worker.output()
        assert token not in json.dumps(rig.read_logs(run_id))
        assert "dwprivate" in saved.decode("latin-1")  # the package is in the image
    finally:
        container.remove(force=True)
        docker_client.images.remove(image.id, force=True)


@pytest.mark.parametrize("credential", ["api-key", "basic-auth"])
def test_debug_logging_never_shows_a_credential(
    credential: str, rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str,
    tmp_path: Path
) -> None:
    """At DEBUG the websocket library prints its request headers: they are masked too."""
    if credential == "api-key":
        secret = f"pnu_{uuid.uuid4().hex}"
        server, cleanup = prefect_server, None
        env = worker_env(server.url, PREFECT_API_KEY=secret)
        shown = "Bearer ***"
        api = rig
    else:
        secret = f"admin:{uuid.uuid4().hex}"
        cleanup = start_prefect_server(env={"PREFECT_SERVER_API_AUTH_STRING": secret})
        server = cleanup
        env = worker_env(server.url, PREFECT_API_AUTH_STRING=secret)
        shown = "Basic ***"
        user, _, password = secret.partition(":")
        api = PrefectRig(server.url, auth=(user, password))
    worker = WorkerProcess(["--pool", unique_pool, "--name", f"{unique_pool}-d",
                            "--poll-interval", "1", "--log-level", "DEBUG"], env,
                           tmp_path / "worker.log")
    try:
        worker.wait_for_output("polling pool")
        worker.wait_for_output(shown, timeout=30)  # the header was printed, masked
        deployment = api.create_deployment(unique_pool, "flows.py:hello", {"image": flow_image})
        assert api.wait_for_final(api.create_flow_run(deployment), timeout=120)["state"][
            "type"] == "COMPLETED"
    finally:
        worker.stop()
        if cleanup is not None:
            api.close()
            cleanup.stop()
    output = worker.output()
    for form in {secret, secret.partition(":")[2],
                 base64.b64encode(secret.encode()).decode()} - {""}:
        assert form not in output


def test_pool_inspect_masks_secrets_that_json_would_escape(
    rig: PrefectRig, prefect_server, unique_pool: str, flow_image: str
) -> None:
    secret = 'qu"ote\\back slash wörd'
    rig.create_work_pool(unique_pool)
    deployment = rig.create_deployment(unique_pool, "flows.py:hello", {
        "image": flow_image, "env": {"DB_PASSWORD": secret}})
    shown = subprocess.run(
        [sys.executable, "-m", "dockerworker.cli", "pool", "inspect", unique_pool,
         "--deployment", deployment],
        capture_output=True, text=True, check=True,
        env=worker_env(prefect_server.url),
    ).stdout
    assert '"DB_PASSWORD": "***"' in shown
    for form in (secret, json.dumps(secret), json.dumps(secret, ensure_ascii=False), "wörd",
                 "w\\u00f6rd"):
        assert form not in shown
