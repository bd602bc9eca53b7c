"""Runs the runners of the projections this daemon instance owns, and only those.

Ownership (projectord/daemon/ownership.py) decides which projections are this instance's and calls
back: `start` when it took one, `drain` before it gives one up (the batch in flight finishes and
commits, or is rolled back after `drain_timeout`), `stop_at_once` when its session died and the
locks with it (another instance may already run them: the batches in flight are cancelled, and
the checkpoint's compare-and-set, which checks the owner, would refuse them anyway).

Every projection keeps one `ProjectionRunner` object for the daemon's lifetime, running or not,
so status, operations and metrics always find it. `local` names the ones running here, and the
heartbeats of exactly those are in the list the watchdog and health watch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from projectord.daemon.heartbeat import Heartbeat
from projectord.logs import get_logger
from projectord.runner.loop import ProjectionRunner

log = get_logger("projectord.daemon.supervisor")

# How long a cancelled runner may take to roll its batch back before the supervisor goes on
# without it (a handler that ignores cancellation; the watchdog reports that loop).
CANCEL_GRACE = 5.0


@dataclass
class _Running:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


class Supervisor:
    def __init__(
        self,
        runners: Sequence[ProjectionRunner],
        heartbeats: list[Heartbeat],
        drain_timeout: Callable[[], float],
    ) -> None:
        self.runners = {runner.name: runner for runner in runners}
        self.heartbeats = heartbeats  # shared, live: the watchdog's and health's
        self.drain_timeout = drain_timeout
        self.local: set[str] = set()  # projections whose runner runs in this process
        self._running: dict[str, _Running] = {}
        self._group: TaskGroup | None = None
        self._accepting = True

    def attach(self, group: TaskGroup) -> None:
        """The task group the runners run in; its cancel scope is the drain's last resort."""
        self._group = group

    async def start(self, name: str) -> None:
        """Ownership took `name`: run its runner from the stored checkpoint."""
        if not self._accepting or self._group is None:
            return
        previous = self._running.get(name)
        if previous is not None:  # cancelled a moment ago and still rolling back
            await previous.done.wait()
        runner = self.runners[name]
        runner.reset()
        running = _Running()
        self._running[name] = running
        self.local.add(name)
        self.heartbeats.append(runner.heartbeat)
        self._group.start_soon(self._run, runner, running)

    async def _run(self, runner: ProjectionRunner, running: _Running) -> None:
        try:
            with running.scope:
                await runner.run()
        finally:
            self.local.discard(runner.name)
            if runner.heartbeat in self.heartbeats:
                self.heartbeats.remove(runner.heartbeat)
            if self._running.get(runner.name) is running:
                del self._running[runner.name]
            running.done.set()

    async def drain(self, name: str) -> None:
        """Ownership gives `name` up: let the batch in flight finish, then return."""
        running = self._running.get(name)
        if running is None:
            return
        self.runners[name].request_stop()
        with anyio.move_on_after(self.drain_timeout()):
            await running.done.wait()
        if not running.done.is_set():
            log.warning("runner.drain_timeout", projection=name, timeout=self.drain_timeout())
            await self._cancel([name])

    async def stop_at_once(self, names: Sequence[str]) -> None:
        """Ownership lost `names` with its session: cancel their batches now."""
        await self._cancel(names)

    async def _cancel(self, names: Sequence[str]) -> None:
        waiting = [self._running[n] for n in names if n in self._running]
        for running in waiting:
            running.scope.cancel()
        with anyio.move_on_after(CANCEL_GRACE):
            for running in waiting:
                await running.done.wait()
        stuck = [n for n in names if n in self._running and not self._running[n].done.is_set()]
        if stuck:
            log.error("runner.cancel_ignored", projections=stuck, waited=CANCEL_GRACE)

    def stop_all(self) -> None:
        """The daemon drains: start nothing more, and let every runner finish its batch."""
        self._accepting = False
        for name in list(self._running):
            self.runners[name].request_stop()
