"""A fault-injecting HTTP + WebSocket reverse proxy on 127.0.0.1, for "never lose a run" tests.

The worker under test is pointed at the proxy; the proxy forwards to a real Prefect server on
loopback (flows in containers keep talking to the server directly). Faults come from a seeded,
bounded `Plan` (per-request probabilities inside a time window, timed blackouts and websocket
cuts) and/or from the test's own commands (`inject`, `blackout`, `cut_websockets`):

- `refuse_503`   answer 503 without forwarding (the server never sees the request);
- `drop_before`  read the request, then reset the connection without forwarding;
- `drop_after`   forward, read the server's whole answer (so it applied the request), then
                 reset the connection: the client never learns the outcome;
- `delay`        forward, then hold the answer for `delay_seconds` before passing it on;
- `hold`         read the request, hold it for `delay_seconds`, then forward it: the server
                 applies it only then (a request still on its way, e.g. a claim in flight);
- websocket cut: close open tunnels (e.g. the worker's event stream) and refuse upgrades
                 (503) for a while;
- websocket stall: open tunnels stay open but pass nothing either way for a while (a
                 half-open connection: pings go unanswered, nothing closes);
- blackout:      cut every open connection and reset every new one for N seconds.

Everything it did is counted per kind and per endpoint (`counts`, `count()`), so tests can
assert the faults really happened. It listens and forwards on loopback only, each fault kind
is bounded in number, the plan ends after its window, and the proxy stops itself after
`lifetime` seconds whatever happens to the test.

Forwarding is byte for byte (HTTP/1.1, bodies by Content-Length, chunked or until close;
WebSocket upgrades tunnelled both ways), with one upstream connection per request, as in
bench/proxy.py, from which the framing helpers come.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Self

_LIMIT = 1 << 20
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LOOPBACK = "127.0.0.1"

REFUSE_503 = "refuse_503"
DROP_BEFORE = "drop_before"
DROP_AFTER = "drop_after"
DELAY = "delay"
HOLD = "hold"
REQUEST_FAULTS = (REFUSE_503, DROP_BEFORE, DROP_AFTER, DELAY, HOLD)
WS_CUT = "ws_cut"  # an open tunnel closed by a cut
WS_REFUSED = "ws_refused"  # an upgrade answered 503 while upgrades are refused
BLACKOUT = "blackout"  # a blackout began
BLACKOUT_DROP = "blackout_drop"  # a connection reset by a blackout (open or new)
FORWARDED = "forwarded"  # a request answered normally (delayed and held ones included)
WS_OPENED = "ws_opened"  # a websocket tunnel established
WS_STALL = "ws_stall"  # open tunnels went silent (half-open: nothing passes, nothing closes)


def endpoint(method: str, target: str) -> str:
    """`METHOD /path` with ids as `{id}` and no query string, for per-endpoint counts."""
    return f"{method} {_ID.sub('{id}', target.split('?', 1)[0])}"


@dataclass
class Plan:
    """A seeded, bounded fault schedule, relative to the moment it is armed.

    Each request whose endpoint matches `match` (and is not a websocket upgrade) arriving in
    [start, start + duration) draws once from `random.Random(seed)`: with probability
    `rates[kind]` it gets that fault, while fewer than `max_faults[kind]` (default 10) of that
    kind happened. `blackouts` and `ws_cuts` are (at, seconds) pairs: a blackout of `seconds`
    at `at`; a websocket cut at `at` with upgrades refused for `seconds`.
    """

    seed: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    max_faults: dict[str, int] = field(default_factory=dict)
    match: str = r"^(GET|POST|PUT|PATCH|DELETE) /api/"
    start: float = 0.0
    duration: float = 60.0
    delay_seconds: float = 2.0
    blackouts: list[tuple[float, float]] = field(default_factory=list)
    ws_cuts: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(REQUEST_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {REQUEST_FAULTS}")
        if sum(self.rates.values()) > 1.0:
            raise ValueError("the fault rates add up to more than 1")

    @property
    def ends(self) -> float:
        """Seconds after arming when nothing more is scheduled."""
        timed = [at + secs for at, secs in (*self.blackouts, *self.ws_cuts)]
        return max([self.start + self.duration, *timed])


@dataclass
class _Rule:
    """A commanded fault: the next `times` requests matching `match` get `kind`."""

    kind: str
    match: re.Pattern[str]
    times: int
    delay: float


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    """The start line and the (lower-cased) headers of a message head."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(src: asyncio.StreamReader, headers: dict[str, str], *,
                     response: bool) -> tuple[bytes, bool]:
    """One message body as raw bytes (chunk framing kept); False when the connection must
    close afterwards (a response without length runs until the server closes)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            line = await src.readuntil(b"\r\n")
            parts.append(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (trailer := await src.readuntil(b"\r\n")) != b"\r\n":
                    parts.append(trailer)
                parts.append(b"\r\n")
                return b"".join(parts), True
            parts.append(await src.readexactly(size + 2))
    if "content-length" in headers:
        return await src.readexactly(int(headers["content-length"])), True
    if response:
        return await src.read(), False
    return b"", True


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0): the peer sees it at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Reverse proxy 127.0.0.1:<port> → 127.0.0.1:<upstream_port> that injects faults.

    Use as a context manager (or `start()` / `stop()`); `url` is the API URL for the worker.
    All methods are thread-safe: the proxy runs its own event loop in a daemon thread.
    """

    def __init__(self, upstream_port: int, *, port: int = 0, lifetime: float = 1800.0,
                 api_path: str = "/api") -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.lifetime = lifetime
        self.api_path = api_path
        self.counts: Counter[tuple[str, str]] = Counter()
        self.events: list[tuple[float, str, str]] = []  # (monotonic, kind, endpoint)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._plan: Plan | None = None
        self._plan_t0 = 0.0
        self._rng = random.Random(0)
        self._blackout_until = 0.0
        self._ws_refused_until = 0.0
        self._ws_stalled_until = 0.0
        self._ws_stall_began = 0.0
        self._ws_match = re.compile(r"^/api/events/")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._tunnels: dict[asyncio.StreamWriter, tuple[str, asyncio.StreamWriter]] = {}
        self._stopped = threading.Event()

    # --- life --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The API URL to give the worker (http://127.0.0.1:<port>/api)."""
        return f"http://{LOOPBACK}:{self.port}{self.api_path}"

    def start(self) -> Self:
        """Listen on loopback (a free port unless one was given); the proxy stops itself after
        `lifetime` seconds."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, LOOPBACK, self.port, limit=_LIMIT), self._loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._loop.call_soon_threadsafe(self._loop.call_later, self.lifetime, self._self_stop)
        return self

    def stop(self) -> None:
        """Stop listening, reset open connections, end the thread. Idempotent."""
        if self._thread.is_alive() and not self._stopped.is_set():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._stopped.set()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _self_stop(self) -> None:
        self._loop.create_task(self._shutdown()).add_done_callback(
            lambda _: self._loop.stop())
        self._stopped.set()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- commands ----------------------------------------------------------------------

    def inject(self, kind: str, match: str = r".*", times: int = 1,
               delay: float = 2.0) -> None:
        """The next `times` requests whose endpoint (`POST /api/flow_runs/{id}/set_state`)
        matches the regex `match` get fault `kind` (before any planned fault)."""
        if kind not in REQUEST_FAULTS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {REQUEST_FAULTS}")
        with self._lock:
            self._rules.append(_Rule(kind, re.compile(match), times, delay))

    def clear(self) -> None:
        """Forget commanded faults not yet used, and the plan."""
        with self._lock:
            self._rules.clear()
            self._plan = None

    def arm(self, plan: Plan) -> None:
        """Start `plan` now: its window and its timed blackouts / websocket cuts."""
        with self._lock:
            self._plan, self._plan_t0 = plan, time.monotonic()
            self._rng = random.Random(plan.seed)
        for at, seconds in plan.blackouts:
            self._later(at, self._blackout, seconds)
        for at, seconds in plan.ws_cuts:
            self._later(at, self._cut_ws, seconds, None)

    def blackout(self, seconds: float) -> None:
        """From now on for `seconds`: every open connection is reset and so is every new one."""
        self._loop.call_soon_threadsafe(self._blackout, seconds)

    def cut_websockets(self, refuse_for: float = 0.0, match: str | None = None) -> None:
        """Close open websocket tunnels whose path matches `match` (default: the event streams,
        `^/api/events/`) and answer new upgrades 503 for `refuse_for` seconds."""
        self._loop.call_soon_threadsafe(self._cut_ws, refuse_for, match)

    def stall_websockets(self, seconds: float) -> None:
        """For `seconds`, open websocket tunnels stay open but every byte either way is
        dropped (a half-open connection); tunnels opened meanwhile are not stalled."""
        self._loop.call_soon_threadsafe(self._stall_ws, seconds)

    def _stall_ws(self, seconds: float) -> None:
        self._ws_stall_began = time.monotonic()
        self._ws_stalled_until = self._ws_stall_began + seconds
        self._record(WS_STALL, f"{len(self._tunnels)} open")

    # --- what happened -----------------------------------------------------------------

    def count(self, kind: str, endpoint_re: str | None = None) -> int:
        """How many times `kind` happened (on endpoints matching the regex, if given)."""
        pattern = re.compile(endpoint_re) if endpoint_re else None
        with self._lock:
            return sum(n for (k, ep), n in self.counts.items()
                       if k == kind and (pattern is None or pattern.search(ep)))

    def summary(self) -> dict[str, int]:
        """Counts per kind."""
        totals: Counter[str] = Counter()
        with self._lock:
            for (kind, _), n in self.counts.items():
                totals[kind] += n
        return dict(totals)

    def wait_for(self, kind: str, at_least: int = 1, endpoint_re: str | None = None,
                 timeout: float = 30.0) -> int:
        """Block until `kind` happened `at_least` times; return the count (raise on timeout)."""
        deadline = time.monotonic() + timeout
        while (n := self.count(kind, endpoint_re)) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{kind} happened {n} times, not {at_least}, in {timeout} s;"
                                     f" counts: {self.summary()}")
            time.sleep(0.05)
        return n

    def blacked_out(self) -> bool:
        """Whether a blackout is on now."""
        return time.monotonic() < self._blackout_until

    def websocket_count(self) -> int:
        """Open websocket tunnels now."""
        return len(self._tunnels)

    def _record(self, kind: str, ep: str) -> None:
        with self._lock:
            self.counts[(kind, ep)] += 1
            self.events.append((time.monotonic(), kind, ep))

    # --- scheduling --------------------------------------------------------------------

    def _later(self, delay: float, callback: object, *args: object) -> None:
        def schedule() -> None:
            self._loop.call_later(delay, callback, *args)  # type: ignore[arg-type]
        self._loop.call_soon_threadsafe(schedule)

    def _blackout(self, seconds: float) -> None:
        self._blackout_until = max(self._blackout_until, time.monotonic() + seconds)
        self._record(BLACKOUT, f"{seconds:g}s")
        self._cut_all()

    def _cut_all(self) -> None:
        for writer, task in list(self._conns.items()):
            self._record(BLACKOUT_DROP, "open connection")
            _reset(writer)
            task.cancel()
        for client, (_, upstream) in list(self._tunnels.items()):
            _reset(client)
            _reset(upstream)
        self._tunnels.clear()

    def _cut_ws(self, refuse_for: float, match: str | None) -> None:
        pattern = re.compile(match) if match else self._ws_match
        self._ws_refused_until = max(self._ws_refused_until, time.monotonic() + refuse_for)
        for client, (path, upstream) in list(self._tunnels.items()):
            if pattern.search(path):
                self._record(WS_CUT, endpoint("WS", path))
                _reset(client)
                _reset(upstream)
                self._tunnels.pop(client, None)

    def _choose(self, ep: str) -> tuple[str | None, float]:
        """The fault for one request (commanded first, then planned), and the delay."""
        with self._lock:
            for rule in self._rules:
                if rule.times > 0 and rule.match.search(ep):
                    rule.times -= 1
                    return rule.kind, rule.delay
            plan = self._plan
            if plan is None or not re.search(plan.match, ep):
                return None, 0.0
            elapsed = time.monotonic() - self._plan_t0
            if not plan.start <= elapsed < plan.start + plan.duration:
                return None, 0.0
            draw, edge = self._rng.random(), 0.0
            for kind in REQUEST_FAULTS:
                edge += plan.rates.get(kind, 0.0)
                if draw < edge:
                    done = sum(n for (k, _), n in self.counts.items() if k == kind)
                    if done < plan.max_faults.get(kind, 10):
                        return kind, plan.delay_seconds
                    return None, 0.0
            return None, 0.0

    # --- forwarding --------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blacked_out():
            self._record(BLACKOUT_DROP, "new connection")
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns[writer] = task
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError, OSError, asyncio.CancelledError):
            pass  # a cancel is a cut of ours (blackout, stop): the connection just ends
        finally:
            self._conns.pop(writer, None)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        """Handle one request and its response; False when the client connection ends."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        start, headers = _headers(head)
        method, target = start.split(" ")[:2]
        if "upgrade" in headers.get("connection", "").lower():
            await self._websocket(head, target, reader, writer)
            return False
        ep = endpoint(method, target)
        body, _ = await _read_body(reader, headers, response=False)
        kind, delay = self._choose(ep)
        if kind == REFUSE_503:
            self._record(kind, ep)
            payload = b'{"detail":"faultproxy: injected 503"}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                         % (len(payload), payload))
            await writer.drain()
            return False
        if kind == DROP_BEFORE:
            self._record(kind, ep)
            _reset(writer)
            return False
        if kind == HOLD:
            self._record(kind, ep)
            await asyncio.sleep(delay)
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port,
                                                             limit=_LIMIT)
        try:
            up_writer.write(head + body)
            await up_writer.drain()
            answer: list[bytes] = []
            while True:  # pass interim 1xx answers along
                resp_head = await up_reader.readuntil(b"\r\n\r\n")
                answer.append(resp_head)
                status_line, resp_headers = _headers(resp_head)
                status = int(status_line.split(" ")[1])
                if not 100 <= status < 200:
                    break
            keep = True
            if method != "HEAD" and status not in (204, 304):
                resp_body, keep = await _read_body(up_reader, resp_headers, response=True)
                answer.append(resp_body)
        finally:
            up_writer.close()
        if kind == DROP_AFTER:  # the server has answered, so it applied the request
            self._record(kind, ep)
            _reset(writer)
            return False
        if kind == DELAY:
            self._record(kind, ep)
            await asyncio.sleep(delay)
        self._record(FORWARDED, ep)  # before the client can see the answer and ask
        writer.write(b"".join(answer))
        await writer.drain()
        closing = "close" in (headers.get("connection", "")
                              + resp_headers.get("connection", "")).lower()
        return keep and not closing

    async def _websocket(self, head: bytes, target: str, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """Tunnel an upgrade both ways (or refuse it while upgrades are refused)."""
        ep = endpoint("WS", target)
        if time.monotonic() < self._ws_refused_until:
            self._record(WS_REFUSED, ep)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port,
                                                             limit=_LIMIT)
        try:
            up_writer.write(head)
            await up_writer.drain()
            resp_head = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(resp_head)
            await writer.drain()
            if int(_headers(resp_head)[0].split(" ")[1]) != 101:
                _, resp_headers = _headers(resp_head)
                resp_body, _ = await _read_body(up_reader, resp_headers, response=True)
                writer.write(resp_body)
                await writer.drain()
                return
            self._record(WS_OPENED, ep)
            self._tunnels[writer] = (target.split("?", 1)[0], up_writer)
            opened = time.monotonic()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while chunk := await src.read(65536):
                        if (opened <= self._ws_stall_began
                                and time.monotonic() < self._ws_stalled_until):
                            continue  # stalled: the bytes are lost, the connection stays
                        dst.write(chunk)
                        await dst.drain()
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                                 return_exceptions=True)
        finally:
            self._tunnels.pop(writer, None)
            up_writer.close()


def faults_by_endpoint(proxy: FaultProxy, kinds: Iterable[str] = REQUEST_FAULTS
                       ) -> dict[str, dict[str, int]]:
    """{kind: {endpoint: count}} for the given kinds, for reports and failure messages."""
    table: dict[str, dict[str, int]] = {}
    with proxy._lock:
        for (kind, ep), n in proxy.counts.items():
            if kind in kinds:
                table.setdefault(kind, {})[ep] = n
    return table
