"""Unit tests: workers made on the fakes are stopped after each test (their shipper threads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .fakes import STARTED


@pytest.fixture(autouse=True)
def _stop_fake_workers() -> Iterator[None]:
    yield
    while STARTED:
        worker = STARTED.pop()
        worker.stop()
        if worker.warm is not None:
            worker.warm.close()
        worker.shipper.stop(timeout=1)
