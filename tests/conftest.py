"""Shared pytest setup: tests under tests/integration/ get the `integration` marker; with
pytest-xdist (`make test` runs the suite in two processes) tests that share a module fixture or
the Swarm engine go to one process."""

import functools
from pathlib import Path

import pytest

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is a test dependency; without it the suite runs in one
    LoadScopeScheduling = None

INTEGRATION_DIR = Path(__file__).parent / "integration"
ROOT_DIR = Path(__file__).parent.parent  # where node ids start


def pytest_configure(config: pytest.Config) -> None:
    """Register markers."""
    config.addinivalue_line(
        "markers", "integration: needs Docker, the local images and a Prefect server"
    )


# Modules whose tests use the Swarm engine: one Swarm engine at a time on this host
# (testrig.swarm's lock fails a second at once), so they run in one process, one after another.
SWARM_MODULES = {"test_build_push", "test_registry_rig", "test_swarm_jobs", "test_swarm_rig",
                 "test_swarm_stack"}


@functools.cache
def has_module_fixture(path: str) -> bool:
    """The module makes a fixture once for its tests (a compose stack, a Prefect 2 server)."""
    return 'scope="module"' in (ROOT_DIR / path).read_text()


def xdist_scope(nodeid: str) -> str:
    """Which tests run in one process, in order: the Swarm modules together, a module with a
    module fixture whole, any other test alone (pytest-xdist then sends it where it is free)."""
    path = nodeid.split("::", 1)[0]
    if not path.startswith("tests/integration/"):
        return nodeid
    if Path(path).stem in SWARM_MODULES:
        return "swarm"
    return path if has_module_fixture(path) else nodeid


if LoadScopeScheduling is not None:
    class GroupScheduling(LoadScopeScheduling):
        """pytest-xdist's `loadscope` with `xdist_scope` for a scope (its `loadgroup`, which
        reads marks, does not group under pytest 9.2)."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`pytest -n N` (as `make test` runs it) schedules by `xdist_scope`; another `--dist`
    given on the command line is kept."""
    if config.getvalue("dist") != "load":
        return None
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/integration/ as `integration` (deselect: -m 'not integration')."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
