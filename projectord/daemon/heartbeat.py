"""Liveness of the daemon's loops, for the systemd watchdog and for `health`.

A frozen daemon must not look healthy (Marten #4982 reported green while its high-water mark was
frozen). Each long-running loop (every projection runner, the listener) owns a `Heartbeat`: it
beats once per turn, and marks the places where it deliberately waits (idle, backoff, paused). A
loop that is neither waiting nor has beaten for longer than the stall timeout is wedged, for
example in a handler that never returns; the watchdog then stops pinging systemd.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Heartbeat:
    def __init__(self, name: str) -> None:
        self.name = name
        self.last = time.monotonic()
        self._waiting = 0

    def beat(self) -> None:
        self.last = time.monotonic()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """A deliberate wait: the loop is alive as long as the event loop runs."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
            self.beat()

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the loop last showed progress; 0 while it waits on purpose."""
        if self._waiting:
            return 0.0
        return max(0.0, (now if now is not None else time.monotonic()) - self.last)
