"""The worker's settings: one pydantic model, filled from CLI flags and the environment."""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, SecretStr

from .builds import BuildOptions
from .policy import Policy

DEFAULT_API_URL = "http://127.0.0.1:4200/api"


def default_worker_name() -> str:
    """Stable across restarts, so a restarted worker knows its containers again. Compose
    replicas get distinct hostnames; several workers on one host need `--name` each."""
    return f"dockerworker-{socket.gethostname()}"


class WorkerSettings(BaseModel):
    api_url: str = DEFAULT_API_URL
    api_key: SecretStr | None = None
    auth_string: SecretStr | None = None
    pool: str
    work_queues: list[str] = Field(default_factory=list)
    name: str = Field(default_factory=default_worker_name)
    limit: int | None = Field(default=None, ge=1)
    poll_interval: float = Field(default=5.0, gt=0)
    prefetch_seconds: float = Field(default=10.0, ge=0)
    heartbeat_interval: float = Field(default=30.0, gt=0)
    max_starting: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=0)
    warm: int = Field(default=0, ge=0, le=32)
    run_once: bool = False
    drain: bool = False
    health_port: int | None = Field(default=None, ge=0, le=65535)
    build_network_mode: str | None = None
    build_ca_bundle: Path | None = None
    pip_index_url: str | None = None
    pip_extra_index_url: str | None = None
    build_timeout: float = Field(default=1800.0, gt=0)
    policy: Policy = Field(default_factory=Policy)

    def build_options(self) -> BuildOptions:
        return BuildOptions(
            network_mode=self.build_network_mode,
            ca_bundle=self.build_ca_bundle,
            pip_index_url=self.pip_index_url,
            pip_extra_index_url=self.pip_extra_index_url,
            timeout=self.build_timeout,
        )

    def secrets(self) -> set[str]:
        """The worker's own credentials: masked wherever text leaves the worker."""
        found = set()
        for secret in (self.api_key, self.auth_string):
            if secret:
                value = secret.get_secret_value()
                found.update({value, value.partition(":")[2]} - {""})
        for index_url in (self.pip_index_url, self.pip_extra_index_url):
            parts = urlsplit(index_url or "")
            token = parts.password or parts.username  # `https://TOKEN@host/simple` too
            if token:
                found |= {token, unquote(token)}
        return found

    def stream_token(self) -> str | None:
        """What the event stream's auth message carries (as Prefect's own client sends)."""
        for secret in (self.api_key, self.auth_string):
            if secret:
                return secret.get_secret_value()
        return None

    def auth_headers(self) -> dict[str, str]:
        """The same credentials as HTTP headers, for the websocket handshake."""
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key.get_secret_value()}"}
        if self.auth_string:
            token = base64.b64encode(self.auth_string.get_secret_value().encode()).decode()
            return {"Authorization": f"Basic {token}"}
        return {}

    def auth_env(self) -> dict[str, str]:
        """The credentials a flow container needs to talk to the same server."""
        env = {}
        if self.api_key:
            env["PREFECT_API_KEY"] = self.api_key.get_secret_value()
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string.get_secret_value()
        return env


def docker_host_description() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
