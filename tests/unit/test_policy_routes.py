"""Every route to the host meets one rule per capability, whatever variable carries it."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from dockerworker.builds import BuildLimits
from dockerworker.capabilities import dockerfile_instructions, parse_mount, parse_volume
from dockerworker.hostview import PathRefused, Resolved, Stat, resolve
from dockerworker.jobs import JobVariables
from dockerworker.policy import Masker, Policy, mask_logging

LOOPBACK = "http://127.0.0.1:4200/api"
DEFAULT = Policy()


def refused(job: JobVariables, policy: Policy = DEFAULT, host=None) -> str:
    return "; ".join(policy.violations(job, host))


# --- network namespace: network_mode, each networks entry, create kwarg `network` ------------
@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({"network_mode": "host"}, "network_mode: 'host' is not allowed"),
        ({"networks": ["host"]}, "networks[0]: 'host' is not allowed"),
        ({"networks": ["host", "bridge"]}, "networks[0]: 'host' is not allowed"),
        ({"networks": ["bridge", "host"]}, "networks[1]: 'host' is not allowed"),
        ({"networks": ["backend", "container:db"]}, "networks[1]: 'container:db' is not allowed"),
        ({"networks": ["container:0123abcd"]}, "networks[0]: 'container:0123abcd'"),
        ({"container_create_kwargs": {"network": "host"}},
         "container_create_kwargs.network: 'host' is not allowed"),
    ],
)
def test_every_variable_that_picks_the_network_meets_the_network_rule(
    job: dict, expected: str
) -> None:
    assert expected in refused(JobVariables(**job))
    relaxed = Policy(allowed_network_modes=["bridge", "host", "container:*"],
                     allowed_create_kwargs=["network"])
    assert refused(JobVariables(**job), relaxed) == ""


class FakeHost:
    """A Docker host whose networks and paths the test decides."""

    def __init__(self, networks: dict[str, str] | None = None,
                 paths: dict[str, Resolved] | None = None) -> None:
        self.networks = networks or {}
        self.paths = paths or {}

    def network_driver(self, name: str) -> str | None:
        return self.networks.get(name)

    def resolve_bind(self, source: str, prefixes: list[str]) -> Resolved:
        found = self.paths.get(source, Resolved(source, "directory"))
        if found.kind == "refused":
            raise PathRefused(found.path)
        return found


def test_a_network_named_by_the_host_networks_id_is_the_host_network() -> None:
    host = FakeHost({"4f2a": "host", "backend": "bridge", "nothing": "null"})
    assert "'4f2a' (the host network) is not allowed" in refused(
        JobVariables(networks=["4f2a"]), host=host)
    assert "'nothing' (the none network)" not in refused(JobVariables(networks=["nothing"]),
                                                          host=host)
    assert refused(JobVariables(networks=["backend"]), host=host) == ""


def test_the_loopback_rule_is_the_operators_choice_not_the_deployments() -> None:
    from dockerworker.containers import network_mode_for

    assert network_mode_for(JobVariables(), LOOPBACK) == "host"
    assert refused(JobVariables()) == ""
    assert "network_mode: 'host'" in refused(JobVariables(network_mode="host"))


# --- mounts: volumes, mounts, volumes_from ---------------------------------------------------
@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({"volumes": ["pgdata:/var/lib/postgresql/data"]},
         "volumes[0]: named volume 'pgdata' is not allowed (allowed_named_volumes: none)"),
        ({"container_create_kwargs": {"mounts": [
            {"Type": "volume", "Source": "pgdata", "Target": "/d"}]}},
         "container_create_kwargs.mounts[0]: named volume 'pgdata' is not allowed"),
        ({"container_create_kwargs": {"mounts": [
            {"type": "bind", "source": "/etc", "target": "/e"}]}},
         "container_create_kwargs.mounts[0]: host path /etc is not under an allowed prefix"),
        ({"container_create_kwargs": {"mounts": ["type=bind,source=/,target=/host"]}},
         "container_create_kwargs.mounts[0]: host path / is not under an allowed prefix"),
        ({"container_create_kwargs": {"mounts": [{"Type": "volume", "Source": "x", "Target": "/x",
          "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": {
              "type": "none", "o": "bind", "device": "/"}}}}]}},
         "a volume with driver options can mount any host path"),
        ({"container_create_kwargs": {"volumes_from": ["prefect-server"]}},
         "the volumes of container 'prefect-server' cannot be mounted"),
    ],
)
def test_every_variable_that_mounts_meets_the_mount_rules(job: dict, expected: str) -> None:
    assert expected in refused(JobVariables(**job), Policy(allowed_create_kwargs=[
        "mounts", "volumes_from"]))


UNREADABLE = "is refused: a mount is judged only as Docker reads it"


@pytest.mark.parametrize(("mount", "expected"), [
    ({"Type": "bind", "Source": "/", "Target": "/host", "T_ype": "tmpfs"},  # Go ignores T_ype
     UNREADABLE),
    ({"Type": "volume", "Target": "/h", "VolumeOptions": {"driverconfig": {  # Go: DriverConfig
        "Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}}},
     "a volume with driver options can mount any host path"),
    ({"Type": "bind", "\u017fource": "/", "Target": "/host"},  # ſource folds to Source in Go
     UNREADABLE),
    ({"type": "tmpfs", "Type": "bind", "Source": "/", "Target": "/host"},  # one key, twice
     UNREADABLE),
    ({"Type": "bind", "Source": "/srv/data", "Target": "/d", "read_only": True},  # no ReadOnly
     UNREADABLE),
    ({"Type": "bind", "Source": "/srv/data", "Target": "/d", "BindOptions": ["rshared"]},
     "bindoptions is no mapping"),
], ids=["unknown-key", "lowercase-option", "unicode-fold", "twice", "snake-case", "options"])
def test_a_mount_docker_might_read_otherwise_than_the_policy_is_refused(
        mount: dict, expected: str) -> None:
    """Docker's JSON decoder matches keys case-insensitively (Unicode-folded) and ignores
    unknown ones: each of these was read as something harmless here and as the host's root
    (or a writable mount) by Docker (found by an audit)."""
    policy = Policy(allowed_create_kwargs=["mounts"], allowed_volume_prefixes=["/srv/data"])
    problem = refused(JobVariables(container_create_kwargs={"mounts": [mount]}), policy)
    assert problem.startswith("container_create_kwargs.mounts[0]: ") and expected in problem, (
        problem)


def test_a_mount_in_docker_s_own_spelling_is_judged_on_its_values() -> None:
    policy = Policy(allowed_create_kwargs=["mounts"], allowed_volume_prefixes=["/srv/data"])
    fine = {"TYPE": "bind", "source": "/srv/data/x", "Target": "/d", "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"}}
    assert refused(JobVariables(container_create_kwargs={"mounts": [fine]}), policy) == ""
    assert parse_mount(fine).read_only


def test_named_volumes_by_pattern() -> None:
    policy = Policy(allowed_named_volumes=["pip-cache", "team-*"])
    assert refused(JobVariables(volumes=["pip-cache:/root/.cache/pip"]), policy) == ""
    assert refused(JobVariables(volumes=["team-a-scratch:/s"]), policy) == ""
    assert "named volume 'pgdata'" in refused(JobVariables(volumes=["pgdata:/d"]), policy)
    assert refused(JobVariables(volumes=["/anonymous"])) == ""  # new and empty


def test_a_bind_source_is_judged_where_it_resolves_on_the_docker_host() -> None:
    policy = Policy(allowed_volume_prefixes=["/srv/flows"])
    host = FakeHost(paths={
        "/srv/flows/link": Resolved("/run/docker.sock", "socket"),
        "/srv/flows/up": Resolved("it leads to /etc, outside the allowed prefixes", "refused"),
        "/srv/flows/dev": Resolved("/srv/flows/dev", "device"),
        "/srv/flows/other.sock": Resolved("/srv/flows/other.sock", "socket"),
    })
    assert refused(JobVariables(volumes=["/srv/flows/data:/d"]), policy, host=host) == ""
    assert "exposes the Docker socket" in refused(
        JobVariables(volumes=["/srv/flows/link:/s"]), policy, host=host)
    assert "outside the allowed prefixes" in refused(
        JobVariables(volumes=["/srv/flows/up:/u"]), policy, host=host)
    assert "device node" in refused(JobVariables(volumes=["/srv/flows/dev:/d"]), policy,
                                    host=host)
    assert "another socket" in refused(JobVariables(volumes=["/srv/flows/other.sock:/o"]),
                                       policy, host=host)


# --- the walk itself, over a fake host file system -------------------------------------------
DIR, SYMLINK, SOCKET = Stat(1 << 31), Stat(1 << 27), Stat(1 << 24)


def walk(path: str, tree: dict[str, Stat], links: dict[str, str],
         prefixes: tuple[str, ...] = ("/srv/flows",)) -> Resolved:
    looked: list[str] = []

    def stat(candidate: str) -> Stat | None:
        looked.append(candidate)
        assert any(candidate == p or candidate.startswith(p + "/") for p in prefixes), (
            f"looked outside the prefixes: {candidate}")
        return tree.get(candidate)

    return resolve(path, list(prefixes), stat, links.__getitem__)


TREE = {"/srv/flows": DIR, "/srv/flows/a": DIR, "/srv/flows/a/b": DIR,
        "/srv/flows/sock-link": SYMLINK, "/srv/flows/rel": SYMLINK, "/srv/flows/up": SYMLINK,
        "/srv/flows/inside": SYMLINK, "/srv/flows/loop": SYMLINK, "/srv/flows/a/back": SYMLINK,
        "/srv/flows/s.sock": SOCKET}
LINKS = {"/srv/flows/sock-link": "/var/run/docker.sock", "/srv/flows/rel": "a/b",
         "/srv/flows/up": "../../../etc", "/srv/flows/inside": "/srv/flows/a",
         "/srv/flows/loop": "loop", "/srv/flows/a/back": "../../flows/a/b"}


def test_the_walk_follows_links_that_stay_inside_the_prefix() -> None:
    assert walk("/srv/flows/rel", TREE, LINKS) == Resolved("/srv/flows/a/b", "directory")
    assert walk("/srv/flows/inside/b/new/dir", TREE, LINKS) == Resolved(
        "/srv/flows/a/b/new/dir", "missing")
    assert walk("/srv/flows/a/back", TREE, LINKS) == Resolved("/srv/flows/a/b", "directory")
    assert walk("/srv/flows/s.sock", TREE, LINKS).kind == "socket"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/srv/flows/sock-link", "leads to /var, outside the allowed prefixes"),
        ("/srv/flows/up", "leads to /etc, outside the allowed prefixes"),
        ("/srv/flows/up/shadow", "leads to /etc"),
        ("/srv/flows/loop", "more than 40 symlinks"),
        ("/srv/flows/..", "leads to /srv, outside the allowed prefixes"),
        ("/srv/flows/s.sock/x", "is a socket, not a directory"),
    ],
)
def test_the_walk_refuses_links_that_leave_the_prefix(path: str, reason: str) -> None:
    with pytest.raises(PathRefused, match=reason):
        walk(path, TREE, LINKS)


# --- privileges, kernel knobs, devices, log routing, the safe list ----------------------------
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"security_opt": ["seccomp=unconfined"]}, "'seccomp=unconfined' gives host-level"),
        ({"security_opt": ["no-new-privileges:false"]}, "'no-new-privileges:false' gives"),
        ({"pid_mode": "host"}, "'pid_mode: host' gives host-level privileges"),
        ({"ipc_mode": "container:db"}, "'ipc_mode: container:db' gives"),
        ({"userns_mode": "host"}, "'userns_mode: host' gives"),
        ({"device_requests": [{"Driver": "nvidia", "Count": -1}]}, "GPU access"),
    ],
)
def test_keys_allowed_by_the_operator_still_meet_their_capabilitys_rule(
    kwargs: dict, expected: str
) -> None:
    policy = Policy(allowed_create_kwargs=list(kwargs))
    assert expected in refused(JobVariables(container_create_kwargs=kwargs), policy)
    both = Policy(allowed_create_kwargs=list(kwargs), allow_privileged=True, allow_gpus=True)
    assert refused(JobVariables(container_create_kwargs=kwargs), both) == ""


@pytest.mark.parametrize("option", [
    "no-new-privileges=0", "no-new-privileges:f", "seccomp=unconfined",
    'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}', "label=type:spc_t", "label=disable",
    "disable", "writable-cgroups=true", "apparmor=unconfined", "systempaths=unconfined",
    "a-form-docker-adds-later=1",
])
def test_every_security_opt_that_may_weaken_asks_for_privilege(option: str) -> None:
    """Not a list of known-bad forms: anything but a form known only to strengthen."""
    kwargs = {"security_opt": ["no-new-privileges:true", option]}
    policy = Policy(allowed_create_kwargs=["security_opt"])
    assert f"'{option}' gives host-level" in refused(
        JobVariables(container_create_kwargs=kwargs), policy)


def test_security_opts_that_only_strengthen_need_no_privilege() -> None:
    kwargs = {"security_opt": ["no-new-privileges", "NO-NEW-PRIVILEGES = true",
                               "apparmor=team-profile", "label=level:s0:c100,c200",
                               "writable-cgroups=false"]}
    policy = Policy(allowed_create_kwargs=["security_opt"])
    assert refused(JobVariables(container_create_kwargs=kwargs), policy) == ""


@pytest.mark.parametrize("key", ["log_config", "cpu_rt_runtime", "cpu_rt_period", "sysctls",
                                 "ports", "publish_all_ports", "runtime", "links", "cap_add",
                                 "devices", "device_cgroup_rules", "cgroup_parent", "group_add",
                                 "volume_driver", "oom_kill_disable", "a_field_docker_adds_later"])
def test_keys_outside_the_safe_list_are_refused(key: str) -> None:
    job = JobVariables(container_create_kwargs={key: "x"})
    assert f"container_create_kwargs.{key}: not allowed (allowed_create_kwargs)" in refused(job)


@pytest.mark.parametrize(("value", "ok"), [(0, True), (500, True), (1000, True), (-1, False),
                                           (-1000, False), (1001, False), ("x", False)])
def test_oom_score_adj_may_not_put_the_host_first(value: object, ok: bool) -> None:
    result = refused(JobVariables(container_create_kwargs={"oom_score_adj": value}))
    assert (result == "") is ok, result
    if not ok:
        assert "oom_score_adj must be 0 to 1000" in result


def test_job_variable_names_inside_create_kwargs_never_reach_docker() -> None:
    job = JobVariables(container_create_kwargs={"privileged": True, "network_mode": "host",
                                                "volumes": ["/:/host"], "image": "evil"})
    assert refused(job) == ""  # dropped by build_spec, as prefect-docker does


# --- pull policy and images, effective values -------------------------------------------------
def test_the_effective_pull_policy_is_what_is_checked() -> None:
    policy = Policy(allowed_pull_policies=["IfNotPresent", "Never"])
    assert "'Always' (the effective pull policy) is not allowed" in refused(
        JobVariables(image="registry.internal/flows"), policy)
    assert "'Always'" in refused(JobVariables(image="python:latest"), policy)
    assert refused(JobVariables(image="python:3.12"), policy) == ""
    assert refused(JobVariables(image="python", image_pull_policy="Never"), policy) == ""


# --- builds ------------------------------------------------------------------------------------
def test_dockerfile_lines_need_consent_and_pip_packages_do_not() -> None:
    assert refused(JobVariables(pip_packages=["six"], requirements="httpx\n")) == ""
    assert "dockerfile_lines: extra Dockerfile instructions need the operator's consent" in (
        refused(JobVariables(dockerfile_lines=["RUN true"])))
    assert refused(JobVariables(dockerfile_lines=["RUN true"]),
                   Policy(allow_dockerfile_lines=True)) == ""


@pytest.mark.parametrize(
    "lines",
    [
        ["FROM evil.example/miner:1"],
        ["COPY --from=evil.example/tools:1 /bin/x /x"],
        ["RUN --mount=type=bind,from=evil.example/keys:1,target=/k cat /k"],
        ["FROM python:3.12 AS ok", "COPY --from=evil.example/t:1 /a /a"],
        ["RUN true \\\n", "  && echo\nFROM evil.example/x"],
        ["from   --platform=linux/amd64 evil.example/y:2 as b"],
    ],
)
def test_every_image_a_build_names_must_be_allowed(lines: list[str]) -> None:
    policy = Policy(allow_dockerfile_lines=True,
                    allowed_images=["docker.io/library/*", "docker.io/dockerworker-test/*"])
    job = JobVariables(image="dockerworker-test/flows:dev", dockerfile_lines=lines)
    result = refused(job, policy)
    assert "dockerfile_lines: 'evil.example/" in result and "is not an allowed image" in result


def test_build_stages_are_not_images() -> None:
    policy = Policy(allow_dockerfile_lines=True, allowed_images=["docker.io/library/*"])
    lines = ["FROM python:3.12 AS tools", "RUN pip download six -d /w",
             "FROM python:3.12", "COPY --from=tools /w /w", "COPY --from=1 /w /v"]
    assert refused(JobVariables(image="python:3.12", dockerfile_lines=lines), policy) == ""


def test_add_from_a_url_is_fetched_by_the_daemon_and_refused() -> None:
    policy = Policy(allow_dockerfile_lines=True)
    assert "ADD http://169.254.169.254/latest/meta-data/ is fetched by the Docker daemon" in (
        refused(JobVariables(dockerfile_lines=[
            "ADD http://169.254.169.254/latest/meta-data/ /m"]), policy))


@pytest.mark.parametrize("lines", [
    ['ADD ["http://169.254.169.254/latest/meta-data/", "/m"]'],  # the JSON form
    ["ADD \\", "# a comment the builder skips", "http://169.254.169.254/latest/ /m"],
    ["ADD --chown=1000:1000 git@github.com:org/private.git /src"],  # git's scp-like form
    ["ADD local.txt https://169.254.169.254/latest/ /m"],  # not the first source
], ids=["json", "comment-in-continuation", "git", "second-source"])
def test_add_fetching_in_any_form_the_builder_reads_is_refused(lines: list[str]) -> None:
    """Found by an audit: the JSON form and a comment inside a continuation slipped by."""
    assert "is fetched by the Docker daemon itself" in refused(
        JobVariables(dockerfile_lines=lines), Policy(allow_dockerfile_lines=True))
    assert refused(JobVariables(dockerfile_lines=["ADD local.txt /m", "COPY a b"]),
                   Policy(allow_dockerfile_lines=True)) == ""


def test_dockerfile_instructions_join_continuations_and_split_lines() -> None:
    found = dockerfile_instructions(["RUN a \\", "  b", "# c", "FROM x\nRUN y"])
    assert [" ".join(line.split()) for line in found] == ["RUN a b", "FROM x", "RUN y"]


def test_builds_get_the_flow_containers_limits() -> None:
    policy = Policy(default_mem_limit="1g", default_cpus=1.5, pids_limit=100)
    limits = policy.build_limits(JobVariables(mem_limit="512m"))
    assert limits == BuildLimits("512m", 1_500_000_000, 100, True)
    assert limits.container_kwargs() == {"mem_limit": "512m", "nano_cpus": 1_500_000_000,
                                         "pids_limit": 100,
                                         "security_opt": ["no-new-privileges:true"]}
    assert limits.build_limits() == {"memory": 512 * 2**20, "memswap": 512 * 2**20}
    assert policy.build_limits(JobVariables()).mem_limit == "1g"


# --- parsing --------------------------------------------------------------------------------
def test_volume_and_mount_specs() -> None:
    assert parse_volume("/a:/b:ro").read_only and parse_volume("/a:/b").kind == "bind"
    assert parse_volume("name:/b").kind == "volume" and parse_volume("/b").kind == "anonymous"
    assert parse_mount({"type": "tmpfs", "target": "/t"}).kind == "tmpfs"
    assert parse_mount({"Type": "npipe", "Source": "x"}).kind == "bind"  # worst case
    assert parse_mount(42).kind == "unreadable"  # refused, saying why


# --- secrets ----------------------------------------------------------------------------------
def test_masking_covers_escaped_encoded_and_header_forms() -> None:
    secret = 'p"a\\ss wörd'
    mask = Masker({secret, "admin:" + secret})
    assert mask(json.dumps({"x": secret})) == '{"x": "***"}'
    assert mask(json.dumps({"x": secret}, ensure_ascii=False)) == '{"x": "***"}'
    assert mask("u=p%22a%5Css%20w%C3%B6rd") == "u=***"
    basic = base64.b64encode(("admin:" + secret).encode()).decode()
    assert mask(f"Authorization: Basic {basic}") == "Authorization: Basic ***"
    assert mask.data({"k": [secret, {"n": secret}]}) == {"k": ["***", {"n": "***"}]}


def test_every_logger_at_every_level_passes_through_the_mask(capsys) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root.addHandler(handler)
    try:
        mask_logging(Masker({"pnu_supersecret"}))
        logging.getLogger("websockets.client").warning("> Authorization: Bearer %s",
                                                       "pnu_supersecret")
        try:
            raise RuntimeError("token pnu_supersecret")
        except RuntimeError:
            logging.getLogger("httpx").exception("failed")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "pnu_supersecret" not in err
    assert "Bearer ***" in err and "RuntimeError: token ***" in err
