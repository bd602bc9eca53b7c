"""Ownership through advisory locks: exclusive, spread across instances, taken over when an
instance's session dies."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio
import psycopg

from projectord.daemon.ownership import Ownership
from tests.support.harness import PROJECTION_LOCK_HOLDERS, TestDatabase

NAMES = [f"p{n}" for n in range(6)]


class Instance:
    def __init__(self, db: TestDatabase, name: str, interval: float = 0.2) -> None:
        self.running: set[str] = set()
        self.lost_at: float | None = None
        self.ownership = Ownership(
            db.url,
            "projectord",
            name,
            NAMES,
            acquired=self._acquired,
            released=self._released,
            lost=self._lost,
            interval=interval,
        )

    async def _acquired(self, name: str) -> None:
        self.running.add(name)

    async def _released(self, name: str) -> None:
        self.running.discard(name)

    async def _lost(self, names: Sequence[str]) -> None:
        self.running.difference_update(names)
        self.lost_at = time.monotonic()


def test_spread_exclusive_and_taken_over(db: TestDatabase) -> None:
    async def scenario() -> None:
        instances = [Instance(db, f"i{n}") for n in range(3)]

        def check_exclusive() -> None:
            seen: list[str] = []
            for instance in instances:
                seen += instance.running
            assert len(seen) == len(set(seen)), f"a projection runs twice: {seen}"

        async def converge(expected: dict[int, int], timeout: float) -> None:
            with anyio.fail_after(timeout):
                while True:
                    check_exclusive()
                    counts = {i: len(inst.running) for i, inst in enumerate(instances)}
                    if all(counts[i] == n for i, n in expected.items()) and (
                        sum(counts.values()) == len(NAMES)
                    ):
                        return
                    await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(instances[0].ownership.run)
            await converge({0: 6}, 10)  # alone, it runs everything
            scopes = []
            for instance in instances[1:]:
                scope = anyio.CancelScope()
                scopes.append(scope)

                async def run(instance: Instance = instance, scope: anyio.CancelScope = scope):
                    with scope:
                        await instance.ownership.run()

                tg.start_soon(run)
            await converge({0: 2, 1: 2, 2: 2}, 10)  # spread, not piled on the first
            # Kill instance 1's session from the server side: its locks go with it.
            victim = set(instances[1].ownership.owned)
            with psycopg.connect(db.url, autocommit=True) as conn:
                pid = conn.execute(PROJECTION_LOCK_HOLDERS, (sorted(victim)[0],)).fetchone()[0]
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            scopes[0].cancel()  # and the instance stays dead
            instances[1].running.clear()
            await converge({0: 3, 2: 3}, 10)
            assert victim <= instances[0].running | instances[2].running
            owners = dict(db.rows("SELECT name, owner FROM projectord.projection_positions"))
            for i in (0, 2):
                for name in instances[i].running:
                    assert owners[name] == f"i{i}"
            tg.cancel_scope.cancel()

    anyio.run(scenario)


def test_a_session_ended_by_the_server_is_noticed_at_once(db: TestDatabase) -> None:
    """Between rebalances (a minute apart here) the instance waits on its session's socket: the
    server ending the session stops the instance's runners at once, not at the next turn."""

    async def until(done: Callable[[], bool], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while True:
                if done():
                    return
                await anyio.sleep(0.01)

    async def scenario() -> None:
        instance = Instance(db, "i0", interval=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(instance.ownership.run)
            await until(lambda: len(instance.running) == len(NAMES), 10)
            await anyio.sleep(0.2)  # waiting for its next turn
            with psycopg.connect(db.url, autocommit=True) as conn:
                conn.execute(
                    f"SELECT pg_terminate_backend(pid) FROM ({PROJECTION_LOCK_HOLDERS}) h",
                    (NAMES[0],),
                )
            ended = time.monotonic()
            await until(lambda: instance.lost_at is not None, 5)
            assert instance.lost_at is not None and instance.lost_at - ended < 2
            # It reconnects and takes its projections back.
            await until(lambda: len(instance.running) == len(NAMES), 10)
            tg.cancel_scope.cancel()

    anyio.run(scenario)
