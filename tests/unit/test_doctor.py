"""`dockerworker doctor`'s checks that a real engine cannot be brought to: a nearly full disk."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dockerworker import doctor
from dockerworker.doctor import MIN_FREE_BYTES, Doctor
from dockerworker.policy import Masker


def _disk(monkeypatch: pytest.MonkeyPatch, free: int | None) -> doctor.Check:
    def usage(path: str) -> SimpleNamespace:
        assert path == "/srv/docker"  # the engine's own root, as it reports it
        if free is None:
            raise FileNotFoundError(path)
        return SimpleNamespace(free=free)

    monkeypatch.setattr(doctor.shutil, "disk_usage", usage)
    client = SimpleNamespace(info=lambda: {"DockerRootDir": "/srv/docker"})
    return Doctor(None, "p", Masker(set()))._disk(client)  # type: ignore[arg-type]


def test_too_little_free_disk_for_images_is_named_with_its_fix(monkeypatch) -> None:
    check = _disk(monkeypatch, MIN_FREE_BYTES - 1)
    assert not check.ok and "free disk for images at /srv/docker: 5.0 GiB" in check.title
    assert check.fix == "dockerworker images prune; docker system prune"
    assert _disk(monkeypatch, MIN_FREE_BYTES).ok


def test_a_disk_the_worker_cannot_see_is_unknown_not_wrong(monkeypatch) -> None:
    """The worker in a container sees the socket, not the engine's root."""
    check = _disk(monkeypatch, None)
    assert check.ok and check.title == (
        "free disk for images: unknown (/srv/docker is not visible here)")
