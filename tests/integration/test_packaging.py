"""The worker's own image (top-level Dockerfile)."""

from __future__ import annotations

from testrig.prefect_rig import build_worker_image

from dockerworker import __version__


def test_worker_image_builds_from_a_local_base_and_runs_as_non_root(docker_client) -> None:
    tag = build_worker_image(docker_client)
    version = docker_client.containers.run(tag, ["--version"], remove=True)
    assert version.decode().strip() == f"dockerworker, version {__version__}"
    shipped = docker_client.containers.run(tag, [
        "-c", "from dockerworker.entry import ENTRY_SCRIPT; print('prefect.engine' in ENTRY_SCRIPT)"
    ], entrypoint="python3", remove=True)
    assert shipped.decode().strip() == "True"  # the entry script's file is in the wheel
    uid = docker_client.containers.run(tag, ["-u"], entrypoint="id", remove=True)
    assert uid.decode().strip() == "10001"
    config = docker_client.images.get(tag).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["Entrypoint"] == ["dockerworker"]
    size_mb = docker_client.images.get(tag).attrs["Size"] / 1e6
    print(f"worker image: {size_mb:.0f} MB")
