"""Appends notify only while a listener is armed (about to sleep), one commit at a time, and no
wake-up is ever lost (sql/migrations/0017_one_notifier_per_wakeup.sql).

Two races matter. A writer decides not to notify (no listener is armed) and stays open; the
listener then arms, the runner reads once more and goes to sleep; the writer commits. And a writer
stays silent though a listener is armed, because another commit is notifying at that moment; that
commit wakes the listener, the runner reads, arms again and goes to sleep; the silent writer
commits. If arming did not wait for such writers, their events would be invisible to the last
read and no notification would come: they would wait for the next poll. These tests set up exactly
those interleavings (a writer's `SET CONSTRAINTS ALL IMMEDIATE` takes its commit-time decision
early, so it can be held open after deciding).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg

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
        # The arming session is gone (once the server has ended it), and its stripes with it: no
        # notifications any more.
        wait_until(lambda: armed_listeners(db) == 0, timeout=5)
        append_sql(writer, "Credited", {"account": 1, "amount": 16})
        writer.commit()
        assert notifications(listener) == 0


def decide_now(conn: psycopg.Connection[object]) -> None:
    """Run the appends' commit-time wake-up decision now (it is a deferred trigger), in the open
    transaction: the writer then holds what that decision took until it ends."""
    conn.execute("SET CONSTRAINTS ALL IMMEDIATE")


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


def test_one_commit_notifies_and_the_silent_one_holds_the_sweep_and_the_next_arming(
    db: TestDatabase,
) -> None:
    with (
        db.connect(autocommit=True) as listener,
        db.connect() as notifier,
        db.connect() as silent,
        db.connect(autocommit=True) as reader,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        with Arming(db) as first:
            assert first.done.wait(5)
            # Armed: two writers append; the first to decide takes the token and notifies, the
            # second decides while the first still holds it and stays silent.
            append_sql(notifier, "Credited", {"account": 1, "amount": 1})
            append_sql(silent, "Credited", {"account": 2, "amount": 2})
            decide_now(notifier)
            decide_now(silent)
            notifier.commit()
            assert notifications(listener) == 1
            # Woken, the listener sweeps before it wakes its runners: that waits for the silent
            # writer, so the runners' read after it sees the silent event.
            sweeping = threading.Thread(
                target=lambda: reader.execute(QUERIES["sweep_wakeups"], {"channel": CHANNEL})
            )
            sweeping.start()
            sweeping.join(0.5)
            assert sweeping.is_alive(), "swept while a silent writer was open"
            silent.commit()
            sweeping.join(5)
            assert not sweeping.is_alive()
            assert reader.execute("SELECT count(*) FROM projectord.events").fetchone() == (2,)
        assert notifications(listener) == 0, "the silent writer notified"
        # A silent writer also holds an arming (after a sweep that timed out, the listener
        # disarms and arms again).
        with Arming(db) as second:
            assert second.done.wait(5)
            append_sql(notifier, "Credited", {"account": 1, "amount": 1})
            append_sql(silent, "Credited", {"account": 2, "amount": 2})
            decide_now(notifier)
            decide_now(silent)
            notifier.commit()
        with Arming(db) as third:
            assert not third.done.wait(0.5), "armed while a silent writer was open"
            silent.commit()
            assert third.done.wait(5)


def test_every_commit_notifies_while_a_listener_of_the_previous_release_is_armed(
    db: TestDatabase,
) -> None:
    """A listener of the previous release arms on stripes 0-63 (0006) and needs a NOTIFY from
    every commit while armed: appends then notify whatever the token says."""
    old_arm = "SELECT count(pg_advisory_lock_shared(hashtext(%s), s)) FROM generate_series(0, 63) s"
    with (
        db.connect(autocommit=True) as listener,
        db.connect() as first,
        db.connect() as second,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        listener.execute(old_arm, (CHANNEL,))
        append_sql(first, "Credited", {"account": 1, "amount": 1})
        append_sql(second, "Credited", {"account": 2, "amount": 2})
        decide_now(first)
        decide_now(second)
        first.commit()
        second.commit()
        assert notifications(listener, timeout=1.0) == 2


def armed_listeners(db: TestDatabase) -> int:
    return db.scalar(QUERIES["armed_listeners"], {"channel": CHANNEL})


def slow_applied(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM slow_seen")


def test_no_wake_up_is_lost_when_the_daemon_goes_to_sleep_during_an_append(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time
    with db.connect() as writer:
        # No listener armed yet: the append decides not to notify, and stays open while the
        # daemon starts, reads and tries to go to sleep (each arming times out meanwhile).
        append_sql(writer, "Slow", {})
        with DaemonProcess(db.url, SLOW, state_dir, extra_env=env):
            time.sleep(2.5)
            assert slow_applied(db) == 0
            writer.commit()
            committed = time.monotonic()
            wait_until(lambda: slow_applied(db) == 1, timeout=5)
            took = time.monotonic() - committed
            assert took < 1.5, f"applied {took:.2f}s after the commit: a wake-up was lost"
            # And the daemon is armed, asleep.
            wait_until(lambda: armed_listeners(db) == 1, timeout=5)


def test_no_wake_up_is_lost_for_a_writer_that_stayed_silent_while_another_notified(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time
    with (
        DaemonProcess(db.url, SLOW, state_dir, extra_env=env),
        db.connect() as notifier,
        db.connect() as silent,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)  # idle: armed
        append_sql(notifier, "Slow", {})
        append_sql(silent, "Slow", {})
        decide_now(notifier)  # takes the token: it notifies when it commits
        decide_now(silent)  # armed, token taken: silent
        notifier.commit()
        # Woken, the runner applies that event, and the daemon arms again and sleeps, while the
        # silent writer stays open past a few arming attempts (each waits up to its lock timeout).
        wait_until(lambda: slow_applied(db) == 1, timeout=5)
        time.sleep(1.0)
        assert slow_applied(db) == 1
        silent.commit()
        committed = time.monotonic()
        wait_until(lambda: slow_applied(db) == 2, timeout=5)
        took = time.monotonic() - committed
        assert took < 1.5, f"applied {took:.2f}s after the commit: a wake-up was lost"
        wait_until(lambda: armed_listeners(db) == 1, timeout=5)


def test_rare_appends_are_each_applied_on_their_wake_up(db: TestDatabase, state_dir: Path) -> None:
    """A few appends a second: each notifies, is applied on its wake-up alone, and the daemon is
    armed again before the next one (else the next one would wait for the poll)."""
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time
    with DaemonProcess(db.url, SLOW, state_dir, extra_env=env), db.connect() as writer:
        for n in range(1, 11):
            wait_until(lambda: armed_listeners(db) == 1, timeout=10)
            append_sql(writer, "Slow", {})
            writer.commit()
            wait_until(lambda n=n: slow_applied(db) == n, timeout=5)  # type: ignore[misc]


def test_concurrent_writers_lose_no_wake_up(db: TestDatabase, state_dir: Path) -> None:
    """Several writers appending at once and then stopping, again and again: every burst's last
    events are applied promptly, whichever commits notified and whichever stayed silent."""
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time

    def burst(count: int) -> None:
        with db.connect() as conn:
            for _ in range(count):
                append_sql(conn, "Slow", {})
                conn.commit()

    with DaemonProcess(db.url, SLOW, state_dir, extra_env=env):
        total = 0
        for _ in range(5):
            wait_until(lambda: armed_listeners(db) == 1, timeout=10)
            threads = [threading.Thread(target=burst, args=(20,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            total += 80
            committed = time.monotonic()
            wait_until(lambda total=total: slow_applied(db) == total, timeout=5)  # type: ignore[misc]
            took = time.monotonic() - committed
            assert took < 1.5, f"applied {took:.2f}s after the last commit: a wake-up was lost"


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


def test_a_rolled_back_savepoint_does_not_take_the_transactions_wake_up_with_it(
    db: TestDatabase,
) -> None:
    """Only a transaction's first append found armed queues the commit-time decision; if a
    rolled-back savepoint takes that append back, the next append queues it again."""
    with db.connect(autocommit=True) as listener, db.connect() as writer, Arming(db) as arming:
        listener.execute(f'LISTEN "{CHANNEL}"')
        assert arming.done.wait(5)
        writer.execute("SAVEPOINT before")
        append_sql(writer, "Credited", {"account": 1, "amount": 1})
        writer.execute("ROLLBACK TO SAVEPOINT before")
        append_sql(writer, "Credited", {"account": 1, "amount": 2})
        append_sql(writer, "Credited", {"account": 1, "amount": 4})
        writer.commit()
        assert notifications(listener) == 1
