"""Following one container's output to its end, through an engine restart.

While the engine is unreachable (restarting, socket gone) every call is retried for up to
DOCKER_PATIENCE; afterwards the output stream may have ended early, so following resumes from
the server's cursor (logs.py): no line lost, none doubled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from .api import FlowRun, PrefectAPI
from .containers import ExitReport, WatchOptions
from .logformat import echo
from .logs import LogShipper, ResumePoint, RunOutput, resume_point
from .runtime import EngineUnavailable, Runtime, Workload, WorkloadGone
from .verdict import Detached

log = logging.getLogger(__name__)
DOCKER_PATIENCE = 600.0  # how long a run waits for a restarting Docker engine
T = TypeVar("T")



class Follower:
    """One run's container output on its way to the server, and how the container ended."""

    def __init__(self, api: PrefectAPI, runtime: Runtime, shipper: LogShipper,
                 flow_run: FlowRun, label: str) -> None:
        self.api = api
        self.runtime = runtime
        self.shipper = shipper
        self.flow_run = flow_run
        self.label = label
        self.output: RunOutput | None = None
        self._stopped = threading.Event()
        self.engine_trouble = False  # the engine went away while following (a restart)

    def follow(self, workload: Workload, options: WatchOptions, mask: Callable[[str], str],
               resume: ResumePoint | None) -> ExitReport | None:
        """Follow to the end; how it ended (None: the container vanished). Raises `Detached`
        when the worker is leaving (whoever adopts the container judges it)."""
        name, run_id = self.flow_run.name, str(self.flow_run.id)
        self.output = RunOutput(
            self.shipper,
            self.flow_run.id,
            max_bytes=options.max_log_bytes,
            echo=(lambda text: echo(name, text, run_id)) if options.stream_output else None,
            skip_engine_records=options.skip_engine_records,
            mask=mask,
        )
        if self._stopped.is_set():
            self.output.stop()
        try:
            self._with_engine(lambda: self._follow(workload, resume))
            if self.output.stopped:
                raise Detached
            self._with_engine(lambda: self.runtime.wait(workload))
            report = self._with_engine(lambda: self.runtime.read_exit(workload))
            if self.engine_trouble:  # the output stream may have ended early: catch up
                self._with_engine(lambda: self._follow(workload, None))
        except WorkloadGone:
            return None
        return report

    def summary(self) -> str:
        """After the end: the truncation notice is queued; what was shipped, in a line."""
        assert self.output is not None
        return self.output.close()

    def stop(self) -> None:
        """The worker is leaving: stop shipping output (a later worker resumes from the server)."""
        self._stopped.set()
        if self.output is not None:
            self.output.stop()

    def _follow(self, workload: Workload, resume: ResumePoint | None) -> None:
        """Follow the output; after trouble with the engine, resume from the server's cursor."""
        assert self.output is not None
        if self.engine_trouble:
            self.shipper.flush(timeout=30)
            resume = resume_point(self.api, self.flow_run.id)
        self.runtime.follow(workload, self.output, resume)

    def _with_engine(self, call: Callable[[], T]) -> T:
        """`call`, retried while the container engine is unreachable (restarting)."""

        def note(state: object) -> None:
            self.engine_trouble = True
            log.warning("%s: Docker engine unreachable; retrying", self.label)

        retrying = Retrying(
            retry=retry_if_exception_type(EngineUnavailable),
            wait=wait_exponential_jitter(multiplier=1, max=15),
            stop=stop_after_delay(DOCKER_PATIENCE),
            before_sleep=note,
            reraise=True,
        )
        return retrying(call)
