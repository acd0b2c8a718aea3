"""The Prefect REST calls the worker makes: one method each, retried where retrying is safe.

The worker speaks the REST API itself (no `prefect` import): a small httpx client,
pydantic models for what it reads, tenacity for backoff on transient failures.

One worker serves Prefect 2.x and 3.x servers. The client asks the server its version once
(`GET /admin/version`) and `PrefectAPI.server` (a `ServerInfo`) says what follows from it:
the default image, whether there is an event stream, whether basic auth exists. The rest of
the worker reads those properties; no other module compares versions. A deployment's job
variables are read under either name (`job_variables`, or 2.x's `infra_overrides`).

Servers with CSRF protection (`PREFECT_SERVER_CSRF_PROTECTION_ENABLED`, both majors) get a
token (`GET /csrf-token?client=…`) sent with every write, fetched again when it expires or is
refused; a refused token is never reported as rejected credentials.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import quote, urlsplit
from uuid import UUID

import httpx
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from . import metrics
from .csrf import WRITE_METHODS, CsrfTokens
from .jobs import DEFAULT_IMAGE, with_default_image

log = logging.getLogger(__name__)


class PrefectAPIError(Exception):
    """A request the server answered with an error, or could not be made at all. `status` is
    the HTTP status of the answer (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachable(PrefectAPIError):
    """No answer from the server (connection refused, timeout, 5xx/429 after retries)."""


class AuthRejected(PrefectAPIError):
    """401/403: the credentials were refused; retrying will not help."""


class NotFound(PrefectAPIError):
    """404: the object does not exist (any more)."""


class CsrfRefused(PrefectAPIError):
    """403 from the server's CSRF protection even with a fresh token (not a credentials issue)."""


PREFECT_3_DEFAULT_IMAGE = DEFAULT_IMAGE
PREFECT_2_PYTHON = "3.11"  # the Python of a 2.x server's default image tag


@dataclass(frozen=True)
class ServerInfo:
    """What the worker must do differently for this server, decided from its version once.

    `event_stream`: the server streams flow-run events at `/api/events/out` (3.x; 2.x only
    with PREFECT_EXPERIMENTAL_EVENTS on, read from `/admin/settings`); without one the worker
    does not try to subscribe, and polling carries the work. `basic_auth`: the server can
    have PREFECT_SERVER_API_AUTH_STRING (3.x only).
    """

    version: str
    event_stream: bool = True

    @property
    def major(self) -> int:
        head = self.version.lstrip("v").split(".", 1)[0]
        return int(head) if head.isdigit() else 3

    @property
    def default_image(self) -> str:
        """The image a run gets when neither pool nor deployment names one: a Prefect client
        of the server's own major (a 3.x client cannot talk to a 2.x server)."""
        if self.major == 2:
            return f"prefecthq/prefect:{self.version}-python{PREFECT_2_PYTHON}"
        return PREFECT_3_DEFAULT_IMAGE

    @property
    def basic_auth(self) -> bool:
        return self.major >= 3

    def limitations(self) -> list[str]:
        """What the worker cannot do with this server (for `doctor` and the docs)."""
        if self.major >= 3:
            return []
        found = [
            ("cancellation stops the engine with SIGTERM (Prefect 2 engines have no control "
            "channel); the run still ends CANCELLED and on_cancellation hooks run"),
            ("no basic auth: PREFECT_SERVER_API_AUTH_STRING / PREFECT_API_AUTH_STRING are "
            "Prefect 3 settings"),
        ]
        if not self.event_stream:
            found.append("no event stream (PREFECT_EXPERIMENTAL_EVENTS is off): runs are picked "
                         "up by polling (--poll-interval)")
        return found


class StateType(StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


FINAL_STATES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class State(_Model):
    type: StateType
    name: str | None = None
    message: str | None = None

    @property
    def is_final(self) -> bool:
        return self.type in FINAL_STATES


class FlowRun(_Model):
    id: UUID
    name: str
    flow_id: UUID
    deployment_id: UUID | None = None
    work_queue_name: str | None = None
    work_pool_name: str | None = None
    state: State | None = None
    job_variables: dict[str, Any] | None = None
    infrastructure_pid: str | None = None
    created: datetime | None = None
    expected_start_time: datetime | None = None
    next_scheduled_start_time: datetime | None = None  # a scheduled run's due time


class Deployment(_Model):
    id: UUID
    name: str
    flow_id: UUID
    # 2.x servers send a deployment's job variables as `infra_overrides`.
    job_variables: dict[str, Any] | None = Field(
        default=None, validation_alias=AliasChoices("job_variables", "infra_overrides")
    )
    updated: datetime | None = None
    paused: bool = False
    concurrency_limit: int | None = None
    pull_steps: list[Any] | None = None  # run by Prefect's engine in the container (flowcode.py)

    @model_validator(mode="before")
    @classmethod
    def _limit_since_3_1(cls, data: Any) -> Any:
        """Prefect 3.1+ keeps a deployment's limit in `global_concurrency_limit` (its
        `concurrency_limit` reads null); 3.0 kept it in `concurrency_limit` itself."""
        if isinstance(data, dict) and data.get("concurrency_limit") is None and isinstance(
                limit := data.get("global_concurrency_limit"), dict):
            return {**data, "concurrency_limit": limit.get("limit")}
        return data


class Flow(_Model):
    id: UUID
    name: str


class WorkPool(_Model):
    id: UUID
    name: str
    type: str
    base_job_template: dict[str, Any] = Field(default_factory=dict)
    is_paused: bool = False
    concurrency_limit: int | None = None


class OrchestrationResult(_Model):
    status: Literal["ACCEPT", "REJECT", "ABORT", "WAIT"]
    state: State | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def reason(self) -> str:
        return str(self.details.get("reason") or "")


def _is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, 5xx and 429 are worth another try; other 4xx never are."""
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code == 429 or code >= 500
    return False




def _is_csrf_refusal(response: httpx.Response) -> bool:
    """The CSRF middleware's 403s: missing token/client, or one it does not (any more) know."""
    if response.status_code != 403:
        return False
    detail = _detail(response)
    return "CSRF" in detail or "client identifier" in detail


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


def _as_error(response: httpx.Response, method: str, path: str, api_url: str
              ) -> PrefectAPIError:
    """An error answer as our exception: credentials, not found, the server away, or other."""
    code = response.status_code
    detail = _detail(response)
    if code in (401, 403):
        return AuthRejected(
            f"the server rejected the API key / credentials (HTTP {code} from {api_url}): "
            f"{detail}; check PREFECT_API_KEY or PREFECT_API_AUTH_STRING (or their _FILE)", code)
    if code == 404:
        return NotFound(f"{method} {path}: not found ({detail})", code)
    if code == 429 or code >= 500:
        return ServerUnreachable(f"the Prefect server at {api_url} answered HTTP {code}: "
                                 f"{detail}", code)
    return PrefectAPIError(f"{method} {path}: HTTP {code}: {detail}", code)


def _counted(method: str, path: str, send: Callable[[], httpx.Response]) -> httpx.Response:
    """One exchange, counted by endpoint and status class (metrics.py)."""
    status = None
    try:
        response = send()
        status = response.status_code
        return response
    finally:
        metrics.API_REQUESTS.labels(metrics.endpoint(path), method.upper(),
                                    metrics.status_class(status)).inc()


PAGE = 200  # the most rows a Prefect server answers a filter with (its default limit)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")  # as httpx reads them, any case


def tls_verification(api_url: str) -> ssl.SSLContext | bool:
    """httpx's default verification (certifi's bundle: ~3 MiB resident for the life of the
    worker) only where TLS can happen: an https URL, or a proxy from the environment. A plain
    http URL gets a context that trusts no certificate, so that TLS it should never meet fails
    rather than going unverified."""
    proxied = any(value for key, value in os.environ.items() if key.lower() in PROXY_VARIABLES)
    if urlsplit(api_url).scheme == "http" and not proxied:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, with nothing to trust
    return True


class PrefectAPI:
    """A sync client for the worker's calls; safe to share between threads."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None = None,
        auth_string: str | None = None,
        timeout: float = 30.0,
        patience: float = 120.0,
        reread_credentials: Callable[[], tuple[str | None, str | None]] | None = None,
        on_rotated: Callable[[str | None, str | None], None] | None = None,
    ) -> None:
        """`reread_credentials` (settings.credentials_reader): on a 401/403 the credentials
        are read again, and when they changed (a rotated secret file) the request is sent
        once more with them; `on_rotated` then hears of the new ones."""
        self.api_url = api_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.api_url + "/", headers={"User-Agent": "dockerworker"},
            timeout=timeout, verify=tls_verification(self.api_url),
        )
        self._credentials = (api_key, auth_string)
        self._credentials_lock = threading.Lock()
        self._reread = reread_credentials
        self._on_rotated = on_rotated
        self._use_credentials(api_key, auth_string)
        self.patience = patience
        self._csrf = CsrfTokens(lambda: self._client)
        self._server: ServerInfo | None = None
        self._server_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def _use_credentials(self, api_key: str | None, auth_string: str | None) -> None:
        self._client.headers.pop("Authorization", None)
        self._client.auth = None  # type: ignore[assignment]
        if api_key:
            self._client.headers["Authorization"] = f"Bearer {api_key}"
        elif auth_string:
            user, _, password = auth_string.partition(":")
            self._client.auth = httpx.BasicAuth(user, password)
        self.basic_auth = bool(auth_string and not api_key)  # PREFECT_API_AUTH_STRING alone

    def _rotated(self, used: tuple[str | None, str | None]) -> bool:
        """After a 401/403 with credentials `used`: are there newer ones to try? Another
        thread may have read them already; else the files are read again."""
        with self._credentials_lock:
            if self._credentials != used:
                return True
            if self._reread is None:
                return False
            try:
                fresh = self._reread()
            except ValueError as exc:  # SecretSourceError: a file half rotated, unreadable
                log.warning("could not read the credentials again: %s", exc)
                return False
            if fresh == used:
                return False
            self._credentials = fresh
            self._use_credentials(*fresh)
        log.info("the credentials' files changed (a rotated secret): using the new ones")
        if self._on_rotated is not None:
            self._on_rotated(*fresh)
        return True

    @property
    def csrf_protected(self) -> bool | None:
        """Whether the server wants CSRF tokens; None until the first write asked."""
        return self._csrf.enabled

    def _csrf_headers(self, method: str, refused: str | None = None) -> dict[str, str]:
        return self._csrf.headers(method, refused)

    def _send(self, method: str, path: str, json: Any) -> httpx.Response:
        """One HTTP exchange; a write refused by the CSRF protection is sent once more with
        a new token (the old one expired on the server, or was replaced)."""
        used = self._credentials
        try:
            headers = self._csrf_headers(method)
        except httpx.HTTPStatusError as exc:  # the token's GET refused the credentials
            if exc.response.status_code not in (401, 403) or not self._rotated(used):
                raise
            headers = self._csrf_headers(method)
        response = _counted(method, path, lambda: self._client.request(
            method, path.lstrip("/"), json=json, headers=headers))
        if (response.status_code in (401, 403) and not _is_csrf_refusal(response)
                and self._rotated(used)):
            response = _counted(method, path, lambda: self._client.request(
                method, path.lstrip("/"), json=json, headers=headers))
        if _is_csrf_refusal(response) and method.upper() in WRITE_METHODS:
            log.info("the server refused the CSRF token (%s); fetching a new one",
                     _detail(response))
            if self._csrf.enabled is False:  # protection was off when asked: ask again
                self._csrf.enabled = None
            headers = self._csrf_headers(
                method, refused=headers.get("Prefect-Csrf-Token", ""))
            response = self._client.request(method, path.lstrip("/"), json=json,
                                             headers=headers)
            if _is_csrf_refusal(response):
                raise CsrfRefused(
                    f"{method} {path}: the server's CSRF protection refused a fresh token "
                    f"(HTTP 403 from {self.api_url}): {_detail(response)}"
                )
        return response

    # --- what this server is --------------------------------------------------------------
    @property
    def server(self) -> ServerInfo:
        """The server's version and what follows from it; asked once, then remembered."""
        with self._server_lock:
            if self._server is None:
                self._server = read_server_info(self)
                log.info("Prefect server %s (Prefect %d API%s)", self._server.version,
                         self._server.major,
                         "" if self._server.event_stream else ", no event stream")
            return self._server

    def request(
        self, method: str, path: str, json: Any = None, patience: float | None = None
    ) -> Any:
        """One call, retried with backoff on transient failures for up to `patience` seconds
        (default: the client's; 0 = one attempt); errors become our exceptions."""
        patience = self.patience if patience is None else patience
        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential_jitter(multiplier=0.5, max=10),
            stop=stop_after_delay(patience) if patience > 0 else stop_after_attempt(1),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    response = self._send(method, path, json)
                    response.raise_for_status()
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach the Prefect server at {self.api_url}: {exc.__class__.__name__}: {exc}"
            ) from exc
        except httpx.HTTPStatusError as exc:
            raise _as_error(exc.response, method, path, self.api_url) from exc
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # --- server -------------------------------------------------------------------------
    def health(self, patience: float | None = None) -> None:
        self.request("GET", "/health", patience=patience)

    def server_version(self) -> str:
        return str(self.request("GET", "/admin/version"))

    # --- work pools ---------------------------------------------------------------------
    def read_work_pool(self, name: str, patience: float | None = None) -> WorkPool:
        """The pool as the worker must read it on this server: a template whose image has no
        default (or no template at all) gets the server's default image (`ServerInfo`)."""
        pool = WorkPool.model_validate(
            self.request("GET", f"/work_pools/{name}", patience=patience)
        )
        pool.base_job_template = with_default_image(
            pool.base_job_template, self.server.default_image
        )
        return pool

    def create_work_pool(self, name: str, type_: str, base_job_template: dict[str, Any]) -> WorkPool:
        body = {"name": name, "type": type_, "base_job_template": base_job_template}
        return WorkPool.model_validate(self.request("POST", "/work_pools/", json=body))

    def probe_work_pools(self, patience: float | None = None) -> None:
        """A read that needs valid credentials (unlike /health): raises AuthRejected if not."""
        self.request("POST", "/work_pools/filter", json={"limit": 1}, patience=patience)

    def read_work_queues(self, pool: str, patience: float | None = None) -> list[dict[str, Any]]:
        """The pool's queues as the server sends them (name, priority, limit, paused)."""
        return self.request("POST", f"/work_pools/{pool}/queues/filter", json={},
                            patience=patience)

    def read_workers(self, pool: str, patience: float | None = None) -> list[dict[str, Any]]:
        """The pool's workers as the server sends them (name, status, heartbeat)."""
        return self.request("POST", f"/work_pools/{pool}/workers/filter", json={},
                            patience=patience)

    def heartbeat(self, pool: str, worker_name: str, interval_seconds: float,
                  patience: float | None = None) -> None:
        body = {"name": worker_name, "heartbeat_interval_seconds": int(interval_seconds)}
        self.request("POST", f"/work_pools/{pool}/workers/heartbeat", json=body,
                     patience=patience)

    def get_scheduled_flow_runs(
        self, pool: str, scheduled_before: datetime, limit: int | None, queues: list[str],
        patience: float | None = None, scheduled_after: datetime | None = None,
    ) -> list[FlowRun]:
        body: dict[str, Any] = {"scheduled_before": scheduled_before.isoformat()}
        if scheduled_after is not None:
            body["scheduled_after"] = scheduled_after.isoformat()
        if limit is not None:
            body["limit"] = limit
        if queues:
            body["work_queue_names"] = queues
        rows = self.request(
            "POST", f"/work_pools/{pool}/get_scheduled_flow_runs", json=body, patience=patience
        )
        return [FlowRun.model_validate(row["flow_run"]) for row in rows]

    def filter_flow_runs(
        self,
        pool: str,
        states: list[StateType],
        ids: list[UUID] | None = None,
        patience: float | None = None,
    ) -> list[FlowRun]:
        """Runs of `pool` in one of `states` (and among `ids`, if given), page by page: the
        server answers at most PAGE a request, and a run past the first page must not go
        unseen by reconciliation (anyone may set runs of the pool RUNNING by the hundred)."""
        flow_runs: dict[str, Any] = {"state": {"type": {"any_": [s.value for s in states]}}}
        if ids is not None:
            flow_runs["id"] = {"any_": [str(i) for i in ids]}
        found: dict[UUID, FlowRun] = {}  # a run that moved between pages is seen once
        offset = 0
        while True:
            body = {"flow_runs": flow_runs, "work_pools": {"name": {"any_": [pool]}},
                    "sort": "ID_DESC", "limit": PAGE, "offset": offset}
            rows = self.request("POST", "/flow_runs/filter", json=body, patience=patience)
            before = len(found)
            for row in rows:
                flow_run = FlowRun.model_validate(row)
                found.setdefault(flow_run.id, flow_run)
            if len(rows) < PAGE or len(found) == before:  # the last page, or one seen already
                return list(found.values())
            offset += PAGE

    def flow_runs_by_state_name(
        self, pool: str, names: list[str], limit: int, patience: float | None = None
    ) -> list[dict[str, Any]]:
        """Runs of `pool` whose state has one of `names` (e.g. Late, a SCHEDULED state), as the
        server sends them: callers read fields our models leave out (the state's timestamp)."""
        body = {
            "flow_runs": {"state": {"name": {"any_": names}}},
            "work_pools": {"name": {"any_": [pool]}},
            "limit": limit,
        }
        return self.request("POST", "/flow_runs/filter", json=body, patience=patience)

    # --- flow runs ----------------------------------------------------------------------
    def read_flow_run(self, flow_run_id: UUID) -> FlowRun:
        return FlowRun.model_validate(self.request("GET", f"/flow_runs/{flow_run_id}"))

    def read_flow_run_states(self, flow_run_id: UUID,
                             patience: float | None = None) -> list[State]:
        """The run's states, oldest first (who claimed it is in a PENDING state's message)."""
        rows = self.request("GET", f"/flow_run_states/?flow_run_id={flow_run_id}",
                            patience=patience)
        return [State.model_validate(row) for row in rows]

    def set_state(
        self,
        flow_run_id: UUID,
        type_: StateType,
        message: str | None = None,
        force: bool = False,
        name: str | None = None,
    ) -> OrchestrationResult:
        state = {"type": type_.value, "name": name or type_.value.title(), "message": message}
        result = self.request(
            "POST", f"/flow_runs/{flow_run_id}/set_state", json={"state": state, "force": force}
        )
        return OrchestrationResult.model_validate(result)

    def set_infrastructure_pid(self, flow_run_id: UUID, infrastructure_pid: str,
                               patience: float | None = None) -> None:
        self.request("PATCH", f"/flow_runs/{flow_run_id}",
                     json={"infrastructure_pid": infrastructure_pid}, patience=patience)

    def read_deployment(
        self, deployment_id: UUID | str, patience: float | None = None
    ) -> Deployment:
        return Deployment.model_validate(
            self.request("GET", f"/deployments/{deployment_id}", patience=patience)
        )

    def read_deployment_by_name(self, flow_and_deployment: str) -> Deployment:
        """`FLOW/DEPLOYMENT`, the way `prefect deployment run` names one."""
        return Deployment.model_validate(
            self.request("GET", f"/deployments/name/{flow_and_deployment}")
        )

    def read_block_data(self, block_type: str, name: str) -> dict[str, Any]:
        """A block document's data, secrets included: what the worker must mask when a run's
        pull steps reference the block."""
        path = (f"/block_types/slug/{quote(block_type, safe='')}/block_documents/name/"
                f"{quote(name, safe='')}?include_secrets=true")
        body = self.request("GET", path)
        return body.get("data") or {}

    def read_variable(self, name: str) -> Any:
        """A Prefect variable's value (`{{ prefect.variables.NAME }}` in job variables)."""
        return self.request("GET", f"/variables/name/{quote(name, safe='')}")["value"]

    def read_flow(self, flow_id: UUID) -> Flow:
        return Flow.model_validate(self.request("GET", f"/flows/{flow_id}"))

    # --- logs ---------------------------------------------------------------------------
    def send_logs(self, logs: list[dict[str, Any]], patience: float | None = None) -> None:
        if logs:
            self.request("POST", "/logs/", json=logs, patience=patience)

    def read_logs_newest_first(
        self, flow_run_id: UUID, limit: int, offset: int = 0, text: str | None = None
    ) -> list[dict[str, Any]]:
        """One page (at most 200, the server's bound) of a run's logs, newest first, as the
        server sends them; with `text`, only those whose message or logger name match it
        (Prefect's text search: terms, `-term` to exclude; older servers answer 422)."""
        logs: dict[str, Any] = {"flow_run_id": {"any_": [str(flow_run_id)]}}
        if text is not None:
            logs["text"] = {"query": text}
        body = {
            "logs": logs,
            "sort": "TIMESTAMP_DESC",
            "limit": limit,
            "offset": offset,
        }
        return self.request("POST", "/logs/filter", json=body)


def read_server_info(api: PrefectAPI) -> ServerInfo:
    """What the server is: its version, and on 2.x whether it runs the event stream."""
    try:
        version = api.server_version()
    except NotFound:  # a proxy that hides /admin: assume the current major
        return ServerInfo("unknown")
    info = ServerInfo(version)
    if info.major >= 3:
        return info
    try:  # 2.x: events only when the server runs them (an experimental setting)
        settings = api.request("GET", "/admin/settings")
    except PrefectAPIError:
        settings = {}
    experimental = settings.get("PREFECT_EXPERIMENTAL_EVENTS") if isinstance(
        settings, dict) else None
    return ServerInfo(version, event_stream=experimental in (True, "true", "True", 1))
