"""Warming ahead: a run the poll sees scheduled for later gets a waiting container of its
configuration before it falls due, so that even the first run of a configuration starts warm.

With `--warm N` a poll looks further ahead than the prefetch (WARM_LEAD seconds more): runs
found there are not claimed (pacing.py claims each when it falls due), but their job is worked
out as their claim would (deployment, pool template, job variables, policy, image) and the
warm pool tops up that configuration (warm.py). Nothing of it is written to the run: another
worker may claim it, and its own preparation, when claimed, says what it does. A job that asks
for dependencies is not warmed ahead (building for a run not yet ours would write its build to
nobody's logs: it is warmed from its first run on); a job the policy refuses, a missing
image, a deployment gone: nothing is warmed, and the claim reports it as usual.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from uuid import UUID

from .api import FlowRun, PrefectAPI
from .builds import Builder, BuildPlan
from .cache import CachedReads
from .containers import ContainerSpec
from .logs import LogShipper
from .prepare import Preparation
from .runtime import Runtime
from .settings import WorkerSettings
from .warm import WarmPool

log = logging.getLogger(__name__)
WARM_LEAD = 60.0  # seconds: how much further than the prefetch a poll looks while warm


class WarmAhead:
    """Warms the configurations of runs scheduled for later, once per run, in the background."""

    def __init__(self, warm: WarmPool, spec_of: Callable[[FlowRun, str], ContainerSpec | None]
                 ) -> None:
        """`spec_of(run, pool name)`: the run's container as its claim would make it; None
        when there is none to warm (see the module's docstring)."""
        self.warm = warm
        self.spec_of = spec_of
        self._seen: set[UUID] = set()
        self._lock = threading.Lock()

    def see(self, later: list[FlowRun], pool_name: str) -> threading.Thread | None:
        """Warm for the runs in `later` not seen before (one thread for them all); forget
        runs no longer in view (claimed, by us or another worker, or rescheduled)."""
        with self._lock:
            new = [run for run in later if run.id not in self._seen]
            self._seen = {run.id for run in later}
        if not new:
            return None
        thread = threading.Thread(target=self._warm_for, args=(new, pool_name),
                                  name="warm-ahead", daemon=True)
        thread.start()
        return thread

    def _warm_for(self, runs: list[FlowRun], pool_name: str) -> None:
        done: set[str] = set()  # the same deployment and run values: the same configuration
        for run in runs:
            same = json.dumps([str(run.deployment_id), run.job_variables], sort_keys=True,
                              default=str)
            if same in done:
                continue
            done.add(same)
            try:
                spec = self.spec_of(run, pool_name)
            except Exception as exc:  # noqa: BLE001 - its claim will say, in the run's logs
                log.debug("not warming ahead for flow run %s: %s", run.id, exc)
                continue
            if spec is not None:
                log.info("warming ahead for flow run %s (%s), scheduled for later", run.name,
                         run.id)
                self.warm.prewarm(spec)


def spec_ahead(api: PrefectAPI, runtime: Runtime, builder: Builder, settings: WorkerSettings,
               reads: CachedReads, shipper: LogShipper, flow_run: FlowRun, pool_name: str
               ) -> ContainerSpec | None:
    """The container a claim of `flow_run` would start now, worked out without a word to the
    run; None when it would build, or the run could not start (its claim will say why)."""
    if not flow_run.deployment_id:
        return None
    quiet = Preparation(api, runtime, builder, settings, flow_run, shipper, None,
                        say=lambda message: None, mask=lambda text: text,
                        cancelled=threading.Event(), read_pool=reads.pool)
    deployment = reads.deployment(flow_run.deployment_id)
    pool, job, _ = quiet.resolve_job(pool_name, deployment)
    if BuildPlan.from_job(job) is not None:
        return None
    if settings.policy.violations(job, runtime.host_view()):
        return None
    runtime.ensure_image(job, settings.policy.trusts_credentials_for(job.image))
    flow = reads.flow(flow_run.flow_id)
    return quiet.container_spec(job, deployment, flow, pool)
