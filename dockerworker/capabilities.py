"""What a job asks of the Docker host, whatever variable carries it.

Several job variables reach the same Docker field: `network_mode`, each `networks` entry and
`container_create_kwargs.network` all choose the container's network namespace; `volumes`,
`container_create_kwargs.mounts` and `volumes_from` all mount things. The policy must not be
talked around by picking the variable it forgot, so the job is first turned into a list of
`Request`s, one per capability asked for, each naming the variable it came from; the policy
then has one rule per capability (policy.py). Docker API fields nobody mapped here reach the
policy only as `create_key` requests, which the safe list decides: deny by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .builds import BuildPlan
from .images import effective_pull_policy
from .jobs import JobVariables

# Capabilities (the `capability` of a Request):
IMAGE = "image"  # an image the run or its build uses
PULL = "pull"  # the effective pull policy
NETWORK = "network"  # a network namespace: bridge, none, host, container:X, or a named network
MOUNT = "mount"  # a bind mount, a named or anonymous volume, another container's volumes
PRIVILEGE = "privilege"  # privileged, weakened security options, host namespaces
GPU = "gpu"  # device requests
KERNEL = "kernel"  # knobs that reach the host's scheduling: (key, value) of oom_score_adj,
# a ulimit, a healthcheck (probes the engine runs)
CREATE_KEY = "create_key"  # a container_create_kwargs key: the safe list decides
BUILD_STEP = "build_step"  # dockerfile_lines: instructions run by the build
BUILD_FETCH = "build_fetch"  # ADD <url>: fetched by the Docker daemon itself
SECRET = "secret"  # a file of the worker's secrets directory, given to the flow

# security_opt entries that only strengthen the defaults; any other form may weaken them
# (`no-new-privileges=0`, a seccomp profile that allows everything, `label=type:spc_t`,
# `writable-cgroups=true`, …): it asks for privilege (allow_privileged decides)
_STRENGTHENING_SECURITY_OPTS = ("no-new-privileges", "no-new-privileges:true",
                                "no-new-privileges=true", "writable-cgroups=false",
                                "writable-cgroups:false")
_NAMESPACE_KEYS = ("pid_mode", "ipc_mode", "uts_mode", "userns_mode", "cgroupns")


@dataclass(frozen=True)
class Mount:
    """One thing mounted into the container, as Docker will see it."""

    kind: str  # "bind", "volume", "anonymous", "tmpfs", "container"; "unreadable": `source`
    # says why
    source: str | None
    target: str
    read_only: bool = False
    driver_options: bool = False  # a volume with driver options can mount anything


@dataclass(frozen=True)
class Request:
    """One capability asked for, and the variable that asks (for the refusal message)."""

    capability: str
    variable: str
    value: Any


def requests_of(job: JobVariables) -> list[Request]:
    """Every capability the job asks of the host, with effective values: the pull policy
    after its defaults, the images a build names."""
    found = [Request(IMAGE, "image", job.image),
             Request(PULL, "image_pull_policy",
                     effective_pull_policy(job.image, job.image_pull_policy))]
    found += _network_requests(job)
    for index, volume in enumerate(job.volumes):
        found.append(Request(MOUNT, f"volumes[{index}]", parse_volume(volume)))
    if job.privileged:
        found.append(Request(PRIVILEGE, "privileged", "privileged: true"))
    if job.gpus is not None:
        found.append(Request(GPU, "gpus", job.gpus))
    found += _create_kwarg_requests(job.container_create_kwargs or {})
    found += _build_requests(job)
    found += [Request(SECRET, f"secrets[{index}]", name) for index, name in enumerate(job.secrets)]
    return found


def _network_requests(job: JobVariables) -> list[Request]:
    found = []
    if job.network_mode:
        found.append(Request(NETWORK, "network_mode", job.network_mode))
    for index, network in enumerate(job.networks):
        found.append(Request(NETWORK, f"networks[{index}]", network))
    # With neither set, the loopback rule may give `host`: the operator's API URL asks for
    # it, not the deployment, so it is no request of the job's.
    return found


def _create_kwarg_requests(kwargs: dict[str, Any]) -> list[Request]:
    """Each key is a request of its own (the safe list decides); the keys that reach a
    capability with a rule of its own also meet that rule, value by value."""
    found = []
    for key in sorted(kwargs):
        if key in JobVariables.model_fields:
            continue  # the job's own variable wins; this key never reaches Docker
        value = kwargs[key]
        variable = f"container_create_kwargs.{key}"
        found.append(Request(CREATE_KEY, variable, key))
        if key == "network":
            found.append(Request(NETWORK, variable, str(value)))
        elif key == "mounts":
            for index, mount in enumerate(value if isinstance(value, list) else [value]):
                found.append(Request(MOUNT, f"{variable}[{index}]", parse_mount(mount)))
        elif key == "volumes_from":
            for source in value if isinstance(value, list) else [value]:
                found.append(Request(MOUNT, variable, Mount("container", str(source), "")))
        elif key == "device_requests":
            found.append(Request(GPU, variable, value))
        elif key == "security_opt":
            for option in value if isinstance(value, list) else [value]:
                if not _strengthens(str(option)):
                    found.append(Request(PRIVILEGE, variable, str(option)))
        elif key in _NAMESPACE_KEYS and _shares_namespace(value):
            found.append(Request(PRIVILEGE, variable, f"{key}: {value}"))
        elif key in ("oom_score_adj", "healthcheck"):
            found.append(Request(KERNEL, variable, (key, value)))
        elif key == "ulimits":
            for index, limit in enumerate(value if isinstance(value, list) else [value]):
                found.append(Request(KERNEL, f"{variable}[{index}]", ("ulimit", limit)))
    return found


def _strengthens(option: str) -> bool:
    """A security_opt entry known only to strengthen: no-new-privileges on, read-only
    cgroups, a named AppArmor profile the host's administrator loaded (not `unconfined`), an
    SELinux MCS level."""
    text = option.replace(" ", "").lower()
    if text in _STRENGTHENING_SECURITY_OPTS:
        return True
    kind, value = (re.split(r"[=:]", text, maxsplit=1) + [""])[:2]
    if kind == "apparmor":
        return bool(value) and value != "unconfined"
    return kind == "label" and value.startswith("level:")


def _shares_namespace(value: Any) -> bool:
    text = str(value or "").lower()
    return text == "host" or text.startswith("container:")


def parse_volume(spec: str) -> Mount:
    """`host:container[:mode]`, `name:container[:mode]` or `container` (anonymous)."""
    parts = spec.split(":")
    if len(parts) == 1:
        return Mount("anonymous", None, parts[0])
    source, target = parts[0], parts[1]
    read_only = len(parts) > 2 and "ro" in parts[2].split(",")
    kind = "bind" if source.startswith(("/", ".", "~")) or not source else "volume"
    return Mount(kind, source, target, read_only)


# A mount's keys as Docker's API has them. Its JSON decoder matches keys case-insensitively
# (Unicode-folded: `ſource` is `Source`) and ignores the ones it does not know: a mount is
# judged only in the form Docker reads the same way, each key once, in ASCII.
_MOUNT_KEYS = frozenset({"type", "source", "target", "readonly", "consistency", "bindoptions",
                         "volumeoptions", "tmpfsoptions"})
_OPTION_KEYS = {
    "bindoptions": frozenset({"propagation", "nonrecursive", "createmountpoint",
                              "readonlynonrecursive", "readonlyforcerecursive"}),
    "volumeoptions": frozenset({"nocopy", "labels", "driverconfig", "subpath"}),
    "tmpfsoptions": frozenset({"sizebytes", "mode", "options"}),
}


def _docker_keys(mapping: dict[Any, Any], known: frozenset[str]) -> dict[str, Any] | str:
    """The mapping's keys as Docker matches them; or why Docker might read it otherwise."""
    found: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key)
        if not name.isascii() or name.lower() not in known or name.lower() in found:
            return (f"mount key {name!r} is refused: a mount is judged only as Docker reads "
                    f"it ({', '.join(sorted(known))}, any case, each once)")
        found[name.lower()] = value
    return found


def parse_mount(mount: Any) -> Mount:
    """A `mounts` entry as Docker's API spells it (any key case), or the CLI's
    `type=bind,source=…,target=…` string. One Docker might read otherwise is `unreadable`."""
    if isinstance(mount, str):
        fields = dict(part.partition("=")[::2] for part in mount.split(","))
        aliases = {"src": "source", "dst": "target", "destination": "target", "ro": "readonly"}
        mount = {aliases.get(k.strip().lower(), k.strip().lower()): v for k, v in fields.items()}
    if not isinstance(mount, dict):
        return Mount("unreadable", f"{mount!r} is not a mount", "")
    values = _docker_keys(mount, _MOUNT_KEYS)
    if isinstance(values, str):
        return Mount("unreadable", values, "")
    options: dict[str, dict[str, Any]] = {}
    for name, known in _OPTION_KEYS.items():
        given = values.get(name) or {}
        read = _docker_keys(given, known) if isinstance(given, dict) else f"{name} is no mapping"
        if isinstance(read, str):
            return Mount("unreadable", read, "")
        options[name] = read
    kind = str(values.get("type") or "volume").lower()
    source = values.get("source")
    driver = bool(options["volumeoptions"].get("driverconfig"))
    read_only = bool(values.get("readonly"))
    target = str(values.get("target") or "")
    if kind == "volume" and not source:
        return Mount("anonymous", None, target, read_only, driver)
    if kind not in ("bind", "volume", "tmpfs"):
        kind = "bind"  # npipe, cluster, image…: judged as the worst case
    return Mount(kind, None if kind == "tmpfs" else str(source or ""), target, read_only,
                 driver)


# --- images a build names -----------------------------------------------------------------
_FROM = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE)
_COPY_FROM = re.compile(r"^(?:COPY|ADD)\s+.*?--from=(\S+)", re.IGNORECASE)
_MOUNT_FROM = re.compile(r"--mount=\S*?\bfrom=([^,\s]+)", re.IGNORECASE)
# a source ADD fetches itself, in any form the builder reads: a URL (also inside the JSON
# form, `ADD ["https://…", "/d"]`) or git's scp-like `user@host:repo`
_ADD_REMOTE = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"',\]]+|[\w.-]+@[\w.-]+:[^\s\"',\]]*",
                         re.IGNORECASE)


def dockerfile_instructions(lines: list[str]) -> list[str]:
    """The instructions in `lines`: continuation lines joined, comments and blanks dropped;
    a list entry holding several lines counts as several."""
    # comment lines go first: inside a continued instruction the builder skips them too
    text = "\n".join(line for line in "\n".join(lines).splitlines()
                     if not line.strip().startswith("#"))
    joined = re.sub(r"\\[ \t]*\n", " ", text)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _build_requests(job: JobVariables) -> list[Request]:
    plan = BuildPlan.from_job(job)
    if plan is None or not plan.dockerfile_lines:
        return []
    found = [Request(BUILD_STEP, "dockerfile_lines", len(plan.dockerfile_lines))]
    stages = {"0"}
    for instruction in dockerfile_instructions(plan.dockerfile_lines):
        named: list[str] = []
        if match := _FROM.match(instruction):
            named.append(match.group(1))
            if match.group(2):
                stages.add(match.group(2).lower())
            stages.add(str(len(stages)))
        elif instruction.split(None, 1)[0].upper() == "FROM":
            named.append(instruction.split(None, 1)[-1])  # unreadable: judged as an image
        if match := _COPY_FROM.match(instruction):
            named.append(match.group(1))
        named += _MOUNT_FROM.findall(instruction)
        for image in named:
            if image.lower() not in stages:
                found.append(Request(IMAGE, "dockerfile_lines", image))
        if instruction.split(None, 1)[0].upper() == "ADD":
            found += [Request(BUILD_FETCH, "dockerfile_lines", source)
                      for source in _ADD_REMOTE.findall(instruction)]
    return found

