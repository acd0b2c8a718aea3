"""A container registry on loopback for the push path: no registry is reachable from here, so
the tests run their own, Debian's `docker-registry` (the distribution registry, package
docker-registry, installed by scripts/ensure-test-tools.sh) as a plain process on
127.0.0.1:PORT with its storage in a temp dir.

dockerd treats registries on 127.0.0.0/8 as insecure (plain HTTP) without configuration, so
any engine on this machine, the machine's or a test's own, pushes to and pulls from
`127.0.0.1:PORT/NAME:TAG` as it is.

    with LocalRegistry() as registry:
        client.images.get(IMAGE).tag(registry.name("dw/flow"), "1")
        client.images.push(registry.name("dw/flow"), "1")
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import requests

from .prefect_rig import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"


class LocalRegistry:
    """`docker-registry serve` on 127.0.0.1:`port` (a free one by default)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dw-registry-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """host:port, the prefix of the registry's image names."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def name(self, repository: str) -> str:
        """`repository` as an image name in this registry."""
        return f"{self.address}/{repository}"

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "registry.log").read_text(errors="replace")[-4000:]
        return ""

    def start(self, timeout: float = 30.0) -> Self:
        """Write the config, start the registry and wait until GET /v2/ answers 200."""
        binary = shutil.which("docker-registry") or REGISTRY_BIN
        if not Path(binary).exists():
            raise RuntimeError("docker-registry is not installed: run scripts/ensure-test-tools.sh"
                               " (apt-get install docker-registry)")
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n")
        with open(self.dir / "registry.log", "ab") as log:
            self.process = subprocess.Popen([binary, "serve", str(config)],
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/v2/", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry not answering after {timeout} s:\n"
                                   f"{self.output()}")
            time.sleep(0.2)

    def catalog(self) -> list[str]:
        """The repositories the registry holds."""
        response = requests.get(f"{self.url}/v2/_catalog", timeout=10)
        response.raise_for_status()
        return list(response.json().get("repositories") or [])

    def tags(self, repository: str) -> list[str]:
        response = requests.get(f"{self.url}/v2/{repository}/tags/list", timeout=10)
        response.raise_for_status()
        return list(response.json().get("tags") or [])

    def digest(self, repository: str, tag: str) -> str:
        """The digest the registry serves for `repository:tag` (what a pull by tag gets)."""
        response = requests.head(
            f"{self.url}/v2/{repository}/manifests/{tag}", timeout=10,
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]

    def stop(self) -> None:
        """End the registry (SIGTERM, then SIGKILL) and delete its storage."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
