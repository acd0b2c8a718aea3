"""A single-node Docker Swarm on an engine of the test's own (never the machine's engine).

`SwarmEngine` is an `Engine` (engine.py: a second dockerd on its own socket, data root and
bridge) that `swarm init`s itself on loopback. Swarm makes a bridge named `docker_gwbridge` in
the host's network namespace; that name is host-wide, so only one Swarm engine can exist on
this machine at a time:

- a host-wide lock (`SWARM_LOCK`) is held while a SwarmEngine lives: a second one fails at once,
  loudly, naming the holder, rather than wait or clobber;
- before `swarm init` the rig makes `docker_gwbridge` itself (as Docker's docs allow) with
  host-mode published ports bound to 127.0.0.1 only, and writes `GWBRIDGE_MARK` naming its
  root: a later start deletes a `docker_gwbridge` left by a killed run only when that mark says
  it was a SwarmEngine's; any other `docker_gwbridge` is someone else's and start() fails.

The node advertises one fake GPU as a generic resource (`node-generic-resources`:
`NVIDIA-GPU=GPU-fake0`, FAKE_GPU): jobs reserving one are placed and see
`DOCKER_RESOURCE_NVIDIA-GPU=GPU-fake0`; jobs that reserve none are placed as before.

The engine runs with `--iptables=false` (ENVIRONMENT.md), so Swarm's routing mesh (ingress)
cannot work: publish ports with `mode: host`. This kernel has no IPVS either, so services'
virtual IPs answer nothing: use `endpoint_mode: dnsrr`. Overlay networks work on the one node.

Clean-up is ENVIRONMENT.md's order: `swarm leave --force`, stop dockerd, delete
`docker_gwbridge` and the engine's bridge, then check the machine's engine still runs a
container (`Engine.stop`).

    with SwarmEngine() as engine:        # or the session's `swarm_engine` fixture
        engine.load_images(docker.from_env(), "dockerworker/worker:test")
        engine.docker("stack", "deploy", "-c", "compose/stack.yml", "dw")
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import docker
import docker.errors

from .engine import Engine, _link_exists, _run

SWARM_ROOT = "/tmp/dwr17"
SWARM_BRIDGE = "dwr17-br0"
SWARM_BRIDGE_CIDR = "172.30.17.1/24"
GWBRIDGE = "docker_gwbridge"
GWBRIDGE_SUBNET = "172.30.18.0/24"  # beside the engine's own bridge, clear of docker0's
OVERLAY_POOL = "10.217.0.0/16"  # Swarm's default (10.0.0.0/8) is too wide to be sure of
SWARM_LOCK = "/tmp/dockerworker-swarm.lock"
GWBRIDGE_MARK = "/tmp/dockerworker-swarm.gwbridge"
GPU_KIND = "NVIDIA-GPU"  # Docker's convention for GPUs as generic resources
FAKE_GPU = "GPU-fake0"  # the one the node advertises: nothing behind it but the name


class SwarmEngine(Engine):
    """A second dockerd that is a single-node Swarm manager advertising 127.0.0.1."""

    def __init__(self, root: str = SWARM_ROOT, bridge: str = SWARM_BRIDGE,
                 bridge_cidr: str = SWARM_BRIDGE_CIDR, **kwargs: Any) -> None:
        kwargs.setdefault("daemon_config", {"node-generic-resources": [f"{GPU_KIND}={FAKE_GPU}"]})
        super().__init__(root, bridge, bridge_cidr, **kwargs)
        self._swarm_lock_fd: int | None = None

    # --- the host-wide name ------------------------------------------------------------

    def _lock_swarm(self) -> None:
        """Hold SWARM_LOCK, or fail loudly: another Swarm engine owns docker_gwbridge."""
        if self._swarm_lock_fd is not None:
            return
        fd = os.open(SWARM_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RuntimeError(f"another Swarm engine of the test rig lives ({holder}): only one "
                               f"can exist on a machine ({GWBRIDGE} is a host-wide name)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, root {self.root}\n".encode(), 0)
        self._swarm_lock_fd = fd

    def _unlock_swarm(self) -> None:
        if self._swarm_lock_fd is not None:
            os.close(self._swarm_lock_fd)
            self._swarm_lock_fd = None

    def _clear_gwbridge_leftover(self) -> None:
        """Delete a docker_gwbridge that a killed SwarmEngine left (its mark says so); fail on
        one that is not ours (another engine's Swarm, or someone running the recipe by hand)."""
        mark = Path(GWBRIDGE_MARK)
        if not _link_exists(GWBRIDGE):
            mark.unlink(missing_ok=True)
            return
        if not mark.exists():
            raise RuntimeError(f"{GWBRIDGE} exists and no SwarmEngine made it: another engine "
                               "is a Swarm node on this machine; refusing to touch it")
        owner = mark.read_text().strip()
        with contextlib.suppress(OSError):
            if owner != str(self.root) and Path(owner).exists():
                raise RuntimeError(f"{GWBRIDGE} belongs to the Swarm engine on {owner}")
        done = _run("ip", "link", "delete", GWBRIDGE)
        if done.returncode != 0:
            raise RuntimeError(f"could not delete the leftover {GWBRIDGE}: {done.stderr}")
        mark.unlink(missing_ok=True)

    # --- life --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0, wait_for_root: float = 600.0) -> Self:
        """Take the host-wide Swarm lock (or fail), clean a killed run's leftovers (dockerd,
        data, bridges), start dockerd and make it a Swarm manager."""
        self._lock_swarm()
        try:
            self._lock(wait_for_root)
            self.cleanup_leftover()  # a killed run's dockerd first: it may hold the gwbridge
            self._clear_gwbridge_leftover()
            super().start(timeout, wait_for_root)
            self.swarm_init()
        except BaseException:
            self.stop(check_host=False)
            raise
        return self

    def swarm_init(self) -> Any:
        """Make docker_gwbridge (host-mode ports on 127.0.0.1 only), then `swarm init` on
        loopback with overlay subnets from OVERLAY_POOL."""
        Path(GWBRIDGE_MARK).write_text(f"{self.root}\n")
        self._swarm = True
        self.client.networks.create(
            GWBRIDGE, driver="bridge", ipam=docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=GWBRIDGE_SUBNET)]),
            options={
                "com.docker.network.bridge.name": GWBRIDGE,
                "com.docker.network.bridge.enable_icc": "false",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
                "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
                "com.docker.network.driver.mtu": "1400",
            })
        return self.client.swarm.init(
            advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377",
            default_addr_pool=[OVERLAY_POOL], subnet_size=24)

    def stop(self, check_host: bool = True) -> None:
        """Engine.stop (swarm leave, dockerd, docker_gwbridge, bridge, data, host check), then
        drop the mark and the host-wide lock."""
        try:
            super().stop(check_host=False)
            if not _link_exists(GWBRIDGE) and self._lock_fd is None:
                Path(GWBRIDGE_MARK).unlink(missing_ok=True)
        finally:
            self._unlock_swarm()
        if check_host:
            self.check_host_engine()

    # --- using it ----------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The `docker` CLI against this engine, with `env` added to ours (less DOCKER_*);
        raises on failure. Tests may shell out; the product never does."""
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
                **(env or {})}
        done = subprocess.run(["docker", "-H", self.host, *args], env=full, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float,
                 describe: Callable[[], str] = lambda: "") -> Any:
        """Poll `check` until it returns something true; fail naming `what` and `describe()`."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(docker.errors.DockerException):
                if result := check():
                    return result
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not after {timeout} s\n{describe()}")
            time.sleep(1)


STACK_FILE = Path(__file__).resolve().parents[2] / "compose" / "stack.yml"


class SwarmStack:
    """compose/stack.yml deployed with `docker stack deploy` on a SwarmEngine, with the
    machine's local images (loaded into the engine: nothing can be pulled here), the server
    published on a loopback port (host mode) and service names resolved by DNS round robin
    (this kernel has no IPVS for Swarm's virtual IPs)."""

    def __init__(self, engine: SwarmEngine, name: str, pool: str, port: int,
                 images: dict[str, str], network: str, **env: str) -> None:
        self.engine, self.name, self.pool, self.port, self.network = (
            engine, name, pool, port, network)
        socket_gid = str(os.stat(engine.socket).st_gid)
        self.env = {
            "POSTGRES_IMAGE": images["postgres"], "PREFECT_IMAGE": images["server"],
            "DOCKERWORKER_IMAGE": images["worker"], "PREFECT_PORT": str(port),
            "PREFECT_PUBLISH_MODE": "host", "SWARM_ENDPOINT_MODE": "dnsrr",
            "PREFECT_NETWORK": network, "DOCKERWORKER_POOL": pool,
            "DOCKER_SOCKET": str(engine.socket), "DOCKER_GID": socket_gid, **env,
        }

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def service(self, short: str) -> str:
        return f"{self.name}_{short}"

    def _docker(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.engine.docker(*args, timeout=timeout, env=self.env)

    def deploy(self) -> str:
        """`docker stack deploy` (detached: the test waits for what it needs); its output.
        Older CLIs have no --detach and never wait."""
        detach = (["--detach=true"] if "--detach" in self._docker(
            "stack", "deploy", "--help").stdout else [])
        done = self._docker("stack", "deploy", *detach, "-c", str(STACK_FILE), self.name)
        return done.stdout + done.stderr

    def remove(self) -> None:
        """`docker stack rm`, then the flow containers the workers left (they are not part of
        the stack) and the stack's volume once its containers are gone."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._docker("stack", "rm", self.name, timeout=120)
        client = self.engine.client
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = client.containers.list(all=True, filters={
                "label": f"com.docker.stack.namespace={self.name}"})
            if not left:
                break
            time.sleep(1)
        for label in ("io.prefect.work-pool-name", "io.dockerworker.owner-pool"):
            for container in client.containers.list(all=True, filters={
                    "label": f"{label}={self.pool}"}):  # flow containers, takeover records
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
        with contextlib.suppress(docker.errors.APIError):
            client.volumes.get(f"{self.name}_postgres-data").remove(force=True)

    def update_force(self, short: str) -> str:
        """`docker service update --force`: Swarm replaces the service's tasks."""
        done = self._docker("service", "update", "--force", "--detach=true",
                            self.service(short))
        return done.stdout + done.stderr

    def logs(self, short: str, tail: int = 60) -> str:
        """A service's logs (every task's), for failure messages."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            done = self._docker("service", "logs", "--no-trunc", "--tail", str(tail),
                                self.service(short), timeout=60)
            return done.stdout + done.stderr
        return ""

    def tasks(self, short: str) -> str:
        """`docker service ps` of a service, for failure messages."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            return self._docker("service", "ps", "--no-trunc", self.service(short)).stdout
        return ""

    def describe(self) -> str:
        return "\n".join(f"--- {s} ---\n{self.tasks(s)}{self.logs(s, 25)}"
                         for s in ("postgres", "server", "worker"))

    def running_containers(self, short: str) -> list[Any]:
        """The service's running task containers on this engine."""
        return self.engine.client.containers.list(filters={
            "label": f"com.docker.swarm.service.name={self.service(short)}"})
