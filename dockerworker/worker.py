"""The worker loop: wait for the server, make sure the pool exists, heartbeat, poll, claim.

Each claimed run gets a RunSupervisor thread; `--limit` bounds how many are in flight, and a
slot is freed the moment its supervisor ends (a rejected claim ends it at once).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

import docker
from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from .api import (
    AuthRejected,
    FlowRun,
    NotFound,
    PrefectAPI,
    PrefectAPIError,
    ServerUnreachable,
    WorkPool,
)
from .builds import Builder
from .jobs import default_base_job_template
from .logs import LogShipper
from .runs import RunSupervisor
from .settings import WorkerSettings

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self, settings: WorkerSettings, api: PrefectAPI, docker_client: docker.DockerClient
    ) -> None:
        self.settings = settings
        self.api = api
        self.docker = docker_client
        self.stop_event = threading.Event()
        self._active: dict[UUID, threading.Thread] = {}
        self._lock = threading.Lock()
        self.pool: WorkPool | None = None
        self.shipper = LogShipper(api)
        self.builder = Builder(docker_client, settings.build_options(), holder=settings.name)

    # --- start-up -----------------------------------------------------------------------
    def wait_for_server(self) -> None:
        """Keep trying until the server answers; say clearly what is wrong meanwhile."""

        def explain(state) -> None:  # tenacity's before_sleep hook
            log.warning(
                "%s; retrying in %.0fs", state.outcome.exception(), state.next_action.sleep
            )

        for attempt in Retrying(
            retry=retry_if_exception_type((ServerUnreachable, AuthRejected)),
            wait=wait_exponential_jitter(multiplier=1, max=10),
            before_sleep=explain,
            reraise=True,
        ):
            with attempt:
                if self.stop_event.is_set():
                    return
                self.api.health(attempts=1)
                self._check_auth()
        log.info("Prefect server at %s is up", self.settings.api_url)

    def _check_auth(self) -> None:
        """/health answers without credentials; a protected read proves the key is accepted."""
        try:
            self.api.read_work_pool(self.settings.pool)
        except NotFound:
            pass

    def ensure_pool(self) -> WorkPool:
        """Use the pool as it is; create it (type docker, our template) when it is missing."""
        try:
            pool = self.api.read_work_pool(self.settings.pool)
        except NotFound:
            try:
                pool = self.api.create_work_pool(
                    self.settings.pool, "docker", default_base_job_template()
                )
                log.info("created work pool %r (type docker)", pool.name)
            except PrefectAPIError:  # another replica may have created it meanwhile
                pool = self.api.read_work_pool(self.settings.pool)
        if pool.type != "docker":
            log.warning(
                "work pool %r is of type %r, not docker; its template is used as it is",
                pool.name,
                pool.type,
            )
        return pool

    # --- loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.shipper.start()
        try:
            return self._loop()
        finally:
            self.shipper.stop(timeout=30)

    def _loop(self) -> int:
        self.wait_for_server()
        if self.stop_event.is_set():
            return 0
        self.pool = self.ensure_pool()
        log.info(
            "worker %s polling pool %r%s every %.1fs (limit %s)",
            self.settings.name,
            self.pool.name,
            f" queues {self.settings.work_queues}" if self.settings.work_queues else "",
            self.settings.poll_interval,
            self.settings.limit or "none",
        )
        next_heartbeat = next_poll = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = now + self.settings.heartbeat_interval
            if now >= next_poll:
                self.poll()
                next_poll = now + self.settings.poll_interval
                if self.settings.run_once:
                    self.wait_for_runs()
                    return 0
            self.stop_event.wait(max(0.0, min(next_heartbeat, next_poll) - time.monotonic()))
        return 0

    def _heartbeat(self) -> None:
        try:
            self.api.heartbeat(
                self.settings.pool, self.settings.name, self.settings.heartbeat_interval
            )
            self.pool = self.api.read_work_pool(self.settings.pool)
        except NotFound:
            log.warning("work pool %r is gone; creating it again", self.settings.pool)
            self.pool = self.ensure_pool()
        except PrefectAPIError as exc:
            log.warning("heartbeat failed: %s", exc)

    def free_slots(self) -> int | None:
        with self._lock:
            if self.settings.limit is None:
                return None
            return self.settings.limit - len(self._active)

    def poll(self) -> None:
        """Ask for what is due (now + prefetch) and start a supervisor per run, within --limit."""
        free = self.free_slots()
        if free is not None and free <= 0:
            return
        before = datetime.now(UTC) + timedelta(seconds=self.settings.prefetch_seconds)
        try:
            runs = self.api.get_scheduled_flow_runs(
                self.settings.pool, before, free, self.settings.work_queues
            )
        except NotFound:
            log.warning("work pool %r not found; it is created again at the next heartbeat",
                        self.settings.pool)
            return
        except PrefectAPIError as exc:
            log.warning("poll failed: %s", exc)
            return
        for flow_run in runs:
            self._submit(flow_run)

    def _submit(self, flow_run: FlowRun) -> None:
        assert self.pool is not None
        with self._lock:
            if flow_run.id in self._active:
                return
            if self.settings.limit is not None and len(self._active) >= self.settings.limit:
                return
            supervisor = RunSupervisor(
                self.api, self.docker, self.settings, self.pool, flow_run, self.shipper,
                self.builder, on_done=self._done,
            )
            thread = threading.Thread(
                target=supervisor.run, name=f"run-{flow_run.id.hex[:8]}", daemon=True
            )
            self._active[flow_run.id] = thread
        thread.start()

    def _done(self, flow_run: FlowRun) -> None:
        with self._lock:
            self._active.pop(flow_run.id, None)

    def wait_for_runs(self) -> None:
        """Block until every supervisor has finished (or a stop is requested)."""
        while not self.stop_event.is_set():
            with self._lock:
                threads = list(self._active.values())
            if not threads:
                return
            threads[0].join(timeout=0.5)

    def active_runs(self) -> int:
        with self._lock:
            return len(self._active)
