"""A tiny counting HTTP/1.1 reverse proxy on 127.0.0.1, one per worker under test.

It forwards every request byte for byte to one upstream on loopback (any method; bodies by
Content-Length, chunked or until close; WebSocket upgrades are tunnelled both ways) and
records (monotonic time, method, path) of each request as its head arrives. Each request gets
its own upstream connection, so the server closing an idle keep-alive never loses a request.
Over a WebSocket, each message the client sends is recorded too (method `WSMSG`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

_LIMIT = 1 << 20
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Request:
    """One request as the proxy saw it (`WS`: a WebSocket upgrade; `WSMSG`: a message the
    client sent over it); `took`: head in → response out, seconds."""

    at: float
    method: str
    path: str
    took: float | None = None

    @property
    def endpoint(self) -> str:
        """`METHOD /path` with ids as `{id}` and no query string, for per-endpoint counts."""
        return f"{self.method} {_ID.sub('{id}', self.path.split('?', 1)[0])}"


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    """The start line and the (lower-cased) headers of a message head."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _copy_exactly(src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        chunk = await src.read(min(n, 65536))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", n)
        dst.write(chunk)
        await dst.drain()
        n -= len(chunk)


async def _copy_until_eof(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while chunk := await src.read(65536):
        dst.write(chunk)
        await dst.drain()


async def _copy_body(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, headers: dict[str, str], *,
    response: bool,
) -> bool:
    """Forward one message body; return False when the connection must close afterwards."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await src.readuntil(b"\r\n")
            dst.write(line)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (trailer := await src.readuntil(b"\r\n")) != b"\r\n":
                    dst.write(trailer)
                dst.write(b"\r\n")
                await dst.drain()
                return True
            await _copy_exactly(src, dst, size + 2)
    if "content-length" in headers:
        await _copy_exactly(src, dst, int(headers["content-length"]))
        return True
    if response:  # no length: the body runs until the server closes
        await _copy_until_eof(src, dst)
        return False
    return True


async def _copy_frames(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       on_message: Callable[[], None]) -> None:
    """Forward WebSocket frames as they are, calling `on_message` per complete data message."""
    while True:
        try:
            head = await src.readexactly(2)
        except asyncio.IncompleteReadError as exc:
            dst.write(exc.partial)
            return
        length, extra = head[1] & 0x7F, 4 if head[1] & 0x80 else 0
        ext = await src.readexactly({126: 2, 127: 8}.get(length, 0) + extra)
        if length >= 126:
            length = int.from_bytes(ext[: 2 if length == 126 else 8], "big")
        dst.write(head + ext)
        await _copy_exactly(src, dst, length)
        if head[0] & 0x80 and head[0] & 0x0F in (0, 1, 2):  # FIN of a text/binary message
            on_message()


async def _tunnel(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  on_message: Callable[[], None]) -> None:
    """After `101 Switching Protocols`: pipe both ways until either side closes, counting the
    client's messages."""

    async def pipe(coro: Awaitable[None], dst: asyncio.StreamWriter) -> None:
        try:
            await coro
        finally:
            dst.close()

    await asyncio.gather(
        pipe(_copy_frames(client[0], upstream[1], on_message), upstream[1]),
        pipe(_copy_until_eof(upstream[0], client[1]), client[1]),
        return_exceptions=True,
    )


class CountingProxy:
    """Reverse proxy 127.0.0.1:<port> → 127.0.0.1:<upstream_port>, counting requests."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    def start(self) -> int:
        """Listen on a free loopback port (in a background thread); return the port."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, limit=_LIMIT), self._loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def stop(self) -> None:
        """Stop listening, cancel open connections, end the thread."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def between(self, start: float, end: float) -> list[Request]:
        """Requests whose head arrived in [start, end] (monotonic clock)."""
        return [r for r in list(self.requests) if start <= r.at <= end]

    def first(self, path_suffix: str) -> float | None:
        """Arrival time of the first request whose path ends with `path_suffix`."""
        return next((r.at for r in list(self.requests) if r.path.endswith(path_suffix)), None)

    @staticmethod
    def breakdown(requests: list[Request]) -> dict[str, int]:
        """Counts per endpoint, most frequent first."""
        return dict(Counter(r.endpoint for r in requests).most_common())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Forward one request and its response; False when the client connection ends."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        start, headers = _headers(head)
        method, target = start.split(" ")[:2]
        upgrade = "upgrade" in headers.get("connection", "").lower()
        request = Request(time.monotonic(), "WS" if upgrade else method, target)
        self.requests.append(request)
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port, limit=_LIMIT
        )
        try:
            up_writer.write(head)
            await _copy_body(reader, up_writer, headers, response=False)
            await up_writer.drain()
            while True:  # skip interim 1xx answers (but not 101)
                resp_head = await up_reader.readuntil(b"\r\n\r\n")
                writer.write(resp_head)
                status_line, resp_headers = _headers(resp_head)
                status = int(status_line.split(" ")[1])
                if status == 101 or not 100 <= status < 200:
                    break
            if status == 101:
                await writer.drain()

                def sent() -> None:
                    self.requests.append(Request(time.monotonic(), "WSMSG", target))

                await _tunnel((reader, writer), (up_reader, up_writer), sent)
                return False
            keep = True
            if method != "HEAD" and status not in (204, 304):
                keep = await _copy_body(up_reader, writer, resp_headers, response=True)
            await writer.drain()
            request.took = time.monotonic() - request.at
            closing = "close" in (headers.get("connection", "") + resp_headers.get(
                "connection", "")).lower()
            return keep and not closing
        finally:
            up_writer.close()
