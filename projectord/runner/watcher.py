"""A long-lived task that watches one call at a time, for the lifetime of its owner.

The handler clock (projectord/runner/handler_timeout.py) and the commit watch
(projectord/runner/commit_watch.py)
both bound calls a runner makes for every batch. A task started per call cost about 130-150 µs of
a live batch; one task for the runner's whole life costs a call that ends in time only a few
assignments. This is that task's plumbing: started by `watching`, asleep while no call is in
flight, woken when one begins.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, Protocol, TypeVar

import anyio


class Due(Protocol):
    due: float  # monotonic: when the watcher acts on the call


CallT = TypeVar("CallT", bound=Due)


class Watcher(Generic[CallT]):
    """Base of a one-call-at-a-time watcher: a subclass sets `_current` while a call is in flight
    (and calls `_began`), and says what to do once it is due (`_on_due`)."""

    def __init__(self) -> None:
        self._current: CallT | None = None
        self._watcher_running = False
        self._watcher_idle = False
        self._call_began = anyio.Event()  # wakes an idle watcher

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Run the watcher for the duration of the block. An exception of the block leaves it
        as it is, not wrapped in the task group's ExceptionGroup."""
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            self._watcher_running = True
            tasks.start_soon(self._watch)
            try:
                yield
            except Exception as exc:
                failure = exc
            finally:
                self._watcher_running = False
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def _began(self) -> None:
        """A call is in flight now: wake the watcher if it sleeps."""
        if self._watcher_idle:
            self._watcher_idle = False
            self._call_began.set()

    async def _until_a_call(self) -> None:
        """Sleep until `_began`."""
        self._watcher_idle = True
        await self._call_began.wait()
        self._call_began = anyio.Event()

    async def _watch(self) -> None:
        """Sleep until the call in flight is due; act on it if it is still there."""
        while True:
            call = self._current
            if call is None:
                await self._until_a_call()
                continue
            left = call.due - time.monotonic()
            if left > 0:
                await anyio.sleep(left)  # meanwhile other calls may begin and end: look again
                continue
            await self._on_due(call)

    async def _on_due(self, call: CallT) -> None:
        raise NotImplementedError
