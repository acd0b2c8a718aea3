"""Pull policies and registry credentials (images.py), on a stand-in for the Docker client."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import docker.errors
import pytest

from dockerworker.images import ImageUnavailable, ensure_image
from dockerworker.jobs import JobVariables
from dockerworker.policy import Policy

CREDENTIALS = {"username": "ci", "password": "s3cret", "registry_url": "registry.internal"}


class Engine:
    """Images present, pulls asked for (with their auth), and whether a pull fails."""

    def __init__(self, present: set[str], pull_error: str | None = None) -> None:
        self.present = present
        self.pull_error = pull_error
        self.pulls: list[tuple[str, Any]] = []
        self.images = SimpleNamespace(get=self._get)
        self.api = SimpleNamespace(pull=self._pull)

    def _get(self, image: str) -> object:
        if image not in self.present:
            raise docker.errors.ImageNotFound(image)
        return object()

    def _pull(self, repository: str, tag: str, stream: bool, decode: bool,
              auth_config: Any) -> list[dict[str, str]]:
        self.pulls.append((f"{repository}:{tag}", auth_config))
        return [{"error": self.pull_error}] if self.pull_error else [{"status": "done"}]


def job(image: str, policy: str | None = None, **extra: Any) -> JobVariables:
    return JobVariables(image=image, image_pull_policy=policy, **extra)


def test_if_possible_uses_the_local_copy_only_when_the_pull_fails() -> None:
    engine = Engine({"flows:1"}, pull_error="registry unreachable")
    assert ensure_image(engine, job("flows:1", "IfPossible")) == "present (pull failed)"
    assert engine.pulls == [("flows:1", None)]  # it tried first
    absent = Engine(set(), pull_error="registry unreachable")
    with pytest.raises(ImageUnavailable, match="registry unreachable"):
        ensure_image(absent, job("flows:1", "IfPossible"))
    fine = Engine({"flows:1"})
    assert ensure_image(fine, job("flows:1", "IfPossible")) == "pulled"


def test_if_not_present_pulls_only_what_is_missing_and_never_pulls_nothing() -> None:
    engine = Engine({"flows:1"})
    assert ensure_image(engine, job("flows:1", "IfNotPresent")) == "present"
    assert ensure_image(engine, job("flows:2", "IfNotPresent")) == "pulled"
    assert engine.pulls == [("flows:2", None)]
    with pytest.raises(ImageUnavailable, match="image_pull_policy is Never"):
        ensure_image(engine, job("flows:3", "Never"))
    assert len(engine.pulls) == 1


def test_a_job_s_registry_credentials_are_sent_only_when_the_policy_trusts_that_registry(
) -> None:
    """Otherwise a deployment could send the worker's pull to a registry of its own with
    credentials of its own, or harvest what the engine sends: the worker's Docker config
    authenticates instead."""
    policy = Policy(credential_registries=["registry.internal"])
    for image, trusted in (("registry.internal/team/flows:1", True),
                           ("registry.internal.evil.example/flows:1", False),
                           ("registry.internal:5000/flows:1", False),
                           ("flows:1", False), ("docker.io/library/python:3", False)):
        assert policy.trusts_credentials_for(image) is trusted, image
        engine = Engine(set())
        ensure_image(engine, job(image, "Always", registry_credentials=CREDENTIALS),
                     policy.trusts_credentials_for(image))
        sent = engine.pulls[0][1]
        assert sent == ({"username": "ci", "password": "s3cret"} if trusted else None), image
    assert not Policy().trusts_credentials_for("registry.internal/team/flows:1")  # default
