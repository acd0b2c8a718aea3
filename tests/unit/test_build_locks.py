"""One build per key: the lock in this process and the lock container on the engine, over a
stand-in Docker client that makes container names atomic as Docker does."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import docker.errors
import pytest

from dockerworker import builds
from dockerworker.builds import Builder, BuildLimits, BuildOptions, BuildPlan


class FakeContainers:
    """Names are unique (409 on a second create), as Docker makes them."""

    def __init__(self) -> None:
        self.by_name: dict[str, SimpleNamespace] = {}
        self.lock = threading.Lock()

    def create(self, image: str, name: str, command: list[str], labels: dict[str, str]
               ) -> SimpleNamespace:
        with self.lock:
            if name in self.by_name:
                raise docker.errors.APIError("Conflict", response=SimpleNamespace(
                    status_code=409, reason="Conflict", url=""))
            container = SimpleNamespace(name=name, labels=labels)
            container.remove = lambda force=False, n=name: self._remove(n)
            self.by_name[name] = container
            return container

    def _remove(self, name: str) -> None:
        with self.lock:
            if self.by_name.pop(name, None) is None:
                raise docker.errors.NotFound(name)

    def get(self, name: str) -> SimpleNamespace:
        with self.lock:
            if name not in self.by_name:
                raise docker.errors.NotFound(name)
            return self.by_name[name]

    def list(self, all: bool, sparse: bool, filters: dict[str, Any]) -> list[SimpleNamespace]:
        wanted = dict(item.partition("=")[::2] for item in filters["label"])
        with self.lock:
            return [c for c in self.by_name.values()
                    if all_labels_match(c.labels, wanted)]


def all_labels_match(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(key in labels and (not value or labels[key] == value)
               for key, value in wanted.items())


class FakeImages:
    def __init__(self) -> None:
        self.tags: set[str] = {"base:1"}

    def get(self, tag: str) -> SimpleNamespace:
        if tag not in self.tags:
            raise docker.errors.ImageNotFound(tag)
        return SimpleNamespace(id=f"sha256:{abs(hash(tag))}", tag=lambda repo, version: True)


class FakeClient:
    def __init__(self) -> None:
        self.containers = FakeContainers()
        self.images = FakeImages()
        self.volumes = SimpleNamespace(list=lambda filters: [])


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


def counting_builder(client: FakeClient, holder: str, builds_done: list[str],
                     seconds: float = 0.05) -> Builder:
    """A builder whose build only records itself (and takes a moment)."""
    builder = Builder(client, BuildOptions(timeout=5), holder=holder)  # type: ignore[arg-type]

    def build(tag: str, *args: object) -> None:
        held = [c for c in client.containers.by_name if c.startswith("dockerworker-build-lock")]
        assert len(held) == 1, held  # the engine lock is held while building
        builds_done.append(holder)
        time.sleep(seconds)
        client.images.tags.add(tag)

    builder._build = build  # type: ignore[method-assign]
    return builder


PLAN = BuildPlan(["six==1.16.0"], "", [])


def ensure(builder: Builder) -> builds.BuildResult:
    return builder.ensure("base:1", PLAN, "flow-nightly", lambda line: None, BuildLimits())


def test_runs_of_one_worker_share_one_build(client) -> None:
    done: list[str] = []
    builder = counting_builder(client, "w1", done)
    results: list[builds.BuildResult] = []
    threads = [threading.Thread(target=lambda: results.append(ensure(builder)))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert done == ["w1"]
    assert sorted(r.built for r in results) == [False] * 4 + [True]
    assert len({r.tag for r in results}) == 1


def test_replicas_on_one_engine_share_one_build_through_the_lock_container(
    client, monkeypatch
) -> None:
    real_sleep = time.sleep  # the lock's wait is a second: shortened, not skipped
    monkeypatch.setattr(builds.time, "sleep", lambda seconds: real_sleep(min(seconds, 0.01)))
    done: list[str] = []
    builders = [counting_builder(client, f"w{i}", done) for i in range(3)]
    results: list[builds.BuildResult] = []
    threads = [threading.Thread(target=lambda b=b: results.append(ensure(b))) for b in builders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(done) == 1 and sum(r.built for r in results) == 1
    assert not any(name.startswith("dockerworker-build-lock") for name in client.containers.by_name)


def test_a_stale_lock_is_taken_over(client) -> None:
    done: list[str] = []
    builder = counting_builder(client, "w2", done)
    tag_key = "stale"
    client.containers.create("base:1", name=f"dockerworker-build-lock-{tag_key}",
                             command=["true"], labels={
                                 builds.LOCK_LABEL: tag_key, builds.HOLDER_LABEL: "dead",
                                 "io.dockerworker.since": str(time.time() - 3600)})
    with builder._engine_lock(tag_key, "base:1"):
        holder = client.containers.get(f"dockerworker-build-lock-{tag_key}")
        assert holder.labels[builds.HOLDER_LABEL] == "w2"


def test_a_worker_releases_only_its_own_locks(client) -> None:
    for holder in ("w1", "w2"):
        client.containers.create("base:1", name=f"dockerworker-build-lock-{holder}",
                                 command=["true"], labels={builds.LOCK_LABEL: holder,
                                                           builds.HOLDER_LABEL: holder})
    assert Builder(client, BuildOptions(), holder="w1").release_locks() == 1  # type: ignore[arg-type]
    assert list(client.containers.by_name) == ["dockerworker-build-lock-w2"]
