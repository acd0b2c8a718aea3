"""Warming ahead: a run the poll sees scheduled for later gets a waiting container of its
configuration before it falls due, so that even the first run of a configuration starts warm.

With `--warm N`, after each poll (unless the last round is still at work) a second request
asks for the runs due in the WARM_LEAD seconds after the poll's horizon (at most N: the
claiming poll keeps its own limit, so runs due later never take the places of due ones).
Those, and the ones the poll found not yet due, are not claimed (pacing.py claims each when
it falls due), but their job is worked out as their claim would (deployment, pool template,
job variables and the blocks they name, policy, image, pulled if need be) and the warm pool
tops up that configuration (warm.py), in free places or those held beyond a share: a run not
yet claimed never evicts what runs in use keep warm.
Nothing of it is written to the run: another worker may claim it, and its own preparation,
when claimed, says what it does. A job that asks for dependencies is not warmed ahead
(building for a run not yet ours would write its build to nobody's logs: it is warmed from its
first run on); a job the policy refuses, one naming a secret file that is not there, a missing
image, a deployment gone: nothing is warmed, and the claim reports it as usual.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from .api import FlowRun, PrefectAPI
from .builds import Builder, BuildPlan
from .cache import CachedReads
from .containers import ContainerSpec
from .logs import LogShipper
from .pacing import scheduled_time
from .prepare import Preparation
from .runtime import Runtime
from .settings import WorkerSettings
from .warm import WarmPool

log = logging.getLogger(__name__)
WARM_LEAD = 60.0  # seconds: how much further than the poll's horizon to look while warm
SEEN_FOR = 2 * WARM_LEAD  # a run is worked out once in this long, in view or not


class WarmAhead:
    """Warms the configurations of runs scheduled for later: each run once (for SEEN_FOR
    seconds), at most the pool's size of configurations a round, soonest first, in one
    background thread at a time."""

    def __init__(self, warm: WarmPool, spec_of: Callable[[FlowRun, str], ContainerSpec | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`spec_of(run, pool name)`: the run's container as its claim would make it; None
        when there is none to warm (see the module's docstring)."""
        self.warm = warm
        self.spec_of = spec_of
        self.clock = clock
        self._seen: dict[UUID, float] = {}  # run id -> until when it is not worked out again
        self._busy: threading.Thread | None = None
        self._lock = threading.Lock()

    def busy(self) -> bool:
        """The last round is still at work (a slow pull): no need to look for more now."""
        return self._busy is not None and self._busy.is_alive()

    def see(self, later: list[FlowRun], pool_name: str) -> threading.Thread | None:
        """Warm for the runs in `later` not seen lately, soonest first; nothing while the
        last round is still at work: their next poll brings them again."""
        now = self.clock()
        with self._lock:
            if self.busy():
                return None
            self._seen = {run_id: until for run_id, until in self._seen.items() if until > now}
            new = [run for run in sorted(later, key=_soonest) if run.id not in self._seen]
            self._seen.update((run.id, now + SEEN_FOR) for run in new)
            if not new:
                return None
            self._busy = threading.Thread(target=self._warm_for, args=(new, pool_name),
                                          name="warm-ahead", daemon=True)
            self._busy.start()
            return self._busy

    def _warm_for(self, runs: list[FlowRun], pool_name: str) -> None:
        done: set[str] = set()  # the same deployment and run values: the same configuration
        for run in runs:
            if len(done) >= self.warm.size:
                return  # the pool holds no more: the soonest ones first
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


def _soonest(run: FlowRun) -> datetime:
    return scheduled_time(run) or datetime.max.replace(tzinfo=UTC)


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
    if any(not (settings.secrets_dir / name).is_file() for name in job.secrets):
        return None  # refused at its claim (the files themselves are read only then)
    runtime.ensure_image(job, settings.policy.trusts_credentials_for(job.image))
    flow = reads.flow(flow_run.flow_id)
    return quiet.container_spec(job, deployment, flow, pool)
