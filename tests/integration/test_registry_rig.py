"""The registry rig (testrig/registry.py) for the push path of per-deployment images: an image
that the tests' Swarm engine pushes to the loopback registry comes back by a pull."""

from __future__ import annotations

import io
import secrets
import tarfile

import docker
from testrig.registry import LocalRegistry
from testrig.swarm import SwarmEngine


def test_the_swarm_engine_pushes_to_the_loopback_registry_and_pulls_back(
    swarm_engine: SwarmEngine, local_registry: LocalRegistry
) -> None:
    client = swarm_engine.client
    marker = secrets.token_hex(8)
    image, _ = client.images.build(fileobj=tiny_context(marker), custom_context=True,
                                   pull=False, rm=True)
    repository = local_registry.name(f"dwtest/pushed-{marker[:6]}")
    image.tag(repository, "1")

    pushed = list(client.images.push(repository, "1", stream=True, decode=True))
    assert not [line for line in pushed if "error" in line], pushed
    digest = next(line["aux"]["Digest"] for line in pushed if "Digest" in line.get("aux", {}))
    assert f"dwtest/pushed-{marker[:6]}" in local_registry.catalog()
    assert local_registry.tags(f"dwtest/pushed-{marker[:6]}") == ["1"]

    client.images.remove(f"{repository}:1")  # its only name: the image is deleted
    try:
        client.images.get(image.id)
        raise AssertionError("the pushed image is still on the engine")
    except docker.errors.ImageNotFound:
        pass
    pulled = client.images.pull(repository, tag="1")
    assert pulled.id == image.id
    assert pulled.labels["io.dockerworker.test"] == marker
    assert f"{repository}@{digest}" in pulled.attrs["RepoDigests"]
    client.images.remove(f"{repository}:1")


def tiny_context(marker: str) -> io.BytesIO:
    """A build context of one small file layer (FROM scratch: nothing to load or pull)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        dockerfile = f"FROM scratch\nLABEL io.dockerworker.test={marker}\nCOPY marker /marker\n"
        for name, text in (("Dockerfile", dockerfile), ("marker", marker)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer
