"""`GET /health` for compose and orchestrator health checks (healthy while the loop polls),
and `GET /metrics` for Prometheus (metrics.py), on one port."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics

if TYPE_CHECKING:
    from .worker import Worker


def staleness_limit(poll_interval: float) -> float:
    """How long without a successful poll before the worker counts as unhealthy."""
    return max(3 * poll_interval, 30.0)


def serve_health(worker: Worker, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (its port, for port 0)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics.REGISTRY))
                return
            if path != "/health":
                self.send_error(404)
                return
            last = worker.last_poll
            age = None if last is None else time.monotonic() - last
            healthy = age is not None and age <= staleness_limit(worker.slowest_poll_interval())
            body = json.dumps({
                "status": "ok" if healthy else ("starting" if age is None else "stale"),
                "worker": worker.settings.name,
                "pool": worker.settings.pool,
                "seconds_since_poll": None if age is None else round(age, 1),
                "active_runs": len(worker.active_runs()),
                "rounds": dict(worker.rounds),  # the loop's rounds done, by name
                "failures": dict(worker.failures),  # and failed (each retried next turn)
            }).encode()
            self._send(200 if healthy else 503, "application/json", body)

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would flood the console

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
