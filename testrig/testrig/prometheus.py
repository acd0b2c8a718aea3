"""Prometheus for the compose stack's `monitoring` profile: the local image, promtool, a config
with short intervals for tests, and a small client of Prometheus' HTTP API.

Everything here talks to loopback and the local Docker engine only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from testrig.prefect_rig import LOCAL_PROMETHEUS, REPO_DIR

CONFIG_DIR = REPO_DIR / "compose" / "prometheus"
# The shipped intervals, and what tests use instead: a scrape every second, so that a test
# waits on its runs rather than on Prometheus.
SHIPPED_INTERVALS = {"scrape_interval: 15s": 1, "evaluation_interval: 15s": 1,
                     "refresh_interval: 15s": 1}
T = TypeVar("T")


def promtool(client: Any, *args: str, config_dir: Path = CONFIG_DIR) -> tuple[int, str]:
    """`promtool ARGS` in the local Prometheus image with `config_dir` at /etc/prometheus
    (read-only, as compose mounts it): its exit code and output."""
    container = client.containers.run(
        LOCAL_PROMETHEUS, list(args), entrypoint="promtool", detach=True, network_mode="none",
        volumes={str(config_dir): {"bind": "/etc/prometheus", "mode": "ro"}})
    try:
        code = container.wait(timeout=120)["StatusCode"]
        return code, container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)


def fast_config(dest: Path, interval: str = "1s") -> Path:
    """A copy of compose/prometheus/ in `dest` whose scrape, evaluation and DNS refresh
    intervals are `interval`; rules and alerts unchanged. Fails loudly when the shipped
    config no longer has the lines it rewrites (the test would silently wait 15 s a scrape)."""
    shutil.copytree(CONFIG_DIR, dest, dirs_exist_ok=True)
    config = dest / "prometheus.yml"
    text = config.read_text()
    for line, count in SHIPPED_INTERVALS.items():
        if text.count(line) != count:
            raise AssertionError(f"{CONFIG_DIR / 'prometheus.yml'}: expected {count}x {line!r}")
        text = text.replace(line, line.replace("15s", interval))
    config.write_text(text)
    dest.chmod(0o755)  # the image runs as user prometheus
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str,
         interval: float = 0.5) -> T:
    """`read()` until `done(value)`; past the deadline, an AssertionError with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s; last: {value!r}")
        time.sleep(interval)


class PrometheusAPI:
    """The few calls of Prometheus' HTTP API (/api/v1) the tests need."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=10)

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, **params: str) -> Any:
        response = self._http.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                return self._http.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False
        poll(ready, bool, timeout, f"{self.url}/-/ready")

    def targets(self, job: str) -> dict[str, str]:
        """instance → health ("up", "down", "unknown") of `job`'s active targets."""
        active = self._get("/api/v1/targets", state="active")["activeTargets"]
        return {t["labels"]["instance"]: t["health"] for t in active
                if t["labels"].get("job") == job}

    def query(self, promql: str, by: str = "") -> dict[str, float]:
        """An instant vector query: label `by`'s value (or "" without it) → value."""
        result = self._get("/api/v1/query", query=promql)["result"]
        return {sample["metric"].get(by, ""): float(sample["value"][1]) for sample in result}

    def rules(self) -> dict[str, str]:
        """Every loaded rule's name (alert or record) → its health ("ok", "err", "unknown")."""
        groups = self._get("/api/v1/rules")["groups"]
        return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
