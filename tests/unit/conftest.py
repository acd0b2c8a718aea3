"""Unit tests: the fakes as fixtures; workers made on them are stopped after each test (their
shipper threads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .fakes import STARTED, FakeAPI, FakeRuntime


@pytest.fixture(autouse=True)
def _stop_fake_workers() -> Iterator[None]:
    yield
    while STARTED:
        worker = STARTED.pop()
        worker.stop()
        if worker.warm is not None:
            worker.warm.close()
        worker.shipper.stop(timeout=1)


@pytest.fixture
def api() -> FakeAPI:
    """An in-memory Prefect API with the claim rule."""
    return FakeAPI()


@pytest.fixture
def runtime(api: FakeAPI) -> FakeRuntime:
    """An in-memory container engine whose containers report to `api`."""
    return FakeRuntime(api)
