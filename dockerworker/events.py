"""Pickup without the poll wait: the server's event stream nudges the loop.

The worker subscribes to `/api/events/out` for flow-run Scheduled, Cancelling, Running and final
(Completed, Failed, Cancelled) events of its pool. On Scheduled or Cancelling it polls (or checks
cancellations) at once instead of at the next interval; Running tells it one of its runs has
started (a start slot is free); a final one, that it need not read the run's state after its
container exits.
Polling stays the source of truth: the stream only makes it prompt. When the stream is down
(an old server, a proxy without websockets) the worker simply keeps polling, reconnecting in
the background with backoff. Keepalive pings tell a live stream from a half-open one.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from . import metrics

log = logging.getLogger(__name__)


class _HandledKeepaliveFailure(logging.Filter):
    """websockets logs a keepalive timeout on a half-open connection as an ERROR with a
    traceback; the listener handles it (reconnects, says so at INFO): keep it at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "keepalive ping failed":
            record.levelno, record.levelname, record.exc_info = logging.DEBUG, "DEBUG", None
            return log.isEnabledFor(logging.DEBUG)
        return True


_socket_log = logging.getLogger(f"{__name__}.websocket")
_socket_log.addFilter(_HandledKeepaliveFailure())
RUNNING_EVENT = "prefect.flow-run.Running"
CANCELLING_EVENT = "prefect.flow-run.Cancelling"
PING_INTERVAL = 20.0  # keepalive: a ping every so often...
PING_TIMEOUT = 20.0  # ...answered within this, or the connection counts as lost
# A run of the worker's reached a final state: no read of its state after its exit. Only
# states whose type is all the verdict needs (a Crashed state's message matters: read).
ENDED_EVENTS = {"prefect.flow-run.Completed": "COMPLETED", "prefect.flow-run.Failed": "FAILED",
                "prefect.flow-run.Cancelled": "CANCELLED"}
WATCHED_EVENTS = ["prefect.flow-run.Scheduled", CANCELLING_EVENT, RUNNING_EVENT, *ENDED_EVENTS]


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
    """A daemon thread calling `on_event(name, resource id)` for each watched event of `pool`.

    `connected` is set only while the subscription is live: keepalive pings every
    `ping_interval` seconds must be answered within `ping_timeout`, so a half-open connection
    (the server or a proxy gone without a FIN) counts as disconnected, and the worker falls
    back to checking by itself. `on_connect` runs after each (re)subscription: events sent
    while the stream was away are lost, so the worker catches up at once; `on_disconnect`
    runs when a live subscription ends (the worker polls as often as without a stream until
    it is back). `credentials` gives (auth token, handshake headers) at each connection, so a
    rotated secret is used from the next one; `credentials_rotated()` starts that next one at
    once.
    """

    def __init__(
        self,
        api_url: str,
        pool: str,
        credentials: Callable[[], tuple[str | None, dict[str, str]]],
        on_event: Callable[[str, str], None],
        stop: threading.Event,
        *,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        max_backoff: float = 30.0,
        close_timeout: float = 2.0,
    ) -> None:
        self.url = events_url(api_url)
        self.pool = pool
        self.credentials = credentials
        self._rotated = threading.Event()
        self.on_event = on_event
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.stop = stop
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_backoff = max_backoff
        self.close_timeout = close_timeout
        self.connected = threading.Event()
        metrics.watch(metrics.EVENT_STREAM_CONNECTED, lambda: float(self.connected.is_set()))
        self.connections = 0  # successful subscriptions, for tests and logs
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> EventListener:
        self._thread.start()
        return self

    def credentials_rotated(self) -> None:
        """The worker's credentials changed: leave the subscription made with the old ones
        (the server may have revoked them) and subscribe again with the new ones."""
        self._rotated.set()

    def _run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            subscribed_before = self.connections
            try:
                self._listen()
                if self.stop.is_set():
                    return
                if self._rotated.is_set():
                    log.info("event stream: subscribing again with the rotated credentials")
                    continue
                raise ConnectionError("the server closed the event stream")
            except (OSError, WebSocketException, ValueError) as exc:
                if self.connections > subscribed_before:
                    failures = 0  # it worked for a while: reconnect quickly
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.info("event stream %s unavailable (%s); polling meanwhile",
                             self.url, exc)
            finally:
                was_connected = self.connected.is_set()
                self.connected.clear()
                if was_connected and self.on_disconnect is not None:
                    self.on_disconnect()
            delay = min(self.max_backoff, 0.5 * 2 ** min(failures - 1, 10))
            self.stop.wait(delay * random.uniform(0.5, 1.0))

    def _listen(self) -> None:
        self._rotated.clear()
        token, headers = self.credentials()
        with connect(self.url, subprotocols=["prefect"], additional_headers=headers,
                     open_timeout=10, close_timeout=self.close_timeout,
                     ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                     logger=_socket_log) as socket:
            self._subscribe(socket, token)
            self.connections += 1
            self.connected.set()
            metrics.EVENT_STREAM_RECONNECTS.inc()
            log.info("subscribed to the server's flow-run events for pool %r", self.pool)
            if self.on_connect is not None:
                self.on_connect()
            while not self.stop.is_set() and not self._rotated.is_set():
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

    def _subscribe(self, socket: ClientConnection, token: str | None) -> None:
        socket.send(json.dumps({"type": "auth", "token": token}))
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
