"""The notification listener on its own, against a real server: it waits on its socket, hears
its own probes (which arrive while it runs its own statement, so psycopg hands them over) and
wakes the runners on an append at once, not at its next poll or probe."""

from __future__ import annotations

import time

import anyio

from projectord.daemon.listener import NotificationListener
from tests.support.harness import TestDatabase, append_sql


def armed_listener_wakes(db: TestDatabase, probe_interval: float, idle: float) -> tuple[int, float]:
    """Run an armed listener for `idle` seconds, then append: its reconnects meanwhile, and how
    long after the append it woke the runners."""
    wakes: list[float] = []

    async def main() -> tuple[int, float]:
        listener = NotificationListener(
            db.url, "projectord", lambda: wakes.append(time.monotonic()),
            probe_interval=probe_interval, poll_interval=3600,
        )  # fmt: skip
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listener.run)
            with anyio.fail_after(10):
                while not listener.connected:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                listener.request_arm()
                while not listener.armed:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            await anyio.sleep(idle)
            reconnects = listener.reconnects
            before = len(wakes)
            appended = time.monotonic()
            with db.connect(autocommit=True) as conn:  # armed: the append notifies
                append_sql(conn, "Credited", {"account": 1, "amount": 1})
            with anyio.fail_after(10):
                while len(wakes) == before:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            tasks.cancel_scope.cancel()
        return reconnects, wakes[before] - appended

    return anyio.run(main)


def test_the_listener_hears_its_own_probes(db: TestDatabase) -> None:
    """A probe every 0.4 s for 3 s: one the listener missed would end in a reconnect."""
    reconnects, _ = armed_listener_wakes(db, probe_interval=0.4, idle=3)
    assert reconnects == 0, "the listener missed its own probe and reconnected"


def test_an_append_wakes_the_runners_at_once(db: TestDatabase) -> None:
    """With a probe every 60 s and an hour-long poll the listener waits 30 s at a time: only
    the notification itself can wake it within a second."""
    reconnects, woke_after = armed_listener_wakes(db, probe_interval=60, idle=0.5)
    assert reconnects == 0
    assert woke_after < 1.0
