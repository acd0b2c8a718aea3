"""Prometheus metrics: one registry, fed by the places that already know.

Served as `GET /metrics` on the health port (health.py), in Prometheus' text format by
prometheus-client. Labels stay bounded: states, reasons, rounds, endpoints with their ids
replaced by `{id}` — never run ids or deployment names.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)
_PREFIX = "dockerworker_"
# Seconds, from a warm hand-over (~0.1 s) to a slow cold start with a build (minutes).
_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)
_LIFETIME_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(_PREFIX + name, doc, labels, registry=REGISTRY)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(_PREFIX + name, doc, labels, registry=REGISTRY)


def _histogram(name: str, doc: str, buckets: tuple[float, ...] = _START_BUCKETS,
               labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(_PREFIX + name, doc, labels, buckets=buckets, registry=REGISTRY)


BUILD_INFO = Info(_PREFIX + "build", "dockerworker's version, the Prefect server's and the "
                  "Docker engine's", registry=REGISTRY)

# --- runs ------------------------------------------------------------------------------------
RUNS_CLAIMED = _counter("runs_claimed", "Flow runs this worker claimed (PENDING accepted).")
CLAIMS_LOST = _counter("claims_lost", "Claims the server gave to another worker.")
RUNS_STARTED = _counter("runs_started", "Flow run containers started, by how.", ("start",))
RUNS_FINISHED = _counter(
    "runs_finished", "Flow runs this worker saw to an end, by the state it left them in "
    "(completed, failed, crashed, cancelled, paused, rescheduled) and the reason.",
    ("state", "reason"))
RUNS_IN_FLIGHT = _gauge("runs_in_flight", "Flow runs this worker holds now.")
RUNS_STARTING = _gauge("runs_starting", "Flow runs claimed and not yet RUNNING.")
LIMIT = _gauge("limit", "--limit (most runs at once; absent: no limit).")
MAX_STARTING = _gauge("max_starting", "--max-starting (most runs starting at once; 0: none).")
PICKUP_SECONDS = _histogram(
    "pickup_seconds", "From a run being due (created, or its scheduled time) to its claim.")
CLAIM_TO_START_SECONDS = _histogram(
    "claim_to_container_start_seconds", "From the claim to the run's container started.")
START_TO_RUNNING_SECONDS = _histogram(
    "container_start_to_running_seconds",
    "From the container started to the run reported RUNNING (as the event stream tells).")
CONTAINER_LIFETIME_SECONDS = _histogram(
    "container_lifetime_seconds", "From a run's container started to its end.",
    _LIFETIME_BUCKETS)
PEAK_MEMORY_RATIO = _histogram(
    "run_peak_memory_ratio", "Runs' peak memory over their mem_limit, for runs with a limit "
    "whose peak was read (the resource report, resources.py).",
    (0.1, 0.25, 0.5, 0.75, 0.9, 1.0))

# --- warm starts, images ------------------------------------------------------------------------
WARM_WAITING = _gauge("warm_containers_waiting", "Warm containers waiting for a run.")
WARM_READY = _gauge("warm_containers_ready",
                    "Warm containers waiting for a run that have imported Prefect.")
WARM_HANDOVERS = _counter("warm_handovers", "Runs handed to a warm container.")
WARM_MISSES = _counter("warm_misses", "Runs started cold with warm starts on.")
WARM_EVICTIONS = _counter("warm_evictions", "Warm containers removed unused (evicted, expired).")
BUILDS = _counter("builds", "Dependency image requests, by result (built, cached, failed).",
                  ("result",))
BUILD_SECONDS = _histogram("build_seconds", "Dependency image builds that ran.",
                           (5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800))
PULLS = _counter("image_pulls", "Images made available for runs, by result (pulled, present, "
                 "failed).", ("result",))
PULL_SECONDS = _histogram("image_pull_seconds", "Image pulls that ran.")

# --- output -----------------------------------------------------------------------------------------
LOG_LINES_SHIPPED = _counter("log_lines_shipped", "Log lines sent to the Prefect server.")
LOG_BYTES_SHIPPED = _counter("log_bytes_shipped", "Bytes of log messages sent to the server.")
LOG_LINES_DROPPED = _counter("log_lines_dropped", "Log lines dropped (cap, backpressure, "
                             "refused by the server).")
LOG_BATCHES = _counter("log_batches", "POST /logs/ batches sent.")
LOG_POST_FAILURES = _counter("log_post_failures", "POST /logs/ attempts that failed.")
SHIPPER_QUEUE = _gauge("log_shipper_queue", "Log lines waiting to be shipped.")

# --- the outside world ------------------------------------------------------------------------------
API_REQUESTS = _counter("prefect_api_requests", "Prefect API requests, by endpoint, method "
                        "and status class (2xx, 4xx, 5xx, error).",
                        ("endpoint", "method", "status"))
DOCKER_ERRORS = _counter("docker_errors", "Docker engine errors, by kind (unavailable, "
                         "refused, gone).", ("kind",))
EVENT_STREAM_CONNECTED = _gauge("event_stream_connected",
                                "1 while the server's event stream is connected.")
EVENT_STREAM_RECONNECTS = _counter("event_stream_connections", "Event stream subscriptions "
                                   "(reconnects after the first).")
ROUND_FAILURES = _counter("loop_round_failures", "Loop rounds that failed (each tried again at "
                          "its next turn), by round.", ("round",))

_ID = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?=/|$)")
# names a job or a deployment chooses: each would be a series of its own
_NAMED = [(re.compile(pattern), label) for pattern, label in (
    (r"^/work_pools/[^/]+", "/work_pools/{name}"),
    (r"^/deployments/name/[^/]+/[^/]+", "/deployments/name/{flow}/{deployment}"),
    (r"^/variables/name/[^/]+", "/variables/name/{name}"),
    (r"^/block_types/slug/[^/]+/block_documents/name/[^/]+",
     "/block_types/slug/{slug}/block_documents/name/{name}"),
)]


def endpoint(path: str) -> str:
    """`/flow_runs/<uuid>/set_state` → `/flow_runs/{id}/set_state`: a bounded label."""
    path = "/" + path.split("?", 1)[0].lstrip("/")
    path = _ID.sub("/{id}", path)
    for pattern, label in _NAMED:
        path = pattern.sub(label, path)
    return path


def status_class(code: int | None) -> str:
    return "error" if code is None else f"{code // 100}xx"


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    """Observe the seconds the block took, when it ends without raising."""
    started = time.monotonic()
    yield
    histogram.observe(time.monotonic() - started)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A value of the registry (0 when absent): for tests and the docs' examples."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def watch(gauge: Gauge, read: Callable[[], float]) -> None:
    """`gauge` reads `read()` at each scrape (no bookkeeping where the value already lives)."""
    gauge.set_function(read)
