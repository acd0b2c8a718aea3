"""A Docker engine of the test's own: a second `dockerd` beside the machine's, for tests that
restart an engine (or make it a Swarm manager) without touching the shared one.

It follows the recipe in ENVIRONMENT.md: its own bridge (never `--bridge none`, which deletes
the host's docker0), its own short data dir under /tmp with socket, exec root and pid file,
`--config-file` (the machine's daemon.json names a data root), `--iptables=false`, its own
default address pool and its own containerd (started by dockerd under the exec root). It starts
with no images: `load_images` copies them from the machine's engine (`image.save()` →
`images.load()`). `restart()` stops dockerd with SIGTERM and starts it on the same data root.
`stop()` cleans up in ENVIRONMENT.md's order and then checks that the machine's engine still
runs a container. A leftover of a killed test run (same root) is cleaned up by `start()`.
The `own_engine` fixture gives each pytest-xdist process a root, bridge and subnet of its own.

    with Engine() as engine:            # or the `own_engine` pytest fixture
        engine.load_images(docker.from_env(), "dockerworker-test/flows:dev")
        engine.client.containers.run(...)
        engine.restart()

The machine's engine is only read from (image export) and used for the final health check.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import docker
import docker.errors
import requests

HOST_CHECK_IMAGE = "dockerworker/local-python:bookworm"
DEFAULT_ROOT = "/tmp/dwr14"  # short: unix socket paths are limited to 108 bytes
DEFAULT_BRIDGE = "dwr14-br0"  # not dw2-br0: another session may run the recipe verbatim
DEFAULT_BRIDGE_CIDR = "172.30.14.1/24"
# ENVIRONMENT.md's recipe passes `--default-address-pool base=172.31.0.0/16,size=24`. Measured
# here: with any default address pool (and no live-restore), dockerd 20.10 on its SECOND start
# on a data root deletes the stored default network and then the interface named `docker0`
# (moby's removeDefaultBridgeInterface, hard-coded name): the machine's engine loses its
# bridge. So an engine that restarts gets no pool (the default pools are used, and dockerd
# skips subnets that overlap existing routes); `restart()` refuses when one is set.
RECIPE_POOL = "base=172.31.0.0/16,size=24"


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


def _link_exists(name: str) -> bool:
    return _run("ip", "link", "show", name).returncode == 0


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Engine:
    """A second dockerd on `root` (socket `root`/docker.sock) with bridge `bridge`."""

    def __init__(self, root: str = DEFAULT_ROOT, bridge: str = DEFAULT_BRIDGE,
                 bridge_cidr: str = DEFAULT_BRIDGE_CIDR, address_pool: str | None = None,
                 host_check_image: str = HOST_CHECK_IMAGE,
                 daemon_config: dict[str, Any] | None = None) -> None:
        """`daemon_config`: more keys for the engine's daemon.json (e.g. a Swarm node's
        generic resources)."""
        if bridge in ("docker0", "docker_gwbridge") or not bridge:
            raise ValueError(f"bridge {bridge!r} belongs to the machine's engine")
        self.root = Path(root)
        self.bridge = bridge
        self.bridge_cidr = bridge_cidr
        self.address_pool = address_pool
        self.host_check_image = host_check_image
        self.daemon_config = dict(daemon_config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._client: docker.DockerClient | None = None
        self._swarm = False
        self._lock_fd: int | None = None
        self.starts = 0

    # --- where things are --------------------------------------------------------------

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        """The engine's address for DOCKER_HOST / docker -H."""
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.root / "docker.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def client(self) -> docker.DockerClient:
        """A Docker SDK client of this engine (made again after each start)."""
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.host, timeout=120)
        return self._client

    def output(self, tail: int = 60) -> str:
        """The end of dockerd's own log, for failure messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])
        return ""

    # --- life --------------------------------------------------------------------------

    def _lock(self, timeout: float) -> None:
        """Hold `root`.lock while this engine lives: a second user of the same root (another
        test process) waits instead of ending our dockerd as a "leftover"; a killed process's
        lock is released by the kernel, so its leftover is ours to clean."""
        if self._lock_fd is not None:
            return
        fd = os.open(f"{self.root}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"{self.root} is in use by another process for "
                                       f"{timeout} s") from None
                time.sleep(0.5)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def start(self, timeout: float = 60.0, wait_for_root: float = 600.0) -> Self:
        """Take the root's lock (waiting up to `wait_for_root` s for another user), clean up a
        leftover of a killed run on the same root, make the bridge and the data dir, start
        dockerd and wait until it answers."""
        self._lock(wait_for_root)
        self.cleanup_leftover()
        self._make_bridge()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "daemon.json").write_text(json.dumps({
            "storage-driver": "fuse-overlayfs", "data-root": str(self.root / "data"),
            "mtu": 1400, "log-driver": "json-file", **self.daemon_config}))
        self._launch(timeout)
        return self

    def _make_bridge(self) -> None:
        if _link_exists(self.bridge):
            return
        for cmd in (("ip", "link", "add", self.bridge, "type", "bridge"),
                    ("ip", "addr", "add", self.bridge_cidr, "dev", self.bridge),
                    ("ip", "link", "set", self.bridge, "mtu", "1400", "up")):
            done = _run(*cmd)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")

    def _launch(self, timeout: float) -> None:
        cmd = [
            "dockerd", "--config-file", str(self.root / "daemon.json"),
            "--host", self.host, "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.pidfile), "--bridge", self.bridge, "--iptables=false",
            "--containerd-namespace", self.root.name,
            "--containerd-plugins-namespace", f"{self.root.name}-plugins",
        ]  # fmt: skip
        if self.address_pool:
            cmd += ["--default-address-pool", self.address_pool]
        host_bridge = _link_exists("docker0")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives a killed test; cleanup_leftover ends it
            )
        self._client = None
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                if self.client.ping():
                    self._check_docker0(host_bridge)
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd not answering after {timeout} s:\n{self.output()}")
            time.sleep(0.25)

    @staticmethod
    def _check_docker0(existed: bool) -> None:
        """Raise (after repairing it as ENVIRONMENT.md says) if the machine's docker0 vanished
        while our dockerd started."""
        if not existed or _link_exists("docker0"):
            return
        for cmd in (("ip", "link", "add", "docker0", "type", "bridge"),
                    ("ip", "addr", "add", "172.17.0.1/16", "dev", "docker0"),
                    ("ip", "link", "set", "docker0", "mtu", "1400", "up")):
            _run(*cmd)
        raise RuntimeError("the machine's docker0 vanished while our dockerd started; "
                           "it was made again (containers attached to it meanwhile lost it)")

    def _daemon_pid(self) -> int | None:
        """The pid of our dockerd (from the process we started, else from the pid file, only
        if that process really is a dockerd on our socket)."""
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            if _alive(pid) and "dockerd" in _cmdline(pid) and str(self.socket) in _cmdline(pid):
                return pid
        return None

    def stop_daemon(self, timeout: float = 60.0) -> None:
        """SIGTERM dockerd (it stops its containers and its containerd) and wait for it to
        end; SIGKILL only after `timeout`."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        pid = self._daemon_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline, killed = time.monotonic() + timeout, False
        while self._still_running(pid):
            if time.monotonic() > deadline:
                if killed:
                    raise RuntimeError(f"dockerd {pid} survived SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline, killed = time.monotonic() + 10, True
            time.sleep(0.2)
        self._end_containerd()

    def _still_running(self, pid: int) -> bool:
        if self.process is not None and self.process.pid == pid:
            return self.process.poll() is None
        return _alive(pid)

    def _end_containerd(self) -> None:
        """dockerd ends the containerd it started; one left by a SIGKILLed dockerd is ended
        here (only a containerd whose command line names our exec root)."""
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _alive(pid) and "containerd" in _cmdline(pid) and str(self.root) in _cmdline(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop dockerd with SIGTERM and start it again on the same data root."""
        self.stop_daemon()
        self.start_daemon(timeout)

    def start_daemon(self, timeout: float = 60.0) -> None:
        """Start dockerd again on the same data root after `stop_daemon()` (a restart with a
        down time of the test's choosing)."""
        if self.address_pool:
            raise ValueError("a restart with a default address pool deletes the machine's "
                             "docker0 (see RECIPE_POOL); start this engine without one")
        if self._daemon_pid() is not None:
            raise RuntimeError("dockerd is still running; stop_daemon() first")
        self._launch(timeout)

    def _unmount(self) -> None:
        """Unmount what the engine left mounted under its root (a SIGKILLed dockerd does)."""
        with contextlib.suppress(OSError):
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            for point in sorted((m for m in mounts if m.startswith(f"{self.root}/")),
                                key=len, reverse=True):
                _run("umount", "-l", point)

    def cleanup_leftover(self) -> None:
        """End a dockerd (and containerd) left on this root by a killed run, unmount, delete
        the data dir and the bridge."""
        if self.root.exists():
            self.stop_daemon()
            self._end_containerd()
            self._unmount()
            shutil.rmtree(self.root, ignore_errors=True)
        if _link_exists(self.bridge):
            _run("ip", "link", "delete", self.bridge)

    def stop(self, check_host: bool = True) -> None:
        """Clean up in ENVIRONMENT.md's order (swarm leave, dockerd, bridges, data dir), then
        check that the machine's engine still runs a container. Without the root's lock
        (never started, or stopped already) there is nothing of ours to stop."""
        if self._lock_fd is None:
            if check_host:
                self.check_host_engine()
            return
        if self._swarm:
            with contextlib.suppress(Exception):
                self.client.swarm.leave(force=True)
        self.stop_daemon()
        if self._swarm and _link_exists("docker_gwbridge"):
            _run("ip", "link", "delete", "docker_gwbridge")  # made by our swarm init only
        self._swarm = False
        self.cleanup_leftover()
        self._unlock()
        if check_host:
            self.check_host_engine()

    def check_host_engine(self) -> None:
        """`docker run --rm IMAGE true` on the machine's engine (DOCKER_HOST unset)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        host = docker.from_env(environment=env)
        try:
            host.containers.run(self.host_check_image, ["true"], remove=True)
        finally:
            host.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- contents ----------------------------------------------------------------------

    def load_images(self, source: docker.DockerClient, *names: str) -> list[str]:
        """Copy images from `source` (the machine's engine) unless this engine has them, all
        in one `docker save` (images on one base share its layers: sent once); return the
        names copied."""
        missing = []
        for name in names:
            try:
                self.client.images.get(name)
            except docker.errors.ImageNotFound:
                source.images.get(name)  # raises, naming it, if the machine lacks it too
                missing.append(name)
        if missing:
            api = source.api
            response = api._get(api._url("/images/get"), params={"names": missing}, stream=True)
            api._raise_for_status(response)
            self.client.images.load(response.iter_content(chunk_size=2 << 20))
            for name in missing:
                self.client.images.get(name)  # raises if the load did not name it
        return missing

    def swarm_init(self) -> Any:
        """Make this engine (never the machine's) a single-node Swarm manager."""
        self._swarm = True
        return self.client.swarm.init(advertise_addr="127.0.0.1")
