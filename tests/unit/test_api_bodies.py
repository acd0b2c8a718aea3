"""api.py builds the REST bodies: each method's path and body, against a recording transport."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from dockerworker.api import PrefectAPI, StateType

RUN = uuid.UUID("00000000-0000-0000-0000-000000000001")
DEPLOYMENT = {"id": str(RUN), "name": "dep", "flow_id": str(RUN), "paused": True,
              "concurrency_limit": 3, "job_variables": {"image": "img"}}


class Recorder:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):  # asked before the first write
            return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        return httpx.Response(200, json=self.answer)


def api_answering(answer: Any) -> tuple[PrefectAPI, Recorder]:
    api = PrefectAPI("http://prefect.test/api", patience=0)
    recorder = Recorder(answer)
    api._client = httpx.Client(base_url=api.api_url + "/", transport=httpx.MockTransport(recorder))
    return api, recorder


@pytest.mark.parametrize(("call", "answer", "expected"), [
    (lambda api: api.probe_work_pools(patience=0), [],
     ("POST", "/api/work_pools/filter", {"limit": 1})),
    (lambda api: api.read_work_queues("p1"), [],
     ("POST", "/api/work_pools/p1/queues/filter", {})),
    (lambda api: api.read_workers("p1"), [],
     ("POST", "/api/work_pools/p1/workers/filter", {})),
    (lambda api: api.flow_runs_by_state_name("p1", ["Late", "Pending"], limit=50), [],
     ("POST", "/api/flow_runs/filter", {
         "flow_runs": {"state": {"name": {"any_": ["Late", "Pending"]}}},
         "work_pools": {"name": {"any_": ["p1"]}},
         "limit": 50,
     })),
    (lambda api: api.read_logs_newest_first(RUN, limit=200, offset=400), [],
     ("POST", "/api/logs/filter", {
         "logs": {"flow_run_id": {"any_": [str(RUN)]}},
         "sort": "TIMESTAMP_DESC", "limit": 200, "offset": 400,
     })),
    (lambda api: api.read_logs_newest_first(RUN, limit=20, text="dockerworker.container"),
     [], ("POST", "/api/logs/filter", {
         "logs": {"flow_run_id": {"any_": [str(RUN)]},
                  "text": {"query": "dockerworker.container"}},
         "sort": "TIMESTAMP_DESC", "limit": 20, "offset": 0,
     })),
    (lambda api: api.read_deployment_by_name("flow/dep"), DEPLOYMENT,
     ("GET", "/api/deployments/name/flow/dep", None)),
    (lambda api: api.read_deployment(str(RUN)), DEPLOYMENT,
     ("GET", f"/api/deployments/{RUN}", None)),
])
def test_each_call_sends_its_path_and_body(call: Any, answer: Any, expected: tuple) -> None:
    api, recorder = api_answering(answer)
    call(api)
    assert recorder.calls == [expected]


def test_a_deployment_carries_what_the_doctor_reads() -> None:
    api, _ = api_answering(DEPLOYMENT)
    deployment = api.read_deployment(RUN)
    assert (deployment.paused, deployment.concurrency_limit) == (True, 3)
    assert deployment.job_variables == {"image": "img"}
    # Prefect 3.1+: the limit is a global concurrency limit of the deployment's own
    since_3_1 = {**DEPLOYMENT, "concurrency_limit": None,
                 "global_concurrency_limit": {"name": f"deployment:{RUN}", "limit": 2}}
    api, _ = api_answering(since_3_1)
    assert api.read_deployment(RUN).concurrency_limit == 2


def test_unfinished_runs_are_read_page_by_page() -> None:
    """The server answers a filter with at most 200 runs: reconciliation must see the 201st
    (anyone may set runs of the pool RUNNING by the hundred to hide one; found by an
    audit). A run that moved between pages is counted once."""
    runs = [{"id": str(uuid.UUID(int=i + 1)), "name": f"r{i}", "flow_id": str(RUN)}
            for i in range(450)]
    bodies: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):  # asked before the first write
            return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
        body = json.loads(request.content)
        bodies.append(body)
        page = runs[body["offset"]:body["offset"] + body["limit"]]
        if body["offset"] == 200:  # a run of the first page moved to the second meanwhile
            page = [runs[0], *page[:-1]]
        return httpx.Response(200, json=page)

    api = PrefectAPI("http://prefect.test/api", patience=0)
    api._client = httpx.Client(base_url=api.api_url + "/", transport=httpx.MockTransport(server))
    found = api.filter_flow_runs("p1", [StateType.RUNNING])
    assert [(b["offset"], b["limit"], b["sort"]) for b in bodies] == [
        (0, 200, "ID_DESC"), (200, 200, "ID_DESC"), (400, 200, "ID_DESC")]
    assert len(found) == 449 and len({r.id for r in found}) == 449

    def deaf_to_offsets(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):
            return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
        return httpx.Response(200, json=runs[:200])  # a server that ignores `offset`

    api._client = httpx.Client(base_url=api.api_url + "/",
                               transport=httpx.MockTransport(deaf_to_offsets))
    assert len(api.filter_flow_runs("p1", [StateType.RUNNING])) == 200  # and it returns
