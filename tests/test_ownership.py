"""Ownership through advisory locks: exclusive, spread across instances, taken over when an
instance's session dies."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import psycopg

from projectord.ownership import Ownership
from tests.harness import TestDatabase

NAMES = [f"p{n}" for n in range(6)]


class Instance:
    def __init__(self, db: TestDatabase, name: str) -> None:
        self.running: set[str] = set()
        self.ownership = Ownership(
            db.url,
            "projectord",
            name,
            NAMES,
            acquired=self._acquired,
            released=self._released,
            lost=self._lost,
            interval=0.2,
        )

    async def _acquired(self, name: str) -> None:
        self.running.add(name)

    async def _released(self, name: str) -> None:
        self.running.discard(name)

    async def _lost(self, names: Sequence[str]) -> None:
        self.running.difference_update(names)


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
                pid = conn.execute(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND objid = hashtext(%s)::oid",
                    (sorted(victim)[0],),
                ).fetchone()[0]
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
