"""Meeting the server: wait until it answers and accepts our credentials; find (or create)
the work pool."""

from __future__ import annotations

import logging
import threading
from typing import Any

from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from .api import AuthRejected, NotFound, PrefectAPI, PrefectAPIError, ServerUnreachable, WorkPool
from .jobs import default_base_job_template

log = logging.getLogger(__name__)


def wait_for_server(api: PrefectAPI, pool: str, api_url: str, stop: threading.Event) -> None:
    """Keep trying until the server answers and accepts us; say clearly what is wrong."""

    def explain(state: Any) -> None:  # tenacity's before_sleep hook
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
            if stop.is_set():
                return
            api.health(patience=0)
            try:  # /health needs no credentials; a protected read proves the key works
                api.read_work_pool(pool, patience=0)
            except NotFound:
                pass
    log.info("Prefect server at %s is up", api_url)


def ensure_pool(api: PrefectAPI, name: str) -> WorkPool:
    """Use the pool as it is; create it (type docker, our template) when it is missing."""
    try:
        pool = api.read_work_pool(name)
    except NotFound:
        try:
            pool = api.create_work_pool(
                name, "docker", default_base_job_template(api.server.default_image)
            )
            log.info("created work pool %r (type docker)", pool.name)
        except PrefectAPIError:  # another replica may have created it meanwhile
            pool = api.read_work_pool(name)
    if pool.type != "docker":
        log.warning(
            "work pool %r is of type %r, not docker; its template is used as it is",
            pool.name,
            pool.type,
        )
    return pool
