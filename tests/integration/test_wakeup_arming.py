"""Appends notify only while a listener is armed (about to sleep), and no wake-up is ever lost.

The race that matters: a writer decides not to notify (no listener is armed) and stays open; the
listener then arms, the runner reads once more and goes to sleep; the writer commits. If arming did
not wait for that writer, its event would be invisible to the last read and no notification would
come: the event would wait for the next poll. These tests set up exactly that interleaving.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from projectord.daemon.listener import DISARM_RATE
from projectord.queries import Queries
from tests.support.harness import DaemonProcess, TestDatabase, append_sql, wait_until
from tests.support.ops_projections import Slow

QUERIES = Queries("projectord")
CHANNEL = "projectord_projectord"
# Alone: an idle projection would keep it armed.
SLOW = "tests.integration.test_wakeup_arming:slow_only"
slow_only = [Slow]


def notifications(listener: psycopg.Connection[object], timeout: float = 0.5) -> int:
    return len(list(listener.notifies(timeout=timeout)))


def test_arming_waits_for_writers_that_decided_not_to_notify(db: TestDatabase) -> None:
    with (
        db.connect(autocommit=True) as listener,
        db.connect() as writer,
        db.connect(autocommit=True) as reader,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        # Not armed: appends do not notify.
        append_sql(writer, "Credited", {"account": 1, "amount": 1})
        writer.commit()
        assert notifications(listener) == 0

        # A writer appends while no listener is armed, and stays open.
        append_sql(writer, "Credited", {"account": 1, "amount": 2})
        armed = threading.Event()

        def arm() -> None:
            with db.connect(autocommit=True) as arming:  # no lock timeout: wait as long as it takes
                arming.execute(QUERIES["arm_wakeups"], {"channel": CHANNEL})
                armed.set()
                stop.wait(10)

        stop = threading.Event()
        thread = threading.Thread(target=arm)
        thread.start()
        try:
            # Arming waits for that writer: the listener cannot sleep before the event commits.
            assert not armed.wait(0.5), "armed while a writer that did not notify was open"
            writer.commit()
            assert armed.wait(5)
            # So the runner's last read before sleeping, taken now, sees the event.
            assert reader.execute("SELECT count(*) FROM projectord.events").fetchone() == (2,)

            # Armed: every appending transaction notifies, whatever its isolation level.
            append_sql(writer, "Credited", {"account": 1, "amount": 4})
            writer.commit()
            writer.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            append_sql(writer, "Credited", {"account": 2, "amount": 8})
            writer.commit()
            assert notifications(listener, timeout=1.0) == 2
        finally:
            stop.set()
            thread.join()
        # The arming session is gone, and its stripes with it: no notifications any more.
        append_sql(writer, "Credited", {"account": 1, "amount": 16})
        writer.commit()
        assert notifications(listener) == 0


def notify_burst(conn: psycopg.Connection[object], count: int) -> None:
    """`count` notifications on the daemon's channel at once (distinct payloads, so the server
    does not fold them into one): to the listener, writers appending at a high rate."""
    conn.execute("SELECT pg_notify(%s, g::text) FROM generate_series(1, %s) g", (CHANNEL, count))
    conn.commit()


def armed_listeners(db: TestDatabase) -> int:
    return db.scalar(QUERIES["armed_listeners"], {"channel": CHANNEL})


def slow_applied(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM slow_seen")


def test_no_wake_up_is_lost_when_the_daemon_goes_to_sleep_during_an_append(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time
    with DaemonProcess(db.url, SLOW, state_dir, extra_env=env), db.connect() as writer:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)  # idle: armed
        # A slow batch keeps the runner busy, and a burst of notifications (as from busy
        # writers) disarms the listener: from now on appends do not notify.
        append_sql(writer, "Slow", {"sleep": 1.5})
        writer.commit()
        notify_burst(writer, DISARM_RATE)
        wait_until(lambda: armed_listeners(db) == 0, timeout=5)
        # Meanwhile a writer appends (and decides not to notify), and stays open until well after
        # the runner has finished the slow batch and tried to go to sleep.
        append_sql(writer, "Slow", {})
        time.sleep(2.5)
        assert slow_applied(db) == 1
        writer.commit()
        committed = time.monotonic()
        wait_until(lambda: slow_applied(db) == 2, timeout=5)
        took = time.monotonic() - committed
        assert took < 1.5, f"applied {took:.2f}s after the commit: a wake-up was lost"
        # And the daemon is armed again, asleep.
        wait_until(lambda: armed_listeners(db) == 1, timeout=5)


def test_the_listener_stays_armed_while_appends_are_rare(db: TestDatabase, state_dir: Path) -> None:
    """A few appends a second: each notifies and is applied on its wake-up alone; the listener
    never disarms in between (that would cost a round trip to disarm and another to arm again,
    on every event)."""
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time
    seen_disarmed = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        with db.connect(autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(QUERIES["armed_listeners"], {"channel": CHANNEL}).fetchone()
                if row == (0,):
                    seen_disarmed.set()

    with DaemonProcess(db.url, SLOW, state_dir, extra_env=env), db.connect() as writer:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for n in range(1, 11):
                append_sql(writer, "Slow", {})
                writer.commit()
                wait_until(lambda n=n: slow_applied(db) == n, timeout=5)  # type: ignore[misc]
        finally:
            stop.set()
            watcher.join()
    assert not seen_disarmed.is_set(), "the listener disarmed while appends were rare"


def test_one_poll_serves_every_projection(db: TestDatabase, state_dir: Path) -> None:
    """Appends that notify nobody (trigger disabled) are found by the listener's poll, which
    wakes every runner: idle runners poll on their own only every 12 poll intervals."""
    specs = "tests.support.projections:ledger_and_counter"
    db.init(specs)
    with db.connect() as conn:
        conn.execute("ALTER TABLE projectord.events DISABLE TRIGGER events_appended")
    env = {"PROJECTORD_POLL_INTERVAL": "0.5"}  # runners alone: every 6 s
    with DaemonProcess(db.url, specs, state_dir, extra_env=env), db.connect() as writer:
        time.sleep(1)  # every runner asleep
        for n in range(1, 4):
            append_sql(writer, "Credited", {"account": 1, "amount": 1})
            writer.commit()
            took = wait_until(
                lambda n=n: (
                    db.scalar("SELECT coalesce(sum(n), 0) FROM counts") == n
                    and db.scalar("SELECT count(*) FROM applied_log") == n
                ),
                timeout=10,
            )
            assert took < 1.5, f"applied after {took:.2f}s: the shared poll did not wake them"


class Arming:
    """An arming in a thread, as the listener does it (no lock timeout): `done` once it returns."""

    def __init__(self, db: TestDatabase) -> None:
        self.db = db
        self.done = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with self.db.connect(autocommit=True) as arming:
            arming.execute(QUERIES["arm_wakeups"], {"channel": CHANNEL})
            self.done.set()
            self.stop.wait(10)

    def __enter__(self) -> Arming:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_a_notifier_whose_deferred_foreign_key_fails_loses_no_wake_up(db: TestDatabase) -> None:
    """A writer's commit waits in its deferred foreign-key check on a concurrent delete of the
    parent row, then fails. Another writer commits meanwhile: its event must wake the listener on
    its own (a protocol where it relied on the failing writer's NOTIFY lost this wake-up; found by
    review of a withdrawn design)."""
    with (
        db.connect(autocommit=True) as admin,
        db.connect(autocommit=True) as listener,
        db.connect() as deleter,
        db.connect() as notifier,
        db.connect() as silent,
    ):
        admin.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        admin.execute(
            "CREATE TABLE child (parent int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)"
        )
        admin.execute("INSERT INTO parent VALUES (1)")
        listener.execute(f'LISTEN "{CHANNEL}"')
        with Arming(db) as armed:
            if not armed.done.wait(5):
                pytest.fail("the listener did not arm")
            deleter.execute("DELETE FROM parent WHERE id = 1")
            append_sql(notifier, "Credited", {"account": 1, "amount": 1})
            notifier.execute("INSERT INTO child VALUES (1)")
            failed: list[BaseException] = []

            def commit() -> None:
                try:
                    notifier.commit()
                except psycopg.errors.ForeignKeyViolation as exc:
                    failed.append(exc)

            committing = threading.Thread(target=commit)
            committing.start()
            # The notifier's commit is now waiting on the parent row, its wake-up not yet sent.
            wait_until(lambda: committing.is_alive(), 5)
            append_sql(silent, "Credited", {"account": 2, "amount": 2})
            silent.commit()  # committed: its event is there for the runners to read
            deleter.commit()
            committing.join(5)
            if not failed:
                pytest.fail("the notifier's foreign key check did not fail")
            assert notifications(listener, timeout=1.0) >= 1, "no wake-up for a committed event"


def test_a_notifier_that_decided_early_and_rolls_back_loses_no_wake_up(db: TestDatabase) -> None:
    """`SET CONSTRAINTS ALL IMMEDIATE` (some ORMs run it to check constraints) in a writer that then
    rolls back: another writer's commit meanwhile still wakes the listener (a protocol that took
    its wake-up decision there lost this one; found by review of a withdrawn design)."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect() as notifier,
        db.connect() as silent,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        with Arming(db) as armed:
            if not armed.done.wait(5):
                pytest.fail("the listener did not arm")
            append_sql(notifier, "Credited", {"account": 1, "amount": 1})
            notifier.execute("SET CONSTRAINTS ALL IMMEDIATE")
            append_sql(silent, "Credited", {"account": 2, "amount": 2})
            silent.commit()
            notifier.rollback()
            assert notifications(listener, timeout=1.0) >= 1, "no wake-up for a committed event"
