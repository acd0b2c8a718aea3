"""The Prefect REST calls the worker makes: one method each, retried where retrying is safe.

The worker speaks the REST API itself (no `prefect` import): a small httpx client,
pydantic models for what it reads, tenacity for backoff on transient failures.
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

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


class Deployment(_Model):
    id: UUID
    name: str
    flow_id: UUID
    job_variables: dict[str, Any] | None = None
    updated: datetime | None = None
    paused: bool = False
    concurrency_limit: int | None = None


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


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


class PrefectAPI:
    """A sync client for the worker's calls; safe to share between threads."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None = None,
        auth_string: str | None = None,
        timeout: float = 30.0,
        patience: float = 120.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"User-Agent": "dockerworker"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        auth = None
        if auth_string and not api_key:
            user, _, password = auth_string.partition(":")
            auth = httpx.BasicAuth(user, password)
        self._client = httpx.Client(
            base_url=self.api_url + "/", headers=headers, auth=auth, timeout=timeout
        )
        self.patience = patience

    def close(self) -> None:
        self._client.close()

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
                    response = self._client.request(method, path.lstrip("/"), json=json)
                    response.raise_for_status()
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach the Prefect server at {self.api_url}: {exc.__class__.__name__}: {exc}"
            ) from exc
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            detail = _detail(exc.response)
            if code in (401, 403):
                raise AuthRejected(
                    f"the server rejected the API key / credentials (HTTP {code} from "
                    f"{self.api_url}): {detail}; check PREFECT_API_KEY or PREFECT_API_AUTH_STRING",
                    code,
                ) from exc
            if code == 404:
                raise NotFound(f"{method} {path}: not found ({detail})", code) from exc
            if code == 429 or code >= 500:
                raise ServerUnreachable(
                    f"the Prefect server at {self.api_url} answered HTTP {code}: {detail}", code
                ) from exc
            raise PrefectAPIError(f"{method} {path}: HTTP {code}: {detail}", code) from exc
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
        return WorkPool.model_validate(
            self.request("GET", f"/work_pools/{name}", patience=patience)
        )

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
        patience: float | None = None,
    ) -> list[FlowRun]:
        body: dict[str, Any] = {"scheduled_before": scheduled_before.isoformat()}
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
        """Runs of `pool` in one of `states` (and among `ids`, if given)."""
        flow_runs: dict[str, Any] = {"state": {"type": {"any_": [s.value for s in states]}}}
        if ids is not None:
            flow_runs["id"] = {"any_": [str(i) for i in ids]}
        body = {"flow_runs": flow_runs, "work_pools": {"name": {"any_": [pool]}}, "limit": 200}
        rows = self.request("POST", "/flow_runs/filter", json=body, patience=patience)
        return [FlowRun.model_validate(row) for row in rows]

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

    def set_infrastructure_pid(self, flow_run_id: UUID, infrastructure_pid: str) -> None:
        self.request(
            "PATCH", f"/flow_runs/{flow_run_id}", json={"infrastructure_pid": infrastructure_pid}
        )

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
