"""Getting the job's image onto the Docker host, by prefect-docker's pull policy rules."""

from __future__ import annotations

import logging

import docker
import docker.errors
from docker.utils import parse_repository_tag

from .jobs import JobVariables

log = logging.getLogger(__name__)


class ImageUnavailable(RuntimeError):
    """The image is not on the host and could not (or may not) be pulled. `transient`: the
    registry could not be reached (worth another try), as opposed to an answer such as
    "not found" or "denied"."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


_PERMANENT_PULL_ERRORS = ("not found", "manifest unknown", "denied", "unauthorized",
                          "does not exist", "invalid reference", "no such image",
                          "no matching manifest", "repository name must")


def is_transient(reason: str) -> bool:
    """Whether a registry's failure is worth another try (it could not be reached), not an
    answer such as "not found" or "denied"."""
    return not any(fragment in reason.lower() for fragment in _PERMANENT_PULL_ERRORS)


def effective_pull_policy(image: str, policy: str | None) -> str:
    """Always for untagged or `:latest` images, IfNotPresent otherwise (Kubernetes' rule)."""
    if policy:
        return policy
    _, tag = parse_repository_tag(image)
    return "Always" if tag in (None, "latest") else "IfNotPresent"


def _present(client: docker.DockerClient, image: str) -> bool:
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _pull(client: docker.DockerClient, image: str, job: JobVariables, job_credentials: bool
          ) -> None:
    """Pull through the low-level stream: the high-level call hides errors (docker-py #2286).
    Without trusted job credentials, the worker's own Docker config authenticates."""
    repository, tag = parse_repository_tag(image)
    auth = None
    if job.registry_credentials and job_credentials:
        creds = job.registry_credentials
        auth = {"username": creds.username, "password": creds.password}
    try:
        for line in client.api.pull(
            repository, tag=tag or "latest", stream=True, decode=True, auth_config=auth
        ):
            if "error" in line:
                raise ImageUnavailable(f"pulling image {image!r} failed: {line['error']}",
                                       is_transient(str(line["error"])))
    except docker.errors.APIError as exc:
        reason = str(exc.explanation or exc)
        raise ImageUnavailable(f"pulling image {image!r} failed: {reason}",
                               is_transient(reason)) from None


def ensure_image(
    client: docker.DockerClient, job: JobVariables, job_credentials: bool = False
) -> str:
    """Make `job.image` available per its pull policy; returns what was done, for the logs.
    `job_credentials`: the policy trusts the job's registry_credentials for this registry."""
    image = job.image
    policy = effective_pull_policy(image, job.image_pull_policy)
    if policy == "Never":
        if not _present(client, image):
            raise ImageUnavailable(
                f"image {image!r} is not present on the Docker host and image_pull_policy "
                "is Never"
            )
        return "present"
    if policy == "IfNotPresent" and _present(client, image):
        return "present"
    try:
        _pull(client, image, job, job_credentials)
    except ImageUnavailable as exc:
        if policy == "IfPossible" and _present(client, image):
            log.warning("%s; using the local copy (IfPossible)", exc)
            return "present (pull failed)"
        raise
    return "pulled"
