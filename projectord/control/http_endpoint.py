"""The optional HTTP endpoint (`metrics_address`): `/metrics` for Prometheus, `/healthz` for load
balancers and Kubernetes probes, 404 for every other path.

`/healthz` answers from the health verdict the daemon's monitor computes every few seconds (the
same verdict as `projectord health`), not from a fresh look per request: probes every second must
not each cost database queries. 200 for `ok` and `degraded` (the daemon is doing its job, maybe
late), 503 for `failing`, and 503 while there is no verdict younger than `STALE_AFTER` seconds
(starting, or an event loop too wedged to look). The body is the verdict as JSON.

The server runs in its own threads, so a busy event loop does not make scrapes time out.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

STALE_AFTER = 30.0  # seconds; the monitor looks every 5
# How long a client may take to send its request (seconds): each connection holds a thread, and
# a client that stalls (slowloris) would hold it forever; a scraper sends its request at once.
REQUEST_TIMEOUT = 10.0

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class EndpointError(Exception):
    """The endpoint cannot listen; phrased for an operator."""


class HealthVerdicts:
    """The latest verdict and when it was taken; written by the event loop, read by the
    endpoint's threads (one tuple assignment, so a reader never sees half of one)."""

    def __init__(self) -> None:
        self._latest: tuple[float, dict[str, Any]] | None = None

    def record(self, verdict: dict[str, Any]) -> None:
        self._latest = (time.monotonic(), verdict)

    def probe(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for `/healthz`."""
        latest = self._latest
        if latest is None:
            return 503, {"status": "starting", "reasons": ["no health verdict yet"]}
        age = time.monotonic() - latest[0]
        verdict = latest[1]
        body = {
            "status": verdict["status"],
            "reasons": [r["message"] for r in verdict["reasons"]],
            "age_seconds": round(age, 3),
        }
        if age > STALE_AFTER:
            body["reasons"].append(f"no health verdict for {age:.0f}s (the daemon is wedged?)")
            return 503, body
        return (503 if verdict["status"] == "failing" else 200), body


def endpoint_app(registry: CollectorRegistry, verdicts: HealthVerdicts) -> WSGIApp:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            code, body = verdicts.probe()
            reason = "OK" if code == 200 else "Service Unavailable"
            start_response(f"{code} {reason}", [("Content-Type", "application/json")])
            return [orjson.dumps(body) + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: /metrics and /healthz are served\n"]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client dropped for stalling is routine, not a traceback on stderr."""
        if not isinstance(sys.exc_info()[1], TimeoutError):
            super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        self.timeout = REQUEST_TIMEOUT  # read here, so a test may shorten it
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds would drown the log."""


class HttpEndpoint:
    def __init__(self, host: str, port: int, app: WSGIApp) -> None:
        self.host, self.port, self.app = host, port, app
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("EndpointServer", (_Server,), {"address_family": family})
            self._server = make_server(
                self.host, self.port, self.app, server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise EndpointError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="projectord-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
