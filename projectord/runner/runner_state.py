"""What a runner knows and reports about itself: the state its parts share (`RunnerState`), its
status (for status, health and metrics), the progress of a rebuild, the event a failing projection
is stuck on, and the wake-up signals it waits on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from psycopg_pool import AsyncConnectionPool
from structlog.stdlib import BoundLogger

from projectord.checkpoint import START, Checkpoint
from projectord.daemon.heartbeat import Heartbeat
from projectord.event_store import Event
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.batch import BatchTransaction
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.runner.error_policy import ErrorPolicy
from projectord.runner.handler_timeout import HandlerClock
from projectord.schema.foreign_owner import ForeignOwnerError


@dataclass
class StuckEvent:
    """The event a failing projection cannot get past, found by replaying its batch."""

    event: Event
    batch_start: Checkpoint  # first event of the failed batch: identifies the batch
    traceback: str


@dataclass
class RebuildProgress:
    """A rebuild from the first event: how far it has come."""

    total: int  # events of the projection's types committed when the rebuild began
    target: Checkpoint | None  # the last of them; the rebuild is done once the checkpoint passes it
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def report(self, applied: int, rate: float) -> dict[str, Any]:
        remaining = max(self.total - applied, 0)
        done = self.finished_at is not None
        return {
            "applied": applied,
            "total": self.total,
            "events_per_second": round(rate, 1),
            "eta_seconds": 0.0 if done else (round(remaining / rate, 1) if rate > 0 else None),
            "done": done,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass
class RunnerStatus:
    """What a runner reports about itself (status, health, metrics)."""

    name: str
    state: str = "starting"
    checkpoint: Checkpoint = START
    applied_total: int = 0
    last_error: dict[str, Any] | None = None
    held_back: bool = False
    held_back_since: float | None = None  # monotonic time the horizon started holding it back
    last_batch_at: float = 0.0
    errors_total: int = 0
    rebuild: RebuildProgress | None = None
    recent: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, count)

    def record_batch(self, count: int) -> None:
        now = time.monotonic()
        self.last_batch_at = now
        self.recent.append((now, count))
        cutoff = now - 10.0
        while self.recent and self.recent[0][0] < cutoff:
            self.recent.pop(0)

    def events_per_second(self) -> float:
        now = time.monotonic()
        window = [(t, n) for t, n in self.recent if t >= now - 10.0]
        if not window:
            return 0.0
        return sum(n for _, n in window) / max(now - window[0][0], 1.0)

    def record_held_back(self, held_back: bool) -> None:
        self.held_back = held_back
        if not held_back:
            self.held_back_since = None
        elif self.held_back_since is None:
            self.held_back_since = time.monotonic()


class Wakeup:
    """A wake-up signal that is never lost: `set` before `wait` makes the next `wait` return."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            await self._event.wait()
        woke = self._event.is_set()
        if woke:
            self._event = anyio.Event()
        return woke


class RunnerState:
    """The state ProjectionRunner's parts share (projectord/runner/loop.py sets it up; the parts
    are projectord/runner/failures.py and projectord/runner/operator_requests.py)."""

    name: str
    projection: Projection
    types: list[str]
    pool: AsyncConnectionPool
    queries: Queries
    checkpoints: CheckpointStore
    batches: BatchTransaction
    policy: ErrorPolicy
    owner: str | None
    read_model_schema: str | None
    status: RunnerStatus
    heartbeat: Heartbeat
    clock: HandlerClock
    wakeup: Wakeup
    control: Wakeup
    failed: bool
    paused: bool
    refused: ForeignOwnerError | None
    stuck: StuckEvent | None
    _failures: int
    _isolate_now: bool
    _transient_failures: int
    _stopping: bool
    _persisted: Checkpoint | None
    _position: Checkpoint
    _persisted_at: float
    _log: BoundLogger
