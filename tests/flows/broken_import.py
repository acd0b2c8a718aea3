"""A flow module that cannot be imported: its dependency is missing from the image."""

import nonexistent_pkg_xyz  # noqa: F401
from prefect import flow


@flow
def broken() -> None:
    """Never runs: importing this module fails."""
