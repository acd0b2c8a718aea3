"""Pickup without the poll wait: the server's event stream nudges the loop.

The worker subscribes to `/api/events/out` for flow-run Scheduled, Cancelling and Running events
of its pool. On Scheduled or Cancelling it polls (or checks cancellations) at once instead of at
the next interval; Running tells it one of its runs has started (a start slot is free).
Polling stays the source of truth: the stream only makes it prompt. When the stream is down
(an old server, a proxy without websockets) the worker simply keeps polling, reconnecting in
the background with backoff.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

log = logging.getLogger(__name__)
RUNNING_EVENT = "prefect.flow-run.Running"
WATCHED_EVENTS = ["prefect.flow-run.Scheduled", "prefect.flow-run.Cancelling", RUNNING_EVENT]


def events_url(api_url: str) -> str:
    """http(s)://host/api → ws(s)://host/api/events/out"""
    scheme, _, rest = api_url.rstrip("/").partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/events/out"


def concerns_pool(event: dict[str, Any], pool: str) -> bool:
    """Flow-run events name their work pool among the related resources."""
    return any(
        related.get("prefect.resource.role") == "work-pool"
        and related.get("prefect.resource.name") == pool
        for related in event.get("related") or []
    )


class EventListener:
    """A daemon thread calling `on_event(name, resource id)` for each watched event of `pool`."""

    def __init__(
        self,
        api_url: str,
        pool: str,
        token: str | None,
        headers: dict[str, str],
        on_event: Callable[[str, str], None],
        stop: threading.Event,
    ) -> None:
        self.url = events_url(api_url)
        self.pool = pool
        self.token = token
        self.headers = headers
        self.on_event = on_event
        self.stop = stop
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> EventListener:
        self._thread.start()
        return self

    def _run(self) -> None:
        def explain(state: Any) -> None:
            self.connected.clear()
            if state.attempt_number in (1, 10) or state.attempt_number % 100 == 0:
                log.info("event stream %s unavailable (%s); polling meanwhile",
                         self.url, state.outcome.exception())

        for attempt in Retrying(
            retry=retry_if_exception_type((OSError, WebSocketException, ValueError)),
            wait=wait_exponential_jitter(multiplier=1, max=30),
            before_sleep=explain,
        ):
            with attempt:
                if self.stop.is_set():
                    return
                self._listen()
                if self.stop.is_set():
                    return
                raise ConnectionError("the server closed the event stream")

    def _listen(self) -> None:
        with connect(self.url, subprotocols=["prefect"], additional_headers=self.headers,
                     open_timeout=10, close_timeout=2) as socket:
            self._subscribe(socket)
            self.connected.set()
            log.info("subscribed to the server's flow-run events for pool %r", self.pool)
            while not self.stop.is_set():
                try:
                    raw = socket.recv(timeout=1)
                except TimeoutError:
                    continue
                message = json.loads(raw)
                event = message.get("event") or {}
                if message.get("type") == "event" and concerns_pool(event, self.pool):
                    resource = event.get("resource") or {}
                    self.on_event(str(event.get("event")),
                                  str(resource.get("prefect.resource.id", "")))

    def _subscribe(self, socket: ClientConnection) -> None:
        socket.send(json.dumps({"type": "auth", "token": self.token}))
        answer = json.loads(socket.recv(timeout=10))
        if answer.get("type") != "auth_success":
            raise ValueError(f"the event stream refused our credentials: {answer}")
        now = datetime.now(UTC)
        socket.send(json.dumps({
            "type": "filter",
            "backfill": False,
            "filter": {
                "occurred": {"since": now.isoformat(),
                             "until": (now + timedelta(days=365)).isoformat()},
                "event": {"name": WATCHED_EVENTS},
            },
        }))
