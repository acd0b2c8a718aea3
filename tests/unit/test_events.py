"""The event stream against a loopback websocket server: events reach the worker, a
half-open connection (a proxy that swallows every byte) stops counting as connected, and
rotated credentials replace a subscription made with the old ones."""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Iterator

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from dockerworker.events import RUNNING_EVENT, EventListener

from .fakes import wait_until

POOL = "pool-a"


class StreamServer:
    """Prefect's `/events/out` as far as the listener meets it: auth, filter, events."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[str] = queue.Queue()  # the newest connection's
        self.tokens: list[str | None] = []  # each auth message's token, in order
        self.accepted: str | None = None  # when set, the only token accepted
        self.server: Server = serve(self._serve, "127.0.0.1", 0, subprotocols=["prefect"])
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _serve(self, ws: ServerConnection) -> None:
        token = json.loads(ws.recv())["token"]
        self.tokens.append(token)
        if self.accepted is not None and token != self.accepted:
            ws.send(json.dumps({"type": "auth_failure", "reason": "Invalid token"}))
            return
        # this connection's outbox exists before the listener can count itself connected
        # (after auth_success and its filter): a message put then is not lost in the old one
        outbox = self.outbox = queue.Queue()
        ws.send(json.dumps({"type": "auth_success"}))
        json.loads(ws.recv())  # filter
        while True:
            try:
                message = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if message == "close":
                return
            ws.send(message)

    def send_running(self, run_id: str) -> None:
        self.outbox.put(json.dumps({"type": "event", "event": {
            "event": RUNNING_EVENT,
            "resource": {"prefect.resource.id": f"prefect.flow-run.{run_id}"},
            "related": [{"prefect.resource.role": "work-pool", "prefect.resource.name": POOL}],
        }}))


class SwallowingProxy:
    """A TCP relay; `swallow()` turns its current connections half-open: bytes are read and
    never passed on (no FIN, no RST), while new connections are relayed normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._dead: set[int] = set()
        self._live: list[int] = []
        self._count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        self._dead.update(self._live)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._count += 1
            number = self._count
            self._live.append(number)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(number, source, sink),
                                 daemon=True).start()

    def _pump(self, number: int, source: socket.socket, sink: socket.socket) -> None:
        while data := source.recv(65536):
            if number not in self._dead:
                sink.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def stream() -> Iterator[tuple[StreamServer, SwallowingProxy]]:
    server = StreamServer()
    proxy = SwallowingProxy(server.port)
    yield server, proxy
    proxy.close()
    server.server.shutdown()


def test_events_arrive_and_a_half_open_stream_counts_as_disconnected(stream, caplog) -> None:
    server, proxy = stream
    seen: list[tuple[str, str]] = []
    connects: list[int] = []
    stop = threading.Event()
    listener = EventListener(
        f"http://127.0.0.1:{proxy.port}/api", POOL, lambda: (None, {}),
        lambda name, resource: seen.append((name, resource)), stop,
        on_connect=lambda: connects.append(1), ping_interval=0.1, ping_timeout=0.2,
        max_backoff=0.1, close_timeout=0.1,
    ).start()
    try:
        wait_until(listener.connected.is_set)
        server.send_running("r1")
        wait_until(lambda: seen == [(RUNNING_EVENT, "prefect.flow-run.r1")])
        # (on a loaded machine a ping may miss its 0.2 s once already: count from here)
        before = listener.connections
        proxy.swallow()  # the peer is gone without a word
        wait_until(lambda: listener.connections > before and listener.connected.is_set())
        assert len(connects) == listener.connections  # told to catch up after each one
        server.send_running("r2")
        wait_until(lambda: (RUNNING_EVENT, "prefect.flow-run.r2") in seen)
    finally:
        stop.set()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # handled, not alarming


def test_without_keepalive_a_half_open_stream_would_stay_connected(stream) -> None:
    """The control: the same swallowed connection, no pings, stays 'connected'."""
    _server, proxy = stream
    stop = threading.Event()
    listener = EventListener(
        f"http://127.0.0.1:{proxy.port}/api", POOL, lambda: (None, {}), lambda *a: None, stop,
        ping_interval=None, ping_timeout=None,  # type: ignore[arg-type]
    ).start()
    try:
        wait_until(listener.connected.is_set)
        proxy.swallow()
        assert not stop.wait(0.5)
        assert listener.connected.is_set() and listener.connections == 1
    finally:
        stop.set()


def test_rotated_credentials_replace_the_subscription_made_with_the_old_ones(stream) -> None:
    """The live subscription was authenticated with the old secret: told of a rotation, the
    listener subscribes again at once with the new one (not at its next failure), and each
    later reconnection reads the credentials afresh."""
    server, _proxy = stream
    current = {"token": "old-secret"}
    stop = threading.Event()
    listener = EventListener(
        f"http://127.0.0.1:{server.port}/api", POOL,
        lambda: (current["token"], {"Authorization": f"Bearer {current['token']}"}),
        lambda *a: None, stop, max_backoff=0.1, close_timeout=0.1,
    ).start()
    try:
        wait_until(lambda: listener.connections == 1 and listener.connected.is_set())
        server.accepted = "new-secret"  # the server now knows only the new secret...
        current["token"] = "new-secret"  # ...and the worker has read it from its file
        listener.credentials_rotated()
        wait_until(lambda: listener.connections == 2 and listener.connected.is_set())
        assert server.tokens == ["old-secret", "new-secret"]
        server.outbox.put("close")  # a later reconnection: still the new one
        wait_until(lambda: listener.connections == 3 and listener.connected.is_set())
        assert server.tokens[-1] == "new-secret"
    finally:
        stop.set()
