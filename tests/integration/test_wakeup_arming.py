"""Appends notify only while a listener is armed (about to sleep), only the first of them after
each arming, and no wake-up is ever lost (sql/migrations/0018_one_notifier_per_arming.sql).

The races that matter: a writer decides not to notify (no listener is armed, or the arming's
wake-up is taken) and stays open; the listener then arms, the runner reads once more and goes to
sleep; the writer commits. If arming did not wait for that writer, its event would be invisible
to the last read and no notification would come: the event would wait for the next poll. These
tests set up exactly those interleavings.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo

from projectord import Event, Projection, Table
from projectord.daemon.listener import ARM_PAUSE, NotificationListener
from projectord.queries import Queries
from tests.support.harness import (
    TENANT,
    DaemonProcess,
    TestDatabase,
    append_sql,
    arm_wakeups,
    wait_until,
)
from tests.support.ops_projections import Slow
from tests.support.role_support import TemporaryRoles

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
                arm_wakeups(arming)
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

            # Armed: the next append notifies, whatever its isolation level.
            writer.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            append_sql(writer, "Credited", {"account": 2, "amount": 8})
            writer.commit()
            assert notifications(listener, timeout=1.0) == 1
        finally:
            stop.set()
            thread.join()
        # The arming session is gone, and its stripes with it: no notifications any more. (Its
        # backend ends a moment after the client closes: wait for that, else this append may
        # still find the stripes held; seen by review.)
        wait_until(lambda: armed_listeners(db) == 0, timeout=5)
        append_sql(writer, "Credited", {"account": 1, "amount": 16})
        writer.commit()
        assert notifications(listener) == 0


def armed_listeners(db: TestDatabase) -> int:
    return db.scalar(QUERIES["armed_listeners"], {"channel": CHANNEL})


def slow_applied(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM slow_seen")


def test_no_wake_up_is_lost_when_the_daemon_goes_to_sleep_during_an_append(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only a wake-up can apply the events in time
    with (
        DaemonProcess(db.url, SLOW, state_dir, extra_env=env),
        db.connect() as writer,
        db.connect(autocommit=True) as blocker,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)  # idle: armed
        # Someone holds a SILENT stripe, so no arming can complete: after the next notification
        # the listener stays disarmed, and appends do not notify.
        blocker.execute("SELECT pg_advisory_lock(hashtext(%s || '/silent'), 0)", (CHANNEL,))
        # A slow batch keeps the runner busy; its append takes the wake-up.
        append_sql(writer, "Slow", {"sleep": 1.5})
        writer.commit()
        wait_until(lambda: armed_listeners(db) == 0, timeout=5)
        # Meanwhile a writer appends (and decides not to notify), and stays open until well after
        # the runner has finished the slow batch and tried to go to sleep.
        append_sql(writer, "Slow", {})
        blocker.execute("SELECT pg_advisory_unlock_all()")
        wait_until(lambda: slow_applied(db) == 1, timeout=30)
        time.sleep(0.5)  # the runner has finished the slow batch: give it time to try to sleep
        writer.commit()
        committed = time.monotonic()
        wait_until(lambda: slow_applied(db) == 2, timeout=5)
        took = time.monotonic() - committed
        assert took < 1.5, f"applied {took:.2f}s after the commit: a wake-up was lost"
        # And the daemon is armed again, asleep.
        wait_until(lambda: armed_listeners(db) == 1, timeout=5)


def test_the_listener_stays_armed_while_appends_are_rare(db: TestDatabase, state_dir: Path) -> None:
    """A few appends a second: each notifies and is applied on its wake-up alone; the listener
    arms again at once each time, holding its stripes throughout (releasing them would cost a
    round trip, and another to take them again, on every event)."""
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
                time.sleep(ARM_PAUSE[1] * 2)  # the pace of rare appends
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
            arm_wakeups(arming)
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


def test_only_the_first_append_after_an_arming_notifies(db: TestDatabase) -> None:
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as arming,
        db.connect() as writer,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        for _ in range(2):
            arm_wakeups(arming)
            for n in range(3):
                append_sql(writer, "Credited", {"account": 1, "amount": n})
                writer.commit()
            # One notifying commit per arming: the others are silent, and held the next arming.
            assert notifications(listener) == 1
            assert db.scalar("SELECT armed FROM projectord.wakeups") is False


def test_arming_waits_for_an_append_that_found_the_wake_up_taken(db: TestDatabase) -> None:
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as arming,
        db.connect() as first,
        db.connect() as silent,
        db.connect(autocommit=True) as reader,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        arm_wakeups(arming)
        append_sql(first, "Credited", {"account": 1, "amount": 1})
        first.commit()  # took the wake-up
        append_sql(silent, "Credited", {"account": 1, "amount": 2})  # silent, and open
        assert notifications(listener) == 1
        with Arming(db) as again:
            # The listener heard the first, and arms again before its runners sleep: that waits
            # for the silent append, so the last read before the sleep sees its event.
            assert not again.done.wait(0.5), "armed while a silent append was open"
            silent.commit()
            assert again.done.wait(5)
            assert reader.execute("SELECT count(*) FROM projectord.events").fetchone() == (2,)
        assert notifications(listener, timeout=0.2) == 0  # silent indeed


def test_an_append_never_waits_long_for_an_open_notifier(db: TestDatabase) -> None:
    """A notifier that stays open (it appended, then does other work) holds the wake-up's row;
    an append that finds it so waits at most a few milliseconds, then notifies on its own."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as arming,
        db.connect() as notifier,
        db.connect() as other,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        arm_wakeups(arming)
        append_sql(notifier, "Credited", {"account": 1, "amount": 1})  # took it, still open
        started = time.monotonic()
        append_sql(other, "Credited", {"account": 2, "amount": 2})
        waited = time.monotonic() - started
        other.commit()
        assert waited < 0.5, f"an append waited {waited:.2f}s for another writer"
        assert notifications(listener) == 1  # its own: the notifier has not committed
        notifier.rollback()


def test_a_listener_of_the_previous_release_hears_every_append(db: TestDatabase) -> None:
    """During a rolling upgrade, a daemon of the release before 0018 arms the old way (0006's
    stripes) and expects a notification from every append while armed."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as old_arming,
        db.connect() as writer,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        old_arming.execute(
            "SELECT count(pg_advisory_lock_shared(hashtext(%s), stripe)::text)"
            " FROM generate_series(0, 63) AS stripe",
            (CHANNEL,),
        )
        for n in range(3):
            append_sql(writer, "Credited", {"account": 1, "amount": n})
            writer.commit()
        assert notifications(listener, timeout=1.0) == 3


def test_concurrent_writers_that_stay_open_or_roll_back_lose_no_wake_up(
    db: TestDatabase, state_dir: Path
) -> None:
    """Rounds of six writers: one appends and commits (taking the wake-up, if the daemon is armed),
    then the five others append at once, each holding its transaction open for a random while, one
    in ten rolling back. After each commit the writer waits for the daemon to apply its event; the
    next round starts once every writer is done, so nothing comes after a round's appends to make
    up for a wake-up it lost. With a 600 s poll, only a wake-up applies an event in time."""
    db.init(SLOW)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}
    failures: list[str] = []
    writers = 6
    barrier = threading.Barrier(writers)

    def write(seed: int) -> None:
        rng = random.Random(seed)
        with db.connect() as writer, db.connect(autocommit=True) as reader:
            for round_ in range(25):
                barrier.wait(timeout=30)
                leads = round_ % writers == seed
                if not leads:
                    barrier.wait(timeout=30)  # the leader has committed
                row = writer.execute(
                    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
                    " VALUES (%s, gen_random_uuid(), 1, 'Slow') RETURNING event_id",
                    (TENANT,),
                ).fetchone()
                assert row is not None
                if leads:
                    writer.commit()
                    barrier.wait(timeout=30)
                else:
                    time.sleep(rng.uniform(0, 0.02))  # open, as a writer doing other work
                    if rng.random() < 0.1:
                        writer.rollback()
                        continue
                    writer.commit()
                committed = time.monotonic()
                while not reader.execute(
                    "SELECT 1 FROM slow_seen WHERE event_id = %s", (row[0],)
                ).fetchone():
                    if time.monotonic() - committed > 2.0:
                        failures.append(f"event {row[0]} not applied 2 s after its commit")
                        barrier.abort()
                        return
                    time.sleep(0.005)

    with DaemonProcess(db.url, SLOW, state_dir, extra_env=env):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        threads = [threading.Thread(target=write, args=(seed,)) for seed in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_two_appends_on_one_stripe_do_not_notify(db: TestDatabase) -> None:
    """Appends pick their stripe by backend pid, so two of them may share one. With no listener
    armed, the second takes another stripe instead of notifying (a busy pool of writers would
    otherwise notify all the time), and arming still waits for it."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect() as other,
        db.connect() as writer,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        # An arming offered a wake-up, and the listener let go of its stripes before an append took
        # it (too soon to arm again): common under load.
        listener.execute("UPDATE projectord.wakeups SET armed = true")
        pid = writer.execute("SELECT pg_backend_pid()").fetchone()
        assert pid is not None
        writer.commit()
        # `other` holds the writer's own stripe, as an append of a backend with the same pid % 64.
        other.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s || '/armed'), %s)", (CHANNEL, pid[0] % 64)
        )
        append_sql(writer, "Credited", {"account": 1, "amount": 1})
        with Arming(db) as armed:
            assert not armed.done.wait(0.5), "armed while a silent append was open"
            writer.commit()
            other.rollback()
            assert armed.done.wait(5)
        assert notifications(listener, timeout=0.2) == 0


def old_release_arming(conn: psycopg.Connection[object]) -> None:
    """Arm as a listener of the release before 0018 does (0006's stripes, in share mode)."""
    conn.execute(
        "SELECT count(pg_advisory_lock_shared(hashtext(%s), stripe)::text)"
        " FROM generate_series(0, 63) AS stripe",
        (CHANNEL,),
    )


def test_a_listener_of_the_previous_release_hears_every_append_while_a_new_one_is_armed(
    db: TestDatabase,
) -> None:
    """A rolling upgrade: a daemon of the new release and one of the previous release run on the
    same database, both armed. The old one expects a notification from every append (0006);
    appends that find the new listener's wake-up taken must not be silent to it (found by
    review)."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as old_arming,
        db.connect(autocommit=True) as new_arming,
        db.connect() as writer,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        arm_wakeups(new_arming)
        old_release_arming(old_arming)
        for n in range(3):
            append_sql(writer, "Credited", {"account": 1, "amount": n})
            writer.commit()
        assert notifications(listener, timeout=1.0) == 3, "the old listener missed appends"


def test_an_old_release_arming_waits_for_appends_silent_under_a_new_listener(
    db: TestDatabase,
) -> None:
    """The same rolling upgrade, the other half of 0006's promise: an old listener's arming waits
    for every append that did not notify, so its runners' last read sees it. An append that is
    silent because the new listener's wake-up was taken must hold the old arming too (found by
    review)."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as new_arming,
        db.connect() as first,
        db.connect() as silent,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        arm_wakeups(new_arming)
        append_sql(first, "Credited", {"account": 1, "amount": 1})
        first.commit()  # took the new listener's wake-up
        assert notifications(listener) == 1
        append_sql(silent, "Credited", {"account": 1, "amount": 2})  # open
        old_armed = threading.Event()

        def arm_old() -> None:
            with db.connect(autocommit=True) as old_arming:
                old_release_arming(old_arming)
                old_armed.set()

        thread = threading.Thread(target=arm_old)
        thread.start()
        try:
            notified = notifications(listener, timeout=0.5)
            # Either the silent append notified (the old listener hears it), or the old arming
            # waits for it to end; otherwise the old runners read, sleep, and it commits unseen.
            assert notified or not old_armed.is_set(), (
                "an old listener armed while a silent append was open, and it did not notify"
            )
        finally:
            silent.commit()
            thread.join(5)


def test_a_writer_cannot_run_code_as_the_trigger_owner_through_a_temporary_type(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    """The append trigger is SECURITY DEFINER. A writer that may only INSERT into events (and,
    as every role by default, create temporary objects) must not make it run the writer's own
    code with the owner's rights: a temporary type is looked up before pg_catalog's unless the
    function pins its search_path (found by review: `outer_timeout text` resolved to a
    temporary domain whose check calls the writer's function)."""
    writer = roles.create("writer", "LOGIN")
    with db.connect(autocommit=True) as admin:
        admin.execute(f'GRANT USAGE ON SCHEMA projectord TO "{writer}"')
        admin.execute(f'GRANT INSERT ON projectord.events TO "{writer}"')
    with (
        db.connect(autocommit=True) as arming,
        psycopg.connect(make_conninfo(db.url, user=writer), autocommit=True) as hostile,
    ):
        arm_wakeups(arming)  # an armed listener: the first append takes the wake-up
        hostile.execute("CREATE TEMP TABLE seen (who text)")
        hostile.execute("GRANT INSERT ON seen TO PUBLIC")
        hostile.execute(
            "CREATE FUNCTION pg_temp.spy(v pg_catalog.text) RETURNS boolean"
            " LANGUAGE sql AS $$ INSERT INTO pg_temp.seen VALUES (current_user) RETURNING true $$"
        )
        hostile.execute("CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.spy(VALUE))")
        try:
            append_sql(hostile, "Credited", {"account": 1, "amount": 1})
        except psycopg.Error:
            pass  # failing its own append is the writer's business; running as owner is not
        who = {row[0] for row in hostile.execute("SELECT who FROM pg_temp.seen").fetchall()}
        assert who <= {writer}, f"the writer's code ran as {who - {writer}}"


def test_appends_waiting_behind_an_open_notifier_never_fail(db: TestDatabase) -> None:
    """Rounds of a notifier that takes the wake-up and stays open 30 ms, while a dozen writers
    append behind it: each waits at most 5 ms for the wake-up's row, then notifies itself. None
    may fail. A lock timeout that fires just as the lock is granted is reported by the server as
    a cancel "due to user request" when the statement waits for a second lock before it
    notices (the tuple lock, then the notifier's transaction): QueryCanceled, which the trigger
    did not catch, so the append failed (found by review: about one append in a thousand here;
    the test runs for 20 s at most and stops at the first failure)."""
    writers = 12
    failures: list[str] = []
    stop = threading.Event()
    start = threading.Barrier(writers + 1)
    done = threading.Barrier(writers + 1)

    def write() -> None:
        with db.connect() as writer:
            while True:
                start.wait(30)
                if stop.is_set():
                    return
                try:
                    append_sql(writer, "Credited", {"account": 1, "amount": 1})
                    writer.commit()
                except psycopg.Error as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    writer.rollback()
                done.wait(30)

    with db.connect(autocommit=True) as arming, db.connect() as notifier:
        arm_wakeups(arming)
        threads = [threading.Thread(target=write) for _ in range(writers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline and not failures:
                arming.execute(QUERIES["offer_wakeup"])  # the listener arms again
                append_sql(notifier, "Credited", {"account": 1, "amount": 1})  # takes it
                start.wait(30)
                time.sleep(0.03)  # open, as a notifier doing other work after its append
                notifier.commit()
                done.wait(30)
        finally:
            stop.set()
            start.wait(30)
            for thread in threads:
                thread.join()
    assert failures == [], f"{len(failures)} appends failed, the first: {failures[0]}"


def test_savepoints_rolled_back_to_after_the_trigger_lose_no_wake_up(db: TestDatabase) -> None:
    """ROLLBACK TO SAVEPOINT after the trigger ran undoes its UPDATE of `wakeups` and its
    NOTIFY, and (on PostgreSQL 15) releases the advisory locks it took in the subtransaction;
    the events of that subtransaction go with them. Whatever a writer does with savepoints, the
    wake-up of an event that commits is not lost (checked by review: these held)."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as arming,
        db.connect() as writer,
        db.connect() as other,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        arm_wakeups(arming)
        # The wake-up taken inside a savepoint rolled back to: it is offered again.
        writer.execute("SAVEPOINT s")
        append_sql(writer, "Credited", {"account": 1, "amount": 1})
        writer.execute("ROLLBACK TO SAVEPOINT s")
        writer.commit()
        assert notifications(listener, timeout=0.2) == 0  # nothing committed, nothing sent
        assert db.scalar("SELECT armed FROM projectord.wakeups") is True
        append_sql(other, "Credited", {"account": 1, "amount": 2})
        other.commit()
        assert notifications(listener) == 1

        # Taken at the top level, then a silent append in a savepoint rolled back to: the
        # top-level notification stays.
        arm_wakeups(arming)
        append_sql(writer, "Credited", {"account": 1, "amount": 3})
        writer.execute("SAVEPOINT s")
        append_sql(writer, "Credited", {"account": 1, "amount": 4})
        writer.execute("ROLLBACK TO SAVEPOINT s")
        writer.commit()
        assert notifications(listener) == 1

        # Taken in a released savepoint, then another savepoint rolled back to.
        arm_wakeups(arming)
        writer.execute("SAVEPOINT a")
        append_sql(writer, "Credited", {"account": 1, "amount": 5})
        writer.execute("RELEASE SAVEPOINT a")
        writer.execute("SAVEPOINT b")
        append_sql(writer, "Credited", {"account": 1, "amount": 6})
        writer.execute("ROLLBACK TO SAVEPOINT b")
        writer.commit()
        assert notifications(listener) == 1

        # A silent append at the top level (the wake-up taken by a committed append), then the
        # listener arms again: it waits for the writer even though the writer's later append,
        # in a savepoint rolled back to, took and gave back the new wake-up (and its locks).
        arm_wakeups(arming)
        append_sql(other, "Credited", {"account": 2, "amount": 1})
        other.commit()
        assert notifications(listener) == 1
        append_sql(writer, "Credited", {"account": 2, "amount": 2})  # silent, open
        again = Arming(db)
        with again:
            assert not again.done.wait(0.3), "armed while a silent append was open"
            writer.execute("SAVEPOINT s")
            append_sql(writer, "Credited", {"account": 2, "amount": 3})
            writer.execute("ROLLBACK TO SAVEPOINT s")
            assert not again.done.wait(0.3), "armed while a silent append was open"
            writer.commit()
            assert again.done.wait(5)
            # The runners' last read, now, sees the silent append's event; the wake-up is offered.
            assert db.scalar("SELECT count(*) FROM projectord.events") == 5
            assert db.scalar("SELECT armed FROM projectord.wakeups") is True


def test_copy_and_exception_blocks_wake_the_listener(db: TestDatabase) -> None:
    """COPY fires the statement trigger as INSERT does; an append inside a PL/pgSQL block whose
    exception handler rolls it back gives the wake-up back (checked by review: these held)."""
    with (
        db.connect(autocommit=True) as listener,
        db.connect(autocommit=True) as arming,
        db.connect() as writer,
    ):
        listener.execute(f'LISTEN "{CHANNEL}"')
        arm_wakeups(arming)
        writer.execute(
            "DO $$ BEGIN"
            " INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            f" VALUES ('{TENANT}', gen_random_uuid(), 1, 'Credited');"
            " RAISE EXCEPTION 'undo';"
            " EXCEPTION WHEN raise_exception THEN NULL; END $$"
        )
        writer.commit()
        assert notifications(listener, timeout=0.2) == 0
        with writer.cursor().copy(
            "COPY projectord.events (tenant_id, aggregate_id, version, type) FROM STDIN"
        ) as copy:
            copy.write_row((TENANT, uuid.uuid4(), 1, "Credited"))
        writer.commit()
        assert notifications(listener) == 1


def test_an_arming_that_times_out_leaves_no_stripe_held(db: TestDatabase) -> None:
    """An arming waits 200 ms at most for a writer that holds its ARMED stripe. When it gives up,
    the listener must hold none of the stripes it took before that one: they are session locks,
    which the failed statement does not release, and the listener believes it holds nothing, so
    it does not release them either (found by review). Held, they make appends of those stripes
    behave as if it were armed (they take the wake-up the timed-out arming offered, and notify)
    and `armed_listeners` report an armed listener that is not."""
    with contextlib.ExitStack() as connections:
        writer = connections.enter_context(db.connect())
        while writer.execute("SELECT pg_backend_pid() % 64").fetchone() == (0,):
            # Stripe 0: no stripe before it to leak; take another connection.
            writer = connections.enter_context(db.connect())
        append_sql(writer, "Credited", {"account": 1, "amount": 1})  # no listener armed: silent

        async def main() -> tuple[bool, int]:
            listener = NotificationListener(db.url, "projectord", lambda: None, poll_interval=3600)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listener.run)
                with anyio.fail_after(10):
                    while not listener.connected:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    listener.request_arm()
                    while listener._next_arm_at == 0.0:  # noqa: ASYNC110 - the arming ended
                        await anyio.sleep(0.01)
                held = await anyio.to_thread.run_sync(
                    lambda: db.scalar(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND mode = 'ShareLock' AND classid = hashtext(%s || '/armed')::oid",
                        (CHANNEL,),
                    )
                )
                armed = listener.armed
                tasks.cancel_scope.cancel()
            return armed, held

        armed, held = anyio.run(main)
        writer.rollback()
    assert not armed, "armed while a writer that did not notify was open"
    assert held == 0, f"the listener is not armed but holds {held} ARMED stripes"


class Sluggish(Projection):
    """Every batch takes at least SLUGGISH_BATCH seconds: writers that keep appending then always
    leave it something to read, however fast or slow the machine is."""

    name = "sluggish"
    event_types = ("Sluggish",)
    tables = {"sluggish_seen": Table({"event_id": "uuid PRIMARY KEY"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO sluggish_seen SELECT unnest(%s::uuid[])", ([e.event_id for e in events],)
        )
        await anyio.sleep(SLUGGISH_BATCH)


SLUGGISH_BATCH = 0.03
SLUGGISH = "tests.integration.test_wakeup_arming:sluggish_only"
sluggish_only = [Sluggish]


def test_busy_writers_are_not_asked_to_notify(db: TestDatabase, state_dir: Path) -> None:
    """While every read of the runner finds events, it reads again soon by itself: the listener
    is not armed again, and the writers' appends stay silent (every notifying commit flushes
    alone). Before, the runner asked for an arming after every batch, and one append notified
    per arming: about one every ARM_PAUSE. Nothing is lost meanwhile, and once the writers stop
    the listener arms again."""
    db.init(SLUGGISH)
    env = {"PROJECTORD_POLL_INTERVAL": "600"}  # only wake-ups and the runner's own reads
    stop = threading.Event()
    appended = [0] * 4

    def write(slot: int) -> None:
        with db.connect(autocommit=True) as writer:
            while not stop.is_set():
                append_sql(writer, "Sluggish", {})
                appended[slot] += 1

    with (
        DaemonProcess(db.url, SLUGGISH, state_dir, extra_env=env),
        db.connect(autocommit=True) as listener,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)  # idle: armed
        listener.execute(f'LISTEN "{CHANNEL}"')
        writers = [threading.Thread(target=write, args=(slot,)) for slot in range(4)]
        for thread in writers:
            thread.start()
        try:
            time.sleep(3.0)  # the length of the measurement, not a synchronisation
        finally:
            stop.set()
            for thread in writers:
                thread.join()
        heard = [n for n in listener.notifies(timeout=0.2) if n.payload != "probe"]
        # One for the arming the writers found, maybe one more for an arming made at once
        # after it (appends were rare until then); old code: about 3 s / ARM_PAUSE[1] = 75.
        assert len(heard) <= 5, f"{len(heard)} appends notified while the runner was busy"
        total = sum(appended)
        assert total * SLUGGISH_BATCH > 3.0, "the writers were too slow to keep the runner busy"
        wait_until(lambda: db.scalar("SELECT count(*) FROM sluggish_seen") == total, timeout=60)
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)  # idle again: armed
