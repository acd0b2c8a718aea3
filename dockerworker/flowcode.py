"""Where a run's code comes from: its deployment's pull steps (`git_clone`,
`pull_from_remote_storage`, a package's own step).

Prefect's engine runs the pull steps inside the flow container; the worker neither clones nor
downloads. It does three things around them:

- `needs()`: what the steps need from the image (git, ssh, an fsspec or integration package).
  The entry script checks them before the engine starts, so a missing git is one line that
  says how to fix it, not a traceback from deep inside Prefect.
- `secret_values()` / `block_references()`: the credentials the steps name (literal tokens,
  `{{ $ENV }}` references, Secret and credentials blocks), so that the worker masks them in
  everything it writes, the container's shipped output included.
- `explain()`: a failed pull, named in one line at the head of the crash message: the
  credentials refused, the repository, branch or bucket missing, the host unreachable.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .api import Deployment, PrefectAPI, PrefectAPIError, ServerUnreachable
from .policy import secret_name

log = logging.getLogger(__name__)

NEEDS_ENV = "DOCKERWORKER_PULL_NEEDS"  # what the entry script checks (a JSON list)
MARKER = "dockerworker: "  # how the entry script's own lines start in the container's output
DOCS = "docs/flow-code.md"

# fsspec protocols and the package that serves each (what `pull_from_remote_storage` imports).
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
                    "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
_BLOCK_REFERENCE = re.compile(r"\{\{\s*prefect\.blocks\.([\w-]+)\.([\w-]+)(?:\.[\w.-]+)?\s*\}\}")
_ENV_REFERENCE = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


@dataclass(frozen=True)
class Need:
    """Something a pull step needs from the image: a program on PATH or a Python module."""

    step: str
    command: str = ""
    module: str = ""
    package: str = ""  # the Debian or PyPI package that provides it

    def message(self, image: str) -> str:
        if self.command:
            return (f"{MARKER}the pull step {self.step} needs {self.command}, and image {image} "
                    f"has no {self.command} on its PATH. pip_packages cannot install it (it is "
                    f"not a Python package): run from an image that has it (a Dockerfile "
                    f"`FROM {image}` with `RUN apt-get update && apt-get install -y "
                    f"{self.package}`), or put that RUN line in the job's dockerfile_lines "
                    f"(the worker's policy must allow_dockerfile_lines). See {DOCS}.")
        return (f"{MARKER}the pull step {self.step} needs the Python package {self.package} "
                f"(module {self.module}), which image {image} lacks: add {self.package!r} to "
                f"the job's pip_packages, or run from an image that has it. See {DOCS}.")


def steps(pull_steps: list[Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(fully qualified name, parameters) of each well-formed step."""
    for step in pull_steps or []:
        if isinstance(step, dict) and len(step) == 1:
            ((name, params),) = step.items()
            yield str(name), params if isinstance(params, dict) else {}


def needs(pull_steps: list[Any] | None) -> list[Need]:
    """What the image must have for these steps to run (only what the steps show for sure)."""
    found: list[Need] = []
    for name, params in steps(pull_steps):
        short = name.rsplit(".", 1)[-1]
        top = name.split(".", 1)[0]
        if top != "prefect" and "." in name:  # an integration's step: its package must be there
            found.append(Need(short, module=top, package=top.replace("_", "-")))
        if short == "git_clone":
            found.append(Need(short, command="git", package="git"))
            repository = str(params.get("repository", ""))
            if repository.startswith(("ssh://", "git@")) or re.match(r"^[\w.-]+@[\w.-]+:",
                                                                       repository):
                found.append(Need(short, command="ssh", package="openssh-client"))
        elif short == "pull_from_remote_storage":
            scheme = urlparse(str(params.get("url", ""))).scheme
            if package := _FSSPEC_PACKAGES.get(scheme):
                found.append(Need(short, module=package, package=package))
    return list(dict.fromkeys(found))


def needs_env(pull_steps: list[Any] | None, image: str) -> dict[str, str]:
    """The entry script's checklist for this run's container (empty when nothing to check)."""
    checks = [{"command": n.command, "module": n.module, "message": n.message(image)}
              for n in needs(pull_steps)]
    return {NEEDS_ENV: json.dumps(checks)} if checks else {}


def _strings(value: Any) -> Iterator[tuple[str, str]]:
    """(key, string) for every string leaf, the key being the nearest dict key."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, str):
            yield key, item
        elif isinstance(item, dict):
            stack.extend((str(k), v) for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((key, v) for v in item)


def secret_values(pull_steps: list[Any] | None, env: dict[str, str]) -> set[str]:
    """Credentials written into the steps themselves: literal values of secret-looking
    parameters (access_token, secret, password…), the job env values they reference
    (`{{ $GIT_TOKEN }}`), and passwords in URLs (`https://user:token@host`)."""
    found: set[str] = set()
    for _, params in steps(pull_steps):
        for key, text in _strings(params):
            referenced = [env.get(name, "") for name in _ENV_REFERENCE.findall(text)]
            if secret_name(key):
                found.update(v for v in referenced if v)
                if "{{" not in text:
                    found.add(text)
            parsed = urlparse(text) if "://" in text else None
            if parsed is not None and parsed.password:
                found.add(parsed.password)
    return found


def block_references(pull_steps: list[Any] | None) -> set[tuple[str, str]]:
    """(block type slug, document name) of every block the steps reference."""
    return {match for _, params in steps(pull_steps) for _, text in _strings(params)
            for match in _BLOCK_REFERENCE.findall(text)}


def block_secrets(block_type: str, data: dict[str, Any]) -> set[str]:
    """The values of a block document to mask: a Secret block's value, whatever its shape;
    of any other block, the values of secret-looking fields (token, password, secret key…)."""
    if block_type == "secret":
        return {text for _, text in _strings(data.get("value"))}
    return {text for key, text in _strings(data) if secret_name(key)}


def run_secrets(api: PrefectAPI, deployment: Deployment | None, env: dict[str, str]
                ) -> set[str]:
    """Everything the run's pull steps hold or name that is a credential, blocks read from
    the server; a block the server says it cannot give is named in the worker's log and
    skipped (the engine will fail on it in the container, and say so). A server that does
    not answer raises ServerUnreachable: the engine might read the block a moment later, and
    its value would go unmasked."""
    if deployment is None or not deployment.pull_steps:
        return set()
    found = secret_values(deployment.pull_steps, env)
    for block_type, name in sorted(block_references(deployment.pull_steps)):
        try:
            found |= block_secrets(block_type, api.read_block_data(block_type, name))
        except ServerUnreachable:
            raise
        except PrefectAPIError as exc:
            log.warning("could not read block %s/%s named by the pull steps of deployment %s: "
                        "%s", block_type, name, deployment.name, exc)
    return found


# --- explaining a failed pull -----------------------------------------------------------------
@dataclass(frozen=True)
class _Cause:
    pattern: re.Pattern[str]
    what: str  # the cause, in words; {0} is the pattern's first group when it has one
    fix: str


def _cause(pattern: str, what: str, fix: str) -> _Cause:
    return _Cause(re.compile(pattern, re.IGNORECASE), what, fix)


_CHECK_NETWORK = ("check the address, and that the flow container's network (network_mode, "
                  "networks) and DNS reach it; `dockerworker doctor --reach URL` tries it from "
                  "a container of the pool's image")
_CHECK_GIT_CREDENTIALS = ("check the access_token (or the credentials block) of the git_clone "
                          "step; over SSH, the key mounted into the container and its "
                          "GIT_SSH_COMMAND")
# In order: the first that matches names the cause (a refused login also prints "not found"
# on some hosts, so credentials come before a missing repository).
_GIT_CAUSES = (
    _cause(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED",
           "the SSH host key of the git server is unknown or changed",
           "mount a known_hosts file with the server's key and point GIT_SSH_COMMAND at it "
           "(-o UserKnownHostsFile=…)"),
    _cause(r"Permission denied \(publickey|Load key .*: (?:bad permissions|invalid format)"
           r"|no such identity", "the git server refused the SSH key", _CHECK_GIT_CREDENTIALS),
    _cause(r"Authentication failed|could not read (?:Username|Password)|terminal prompts "
           r"disabled|returned error: 40[13]|HTTP Basic: Access denied|Invalid username or "
           r"password|Check that your credentials or access token",
           "the git server refused the credentials (or none were given)",
           _CHECK_GIT_CREDENTIALS),
    _cause(r"Remote branch (\S+) not found|couldn't find remote ref (\S+)|"
           r"pathspec '([^']+)' did not match|reference is not a tree|"
           r"not our ref|unadvertised object",
           "the branch or commit {0} does not exist in the repository",
           "check the branch or commit_sha of the git_clone step"),
    _cause(r"Could not resolve host(?:name)?:? (\S+)",
           "the git host {0} could not be resolved from the flow container", _CHECK_NETWORK),
    _cause(r"Could not resolve host|Name or service not known|Temporary failure in name "
           r"resolution", "the git host could not be resolved from the flow container",
           _CHECK_NETWORK),
    _cause(r"Failed to connect to|Connection refused|Connection timed out|No route to host|"
           r"ssh: connect to host|Check your network",
           "the git server could not be reached from the flow container", _CHECK_NETWORK),
    _cause(r"Repository not found|does not appear to be a git repository|returned error: 404|"
           r"not found|Verify the repository URL",
           "the repository does not exist (or is hidden from these credentials)",
           "check the repository URL of the git_clone step"),
)
_STORAGE_CAUSES = (
    _cause(r"InvalidAccessKeyId|SignatureDoesNotMatch|InvalidClientTokenId|AccessDenied|"
           r"Access Denied|\b403\b|Forbidden|Check your storage permissions",
           "the object store refused the credentials",
           "check the key and secret (env AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or the "
           "step's key/secret parameters and the blocks they name)"),
    _cause(r"NoCredentialsError|Unable to locate credentials|Partial credentials",
           "no credentials for the object store were found in the container",
           "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the job's env, or the step's "
           "key/secret parameters"),
    _cause(r"NoSuchBucket|bucket does not exist|Verify the bucket name",
           "the bucket does not exist", "check the url of the pull step"),
    _cause(r"Could not connect to the endpoint URL:? ?\"?([^\"\s]+)",
           "the object store at {0} could not be reached from the flow container",
           _CHECK_NETWORK),
    _cause(r"EndpointConnectionError|ConnectionRefusedError|Cannot connect to host|"
           r"Check network connectivity",
           "the object store could not be reached from the flow container", _CHECK_NETWORK),
    _cause(r"NoSuchKey|FileNotFoundError|Verify the storage path",
           "nothing was found at the pull step's url", "check the url of the pull step"),
)
_MISSING = (
    (re.compile(r"No such file or directory: '(git|ssh)'"), "{0}"),
    (re.compile(r"No module named '(s3fs|gcsfs|adlfs)'|Install (s3fs|gcsfs|adlfs) to access"),
     "{0}"),
)
_GIT_STEP = re.compile(r"git_clone|Failed to clone repository|git clone failed")
_STORAGE_STEP = re.compile(r"pull_from_remote_storage|pull_from_s3|RemoteStorage|s3fs|botocore")
_FAILED_STEP = re.compile(r"Encountered error while running ([\w.]+)")


def explain(lines: Iterable[str]) -> str:
    """One line on why the flow's code could not be pulled, from the container's output;
    "" when the output shows no failed pull step."""
    lines = [line.rstrip() for line in lines]
    for line in lines:  # the entry script's own check said it first and best
        if line.startswith(MARKER) and "pull step" in line:
            return line[len(MARKER):]
    text = "\n".join(lines)
    for pattern, _ in _MISSING:
        if match := pattern.search(text):
            missing = next(g for g in match.groups() if g)
            return (f"the pull step needs {missing}, which the image lacks; "
                    f"see {DOCS} for images that have it")
    step = _FAILED_STEP.search(text)
    name = step.group(1).rsplit(".", 1)[-1] if step else ""
    if _GIT_STEP.search(text) and (not name or name == "git_clone"):
        causes, name = _GIT_CAUSES, name or "git_clone"
    elif step or _STORAGE_STEP.search(text):
        causes, name = _STORAGE_CAUSES, name or "pull_from_remote_storage"
    else:
        return ""
    for cause in causes:
        if match := cause.pattern.search(text):
            detail = next((g for g in match.groups() if g), "") if match.groups() else ""
            what = cause.what.format(detail.rstrip(".,;'\""))
            return f"the flow's code could not be pulled ({name}): {what}; {cause.fix}."
    return (f"the flow's code could not be pulled ({name}); the pull step's error is in the "
            f"output below") if step else ""
