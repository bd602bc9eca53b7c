"""A TCP proxy on 127.0.0.1 that can partition the network silently, for the partition tests.

`blackhole()` stops relaying every flow in both directions without closing anything: no FIN, no
RST, both peers keep their sockets and hear nothing more. Flows accepted during the partition are
held the same way (never relayed). `heal()` lets new flows through again; the flows that existed
before stay dead for good, as behind a NAT gateway or firewall that forgot them. Only `close()`
closes the sockets.

The proxy's own kernel still acknowledges the bytes each side sends, so TCP keepalives and
`tcp_user_timeout` never fire through it: what this exercises is the daemon's application-level
deadlines, which a real partition needs as well (a kernel only notices a dead path once it has
unacknowledged data or idle probes, after tens of seconds).

The target is the test server: a unix socket path (the embedded server) or a (host, port) pair.
"""

from __future__ import annotations

import select
import socket
import threading
from dataclasses import dataclass, field

CHUNK = 65536
TURN = 0.05  # seconds a relay thread waits before it looks at its flow's state again


@dataclass(eq=False)
class _Flow:
    client: socket.socket
    upstream: socket.socket | None = None
    dead: bool = False
    ended: bool = False  # one side closed while alive: relayed as a close, like a real network
    threads: list[threading.Thread] = field(default_factory=list)


class PartitionProxy:
    def __init__(self, target: str | tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TURN)
        self.port: int = self._listener.getsockname()[1]
        self._flows: list[_Flow] = []
        self._lock = threading.Lock()
        self._partitioned = False
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def blackhole(self) -> int:
        """Partition: every flow open now stays dead for good; returns how many there were."""
        with self._lock:
            self._partitioned = True
            for flow in self._flows:
                flow.dead = True
            return sum(not f.ended for f in self._flows)

    def heal(self) -> None:
        """New flows get through again; the old ones stay dead."""
        with self._lock:
            self._partitioned = False

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            flows, self._flows = self._flows, []
        for flow in flows:
            for thread in flow.threads:
                thread.join()
            for sock in (flow.client, flow.upstream):
                if sock is not None:
                    sock.close()

    def __enter__(self) -> PartitionProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            flow = _Flow(client)
            with self._lock:
                flow.dead = self._partitioned
                self._flows.append(flow)
            if flow.dead:
                continue  # held, never relayed: its connect times out on the client's side
            try:
                flow.upstream = self._connect_upstream()
            except OSError:
                client.close()
                flow.ended = True
                continue
            for source, sink in ((client, flow.upstream), (flow.upstream, client)):
                thread = threading.Thread(
                    target=self._relay, args=(flow, source, sink), daemon=True
                )
                flow.threads.append(thread)
                thread.start()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target, timeout=5)

    def _relay(self, flow: _Flow, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes from source to sink until the flow ends, dies (then it simply stops: the
        sockets stay open and silent) or the proxy closes."""
        while not (self._closed.is_set() or flow.dead or flow.ended):
            readable, _, _ = select.select([source], [], [], TURN)
            if not readable or flow.dead:
                continue
            try:
                data = source.recv(CHUNK)
                if data and self._send(flow, sink, data):
                    continue
            except OSError:
                pass
            if flow.dead or self._closed.is_set():
                return
            flow.ended = True  # a real close while the path works: pass it on
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _send(self, flow: _Flow, sink: socket.socket, data: bytes) -> bool:
        """Send all of `data` unless the flow dies meanwhile (then the rest is dropped: a
        partition loses bytes in flight). False when the sink is gone."""
        view = memoryview(data)
        while view:
            if flow.dead or self._closed.is_set():
                return True
            _, writable, _ = select.select([], [sink], [], TURN)
            if writable:
                try:
                    view = view[sink.send(view, socket.MSG_DONTWAIT) :]
                except BlockingIOError:
                    continue
        return True
