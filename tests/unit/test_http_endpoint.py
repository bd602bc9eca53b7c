"""The /metrics and /healthz endpoint against clients that misbehave."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from projectord.control import http_endpoint
from projectord.control.http_endpoint import HealthVerdicts, HttpEndpoint, endpoint_app


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    monkeypatch.setattr(http_endpoint, "REQUEST_TIMEOUT", 0.5, raising=False)
    verdicts = HealthVerdicts()
    verdicts.record({"status": "ok", "reasons": []})
    server = HttpEndpoint("127.0.0.1", 0, endpoint_app(CollectorRegistry(), verdicts))
    server.start()
    assert server._server is not None
    try:
        yield server._server.server_address[:2]
    finally:
        server.stop()


def probe(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        return b"".join(iter(lambda: conn.recv(4096), b""))


def test_a_stalled_client_is_dropped_and_never_blocks_a_probe(
    endpoint: tuple[str, int],
) -> None:
    """A slowloris client (half a request, then nothing) held a thread forever: enough of them
    and the daemon runs out of threads. It is dropped after REQUEST_TIMEOUT; probes meanwhile
    are answered."""
    threads_before = threading.active_count()
    stalled = [socket.create_connection(endpoint, timeout=5) for _ in range(20)]
    try:
        for conn in stalled:
            conn.sendall(b"GET /healthz HTT")
        assert probe(endpoint).startswith(b"HTTP/1.0 200")
        for conn in stalled:
            assert conn.recv(4096) == b"", "the server should close a stalled connection"
        deadline = time.monotonic() + 5
        while threading.active_count() > threads_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= threads_before
    finally:
        for conn in stalled:
            conn.close()


def test_garbage_gets_a_400_and_the_endpoint_serves_on(endpoint: tuple[str, int]) -> None:
    with socket.create_connection(endpoint, timeout=5) as conn:
        conn.sendall(b"\x00\xff garbage \r\n\r\n")
        assert b"400 - Bad request" in b"".join(iter(lambda: conn.recv(4096), b""))
    assert probe(endpoint).startswith(b"HTTP/1.0 200")
