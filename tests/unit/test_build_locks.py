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


def ensure_at_once(builder: Builder, runs: int = 5) -> list[builds.BuildResult]:
    """`runs` runs of one deployment wanting its build at the same time, each in a thread."""
    results: list[builds.BuildResult] = []
    threads = [threading.Thread(target=lambda: results.append(ensure(builder)))
               for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_runs_of_one_worker_share_one_build(client) -> None:
    done: list[str] = []
    builder = counting_builder(client, "w1", done)
    results = ensure_at_once(builder)
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


# --- pushing builds to a registry (--build-push) ------------------------------------------

REGISTRY = "registry.example:5000"


class Registry:
    """The push registry as the engine sees it: what it holds, what was pushed, and the
    engine's stream for a push (an `error` line when `refuse` is set)."""

    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.held: dict[str, str] = {}
        self.pushes: list[str] = []
        self.refuse: str | None = None
        client.images.push = self.push  # type: ignore[attr-defined]
        client.api = SimpleNamespace(inspect_distribution=self.inspect)  # type: ignore[attr-defined]
        real_get = client.images.get

        def get(tag: str) -> SimpleNamespace:
            image = real_get(tag)
            image.tag = lambda repo, version: client.images.tags.add(f"{repo}:{version}")
            return image

        client.images.get = get  # type: ignore[method-assign]

    def inspect(self, name: str) -> dict[str, Any]:
        if name not in self.held:
            raise docker.errors.NotFound("manifest unknown: manifest unknown")
        return {"Descriptor": {"digest": self.held[name]}}

    def push(self, repository: str, tag: str, stream: bool, decode: bool
             ) -> Any:
        name = f"{repository}:{tag}"
        assert name in self.client.images.tags, "pushed before it was tagged"
        held = [c for c in self.client.containers.by_name if c.startswith("dockerworker-build-lock")]
        assert len(held) == 1, "pushed outside the engine lock"
        yield {"status": f"The push refers to repository [{repository}]"}
        if self.refuse:
            yield {"error": self.refuse, "errorDetail": {"message": self.refuse}}
            return
        time.sleep(0.05)
        self.pushes.append(name)
        self.held[name] = f"sha256:{len(self.pushes):064x}"
        yield {"progressDetail": {}, "aux": {"Tag": tag, "Digest": self.held[name]}}


def pushing_builder(client: FakeClient, holder: str, done: list[str]) -> Builder:
    builder = counting_builder(client, holder, done)
    builder.options = BuildOptions(timeout=5, push=REGISTRY)
    return builder


def test_runs_wanting_one_build_at_once_get_one_build_and_one_push(client) -> None:
    registry = Registry(client)
    done: list[str] = []
    builder = pushing_builder(client, "w1", done)
    results = ensure_at_once(builder)
    assert done == ["w1"] and len(registry.pushes) == 1
    (pushed,) = registry.pushes
    assert pushed.startswith(f"{REGISTRY}/dockerworker/flow-nightly:")
    assert {r.reference for r in results} == {f"{pushed}@{registry.held[pushed]}"}
    assert sorted(r.push for r in results) == ["known"] * 4 + ["pushed"]
    assert ensure(builder).push == "known" and len(registry.pushes) == 1


def test_a_build_the_registry_holds_is_not_pushed_again_and_runs_by_its_digest(client) -> None:
    """Another worker (or this one before a restart) pushed the same key: same content."""
    registry = Registry(client)
    done: list[str] = []
    first = ensure(pushing_builder(client, "w1", done))
    again = ensure(pushing_builder(client, "w2", done))  # a fresh builder: asks the registry
    assert (first.push, again.push) == ("pushed", "present")
    assert len(registry.pushes) == 1 and done == ["w1"]
    assert again.reference == first.reference


def test_a_build_made_before_pushing_was_on_is_pushed_without_building_again(client) -> None:
    registry = Registry(client)
    done: list[str] = []
    local = ensure(counting_builder(client, "w1", done))
    pushed = ensure(pushing_builder(client, "w1", done))
    assert done == ["w1"] and not pushed.built and pushed.push == "pushed"
    assert pushed.tag == local.tag == local.reference  # the engine's own name stays
    assert registry.pushes == [builds.pushed_name(REGISTRY, local.tag)]
    assert registry.pushes[0].startswith(f"{REGISTRY}/dockerworker/flow-nightly:")


@pytest.mark.parametrize(("engine_says", "transient"), [
    ('Get "http://registry.example:5000/v2/": dial tcp: connect: connection refused', True),
    ("denied: requested access to the resource is denied", False),
])
def test_a_refused_push_names_the_registry_and_the_engine_s_words_and_is_tried_again(
    client, engine_says: str, transient: bool
) -> None:
    registry = Registry(client)
    registry.refuse = engine_says
    builder = pushing_builder(client, "w1", [])
    with pytest.raises(builds.PushFailed) as failed:
        ensure(builder)
    assert f"to registry {REGISTRY} failed: {engine_says}" in str(failed.value)
    assert failed.value.transient is transient
    assert not any(c.startswith("dockerworker-build-lock") for c in client.containers.by_name)
    registry.refuse = None  # the registry is back: the next run pushes, nothing is remembered
    assert ensure(builder).push == "pushed" and len(registry.pushes) == 1


def test_prune_removes_every_name_of_a_pushed_build() -> None:
    """A pushed build has its local name and its registry name: removing one only untags."""
    names = ["dockerworker.invalid/flow-nightly:k1", f"{REGISTRY}/dockerworker/flow-nightly:k1"]
    image = SimpleNamespace(id="sha256:1", short_id="1", tags=names,
                            labels={builds.DEPLOYMENT_LABEL: "flow-nightly"},
                            attrs={"Size": 1, "Created": "2020-01-01T00:00:00",
                                   "Metadata": {"LastTagTime": "2020-01-01T00:00:00"}})
    removed: list[str] = []
    client = SimpleNamespace(
        images=SimpleNamespace(list=lambda filters: [image],
                               remove=lambda tag, force: removed.append(tag)),
        containers=SimpleNamespace(list=lambda all, sparse: []))
    assert builds.prune_builds(client, 0, None) == ([names[0]], [])  # type: ignore[arg-type]
    assert removed == names


def test_builds_at_once_are_bounded_per_worker(client) -> None:
    """A build goes on when its run is cancelled (it stays cached), so runs scheduled and
    cancelled in a loop, each with requirements of its own, must not start any number of
    builds at once (found by an audit): the others wait for a slot."""
    builder = Builder(client, BuildOptions(timeout=5), holder="w1")  # type: ignore[arg-type]
    running, most, release = [0], [0], threading.Event()
    guard = threading.Lock()

    def build(tag: str, *args: object) -> None:
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(5)
        with guard:
            running[0] -= 1
        client.images.tags.add(tag)

    builder._build = build  # type: ignore[method-assign]
    plans = [BuildPlan([f"pkg{i}==1.0"], "", []) for i in range(builds.BUILDS_AT_ONCE + 3)]
    threads = [threading.Thread(target=builder.ensure, args=(
        "base:1", plan, "flow-nightly", lambda line: None, BuildLimits())) for plan in plans]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 1  # without the bound all of them get there at once
    while running[0] < len(plans) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running[0] == builds.BUILDS_AT_ONCE
    release.set()
    for thread in threads:
        thread.join(10)
    assert most[0] == builds.BUILDS_AT_ONCE
    assert len([t for t in client.images.tags if t.startswith("dockerworker.invalid/")]) == len(
        plans)
