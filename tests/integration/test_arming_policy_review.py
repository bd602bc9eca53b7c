"""A hostile review of the arming policy of fix/perf (who asks the listener to arm, and when).

Runners no longer ask for an arming after a read that brought events, and the listener no longer
re-arms by itself after a wake-up taken at once: busy writers should not be asked to notify. The
invariant that must survive: a runner sleeps long only after a read begun while the listener was
armed, so with PROJECTORD_POLL_INTERVAL at 600 s only wake-ups and the runners' own short polls
apply events; and once the writers stop, the daemon ends up armed and asleep (a daemon left
disarmed polls every few milliseconds forever).

Tests marked xfail(strict) show what the review found broken; the others are suspicions that held.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.queries import Queries
from tests.support.harness import DaemonProcess, TestDatabase, append_sql, wait_until
from tests.support.ops_support import ask

QUERIES = Queries("projectord")
CHANNEL = "projectord_projectord"
POLL_600 = {"PROJECTORD_POLL_INTERVAL": "600"}  # only wake-ups and the runners' own polls
BUSY_BATCH = 0.03  # every busy batch takes this long: four writers always outrun it
MODULE = "tests.integration.test_arming_policy_review"


class Busy(Projection):
    name = "rev_busy"
    event_types = ("RevBusy",)
    tables = {"rev_busy_seen": Table({"event_id": "uuid PRIMARY KEY"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO rev_busy_seen SELECT unnest(%s::uuid[])", ([e.event_id for e in events],)
        )
        await anyio.sleep(BUSY_BATCH)


class Quiet(Projection):
    name = "rev_quiet"
    event_types = ("RevQuiet",)
    tables = {"rev_quiet_seen": Table({"event_id": "uuid PRIMARY KEY"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO rev_quiet_seen SELECT unnest(%s::uuid[])", ([e.event_id for e in events],)
        )


class Idle(Projection):
    """Nobody appends its type: its reads never find anything of its own."""

    name = "rev_idle"
    event_types = ("RevIdle",)
    tables = {"rev_idle_seen": Table({"event_id": "uuid PRIMARY KEY"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        raise AssertionError("no RevIdle event is ever appended")


busy_only = [Busy]
busy_and_idle = [Busy, Idle]
busy_quiet_idle = [Busy, Quiet, Idle]
BUSY_ONLY = f"{MODULE}:busy_only"
BUSY_AND_IDLE = f"{MODULE}:busy_and_idle"
BUSY_QUIET_IDLE = f"{MODULE}:busy_quiet_idle"


def armed_listeners(db: TestDatabase) -> int:
    return db.scalar(QUERIES["armed_listeners"], {"channel": CHANNEL})


def wakeup_offered(db: TestDatabase) -> bool:
    return db.scalar("SELECT armed FROM projectord.wakeups")


def applied(db: TestDatabase, table: str) -> int:
    return db.scalar(f"SELECT count(*) FROM {table}")


def appended(db: TestDatabase, type_: str) -> int:
    return db.scalar("SELECT count(*) FROM projectord.events WHERE type = %s", (type_,))


class BusyWriters:
    """Writers that append as fast as they can, each append its own transaction."""

    def __init__(
        self,
        db: TestDatabase,
        count: int = 4,
        *,
        isolation: str | None = None,
        pace: float = 0.0,
    ) -> None:
        self.db = db
        self.isolation = isolation
        self.pace = pace  # seconds between one writer's appends: shapes the load
        self.stop = threading.Event()
        self.appended = [0] * count
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._write, args=(n,)) for n in range(count)]

    def _write(self, slot: int) -> None:
        try:
            with self.db.connect(autocommit=True) as writer:
                if self.isolation:
                    writer.execute(f"SET default_transaction_isolation = '{self.isolation}'")
                while not self.stop.is_set():
                    append_sql(writer, "RevBusy", {})
                    self.appended[slot] += 1
                    if self.pace:
                        self.stop.wait(self.pace)
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.errors.append(exc)

    def __enter__(self) -> BusyWriters:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        assert not self.errors, self.errors

    @property
    def total(self) -> int:
        return sum(self.appended)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(daemon: DaemonProcess, seconds: float = 2.0) -> float:
    """The daemon's CPU share over `seconds` (a measurement, not a synchronisation)."""
    before = cpu_seconds(daemon.process.pid)
    time.sleep(seconds)
    return (cpu_seconds(daemon.process.pid) - before) / seconds


def settles_armed_and_asleep(daemon: DaemonProcess, db: TestDatabase) -> None:
    """The end state after any load: armed, and an idle daemon costs next to nothing."""
    wait_until(lambda: armed_listeners(db) == 1 and wakeup_offered(db), timeout=10)
    share = idle_cpu(daemon)
    assert share < 0.05, f"an idle daemon after the load uses {share:.0%} of a core"
    assert armed_listeners(db) == 1 and wakeup_offered(db), "disarmed again while idle"


def applies_promptly(db: TestDatabase, type_: str, table: str, timeout: float = 2.0) -> float:
    """Append one event now: with a 600 s poll only a wake-up applies it within `timeout`."""
    before = applied(db, table)
    with db.connect(autocommit=True) as writer:
        append_sql(writer, type_, {})
    return wait_until(lambda: applied(db, table) == before + 1, timeout=timeout)


@contextmanager
def listening(db: TestDatabase) -> Iterator[psycopg.Connection[Any]]:
    with db.connect(autocommit=True) as conn:
        conn.execute(f'LISTEN "{CHANNEL}"')
        yield conn


def heard(listener: psycopg.Connection[Any]) -> int:
    return sum(n.payload != "probe" for n in listener.notifies(timeout=0.2))


def sample(seconds: float, probe: Callable[[], bool], interval: float = 0.02) -> float:
    """The share of samples over `seconds` for which `probe` held (a measurement)."""
    hits = total = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hits += probe()
        total += 1
        time.sleep(interval)
    return hits / total


# -- the stripes while busy writers keep the listener disarmed ---------------------------------


def test_busy_writers_do_not_find_the_stripes_held_for_nothing(
    db: TestDatabase, state_dir: Path
) -> None:
    """listener.py: between two armings the listener lets go of its stripes; held without a
    wake-up on offer they cost every append, and announce nothing."""
    db.init(BUSY_ONLY)
    with DaemonProcess(db.url, BUSY_ONLY, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db) as writers:
            time.sleep(0.5)  # let the load start (a measurement follows, not a synchronisation)
            held_for_nothing = sample(
                2.0, lambda: armed_listeners(db) == 1 and not wakeup_offered(db)
            )
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
    assert held_for_nothing < 0.5, (
        f"the listener held its ARMED stripes, no wake-up offered, {held_for_nothing:.0%} of"
        " the time the writers were busy"
    )


def test_busy_repeatable_read_writers_are_not_asked_to_notify(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(BUSY_ONLY)
    with (
        DaemonProcess(db.url, BUSY_ONLY, state_dir, extra_env=POLL_600) as daemon,
        listening(db) as listener,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db, isolation="repeatable read") as writers:
            time.sleep(3.0)  # the length of the measurement
        notified = heard(listener)
        assert writers.total * BUSY_BATCH > 3.0, "the writers were too slow to keep it busy"
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
    # Read committed writers: at most a handful in 3 s (test_wakeup_arming.py); before the
    # change, about one in ten of these (the listener let go of its stripes on each wake-up);
    # with it, every one.
    assert notified <= writers.total // 4, f"{notified} of {writers.total} appends notified"


# Not strict: on a loaded machine the writer's appends bunch up, batches gather BUSY_BATCH events
# or more and the runner notes busy writers after all, so the test can pass there (it did once in a
# parallel run). The limit itself is measured by benchmarks/write_cost.py's paced run.
@pytest.mark.xfail(
    strict=False,
    reason=(
        "found by review, a known limit (docs/performance.md): below BUSY_BATCH events a "
        "batch the runner does not note busy writers, and the listener re-arms after each "
        "wake-up taken after QUICK_TAKE: a writer every 10 ms against 30 ms batches (about 3 "
        "events each) still has about 1 append in 5 notify (61 of 283; 9 in 10 on 2ef0b8c). "
        "A lower BUSY_BATCH would cost rare appends their wake-ups (live latency at 200 tx/s)"
    ),
)
def test_steady_writers_keeping_the_runner_busy_are_not_asked_to_notify(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(BUSY_ONLY)
    with (
        DaemonProcess(db.url, BUSY_ONLY, state_dir, extra_env=POLL_600) as daemon,
        listening(db) as listener,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db, count=1, pace=0.01) as writers:
            time.sleep(3.0)  # the length of the measurement
        notified = heard(listener)
        # Every 30 ms batch finds the ~6 appends made while the last one ran: busy throughout.
        assert writers.total * BUSY_BATCH > 3.0, "the writer was too slow to keep it busy"
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
    assert notified <= writers.total // 10, f"{notified} of {writers.total} appends notified"


# -- several projections -----------------------------------------------------------------------


def test_an_idle_projection_does_not_bring_the_notifications_back(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(BUSY_AND_IDLE)
    with (
        DaemonProcess(db.url, BUSY_AND_IDLE, state_dir, extra_env=POLL_600) as daemon,
        listening(db) as listener,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db) as writers:
            time.sleep(3.0)  # the length of the measurement
        notified = heard(listener)
        assert writers.total * BUSY_BATCH > 3.0, "the writers were too slow to keep it busy"
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
    # As test_busy_writers_are_not_asked_to_notify allows for the busy projection alone.
    # An arming every ARM_PAUSE would be about 75 in 3 s (69-70 before the review's fixes); a
    # few slip through when a batch of the busy runner takes more than twice its last cycle
    # on a loaded machine.
    assert notified <= 15, f"{notified} appends notified while the busy runner was busy"


def test_a_quiet_projection_in_a_busy_store_is_applied_by_wake_ups(
    db: TestDatabase, state_dir: Path
) -> None:
    """The quiet runner's reads find nothing of its own (or others' events held back): it asks
    for armings and is woken; its events never wait for the 600 s poll, nor does the busy
    projection fall behind for good, and the daemon ends armed and asleep."""
    db.init(BUSY_QUIET_IDLE)
    with DaemonProcess(db.url, BUSY_QUIET_IDLE, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        latencies = []
        with BusyWriters(db) as writers:
            for _ in range(10):
                latencies.append(applies_promptly(db, "RevQuiet", "rev_quiet_seen", timeout=3))
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevBusy", "rev_busy_seen")
        applies_promptly(db, "RevQuiet", "rev_quiet_seen")
    assert max(latencies) < 1.0, f"a quiet event waited {max(latencies):.2f} s"


def test_after_a_burst_the_daemon_ends_armed_and_asleep(db: TestDatabase, state_dir: Path) -> None:
    """Bursts of busy writers, each ended abruptly: every time, everything is applied without the
    poll, the listener is armed again and the daemon is idle (no runner left polling)."""
    db.init(BUSY_ONLY)
    with DaemonProcess(db.url, BUSY_ONLY, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        for burst in (0.05, 0.3, 1.0):
            with BusyWriters(db) as writers:
                time.sleep(burst)  # the length of the burst
            total = appended(db, "RevBusy")
            assert writers.total > 0
            wait_until(lambda total=total: applied(db, "rev_busy_seen") == total, timeout=60)
            settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevBusy", "rev_busy_seen")


# -- held-back events behind a long transaction ------------------------------------------------


def test_events_held_back_by_a_long_transaction_under_load(
    db: TestDatabase, state_dir: Path
) -> None:
    """A transaction appends, stays open while the writers keep the runner busy (the runner
    finds events held back right after batches that brought some, so does not ask), and
    commits after they stop: its event and all behind it are applied by the runner's own
    polls, and the daemon re-arms once it ends."""
    db.init(BUSY_QUIET_IDLE)
    with (
        DaemonProcess(db.url, BUSY_QUIET_IDLE, state_dir, extra_env=POLL_600) as daemon,
        db.connect() as long,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db) as writers:
            time.sleep(0.3)
            append_sql(long, "RevBusy", {})
            append_sql(long, "RevQuiet", {})
            time.sleep(1.0)  # the open transaction holds the others back while they write
        # Writers gone, the long one still open: the runner finds events held back, asks, and
        # every arming times out on the open transaction; that costs next to nothing.
        share = idle_cpu(daemon)
        assert share < 0.1, f"held back behind an open transaction, the daemon uses {share:.0%}"
        long.commit()
        elapsed = wait_until(
            lambda: (
                applied(db, "rev_busy_seen") == writers.total + 1
                and applied(db, "rev_quiet_seen") == 1
            ),
            timeout=5,
        )
        assert elapsed < 2.0, f"the held-back events took {elapsed:.2f} s after the commit"
        settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevQuiet", "rev_quiet_seen")


LISTENER_WAITS_FOR_SILENT_APPENDS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND application_name = 'projectord' AND wait_event_type = 'Lock'"
    " AND query ILIKE '%%pg_advisory_unlock_shared(hashtext%%'"
)


# In an appending transaction: did this transaction take the wake-up (update `wakeups`)?
TOOK = "SELECT xmin::text = pg_current_xact_id()::text FROM projectord.wakeups"


def silent_append(db: TestDatabase, conn: psycopg.Connection[Any]) -> bool:
    append_sql(conn, "RevQuiet", {})
    kind = db.scalar(
        "SELECT CASE classid WHEN hashtext(%(c)s || '/silent')::oid THEN 'silent' END"
        " FROM pg_locks WHERE locktype = 'advisory' AND pid = %(pid)s AND mode = 'ExclusiveLock'"
        " AND classid IN (hashtext(%(c)s || '/silent')::oid, hashtext(%(c)s || '/armed')::oid)"
        " ORDER BY 1 LIMIT 1",
        {"c": CHANNEL, "pid": conn.info.backend_pid},
    )
    if kind == "silent" and conn.execute(TOOK).fetchone() == (False,):
        return True
    conn.rollback()  # not silent, or it took the wake-up itself: another try
    return False


def took_the_wake_up(db: TestDatabase, conn: psycopg.Connection[Any]) -> bool:
    """Once the listener waits for the silent append, append: true if this one took the
    offered wake-up (else it is rolled back, for another try)."""
    if db.scalar(LISTENER_WAITS_FOR_SILENT_APPENDS) != 1:
        return False
    append_sql(conn, "RevQuiet", {})
    if conn.execute(TOOK).fetchone() == (True,):
        return True
    conn.rollback()
    return False


def silent_after_a_take(db: TestDatabase, conn: psycopg.Connection[Any]) -> bool:
    """An append takes the offered wake-up and commits; right after it, while the listener has
    not offered the next one yet, `conn` appends: true if it stayed silent (see silent_append)."""
    with db.connect(autocommit=True) as taker:
        append_sql(taker, "RevQuiet", {})
    return silent_append(db, conn)


def test_a_wake_up_taken_during_an_arming_that_completes(db: TestDatabase, state_dir: Path) -> None:
    """The listener does not re-arm by itself after an arming during which an append took the
    wake-up: the runners must ask. Set it up: right after an append took the wake-up, another
    appends while the listener holds its stripes and offers none (it takes a SILENT stripe) and
    stays open; the listener's next arming waits for that transaction; meanwhile another append
    takes the offered wake-up (heard during the arming); then the open one commits and the arming
    ends, not counted. Every event is applied without the poll, and the daemon ends armed.
    (Until the review's fixes busy writers set this up; the listener now lets go of its stripes
    while they are busy, so a wake-up just taken is the way.)"""
    db.init(BUSY_QUIET_IDLE)
    with (
        DaemonProcess(db.url, BUSY_QUIET_IDLE, state_dir, extra_env=POLL_600) as daemon,
        db.connect() as silent,
        listening(db) as listener,
    ):
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        wait_until(lambda: silent_after_a_take(db, silent), timeout=20, interval=0.05)
        list(listener.notifies(timeout=0.1))
        with db.connect() as taker:
            wait_until(lambda: took_the_wake_up(db, taker), timeout=10)
            taker.commit()  # notifies
            silent.commit()  # the arming completes (its lock_timeout is 200 ms)
        assert heard(listener) >= 1, "the wake-up was not taken during the arming"
        elapsed = wait_until(
            lambda: applied(db, "rev_quiet_seen") == appended(db, "RevQuiet"), timeout=5
        )
        assert elapsed < 1.0, f"the quiet events took {elapsed:.2f} s"
        settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevQuiet", "rev_quiet_seen")


# -- listener reconnects during load -----------------------------------------------------------

LISTENER_BACKEND = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name = 'projectord'"
    " AND (query ILIKE 'LISTEN%%'"
    "      OR query ILIKE '%%pg_advisory_lock_shared(hashtext%%'"
    "      OR query ILIKE '%%pg_advisory_unlock_all%%'"
    "      OR query ILIKE '%%pg_advisory_unlock_shared(hashtext%%'"
    "      OR query ILIKE '%%pg_notify%%'"
    "      OR query ILIKE '%%wakeups SET armed = true%%'"
    "      OR query ILIKE '%%pg_current_snapshot())::text::bigint AS horizon%%')"
)


def test_listener_terminated_during_load_rearms_once_writers_stop(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(BUSY_QUIET_IDLE)
    with DaemonProcess(db.url, BUSY_QUIET_IDLE, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db) as writers:
            for _ in range(4):
                time.sleep(0.3)
                # The listener may still be reconnecting from the last one: until it is back.
                wait_until(lambda: db.scalar(LISTENER_BACKEND) == 1, timeout=10)
        wait_until(
            lambda: sum(e["event"] == "listener.reconnected" for e in daemon.log_events()) >= 4,
            timeout=20,
        )
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevBusy", "rev_busy_seen")
        applies_promptly(db, "RevQuiet", "rev_quiet_seen")


def test_listener_terminated_as_the_writers_stop(db: TestDatabase, state_dir: Path) -> None:
    """The connection is lost just as the load ends: requests made while it is away are
    ignored, so the runners must keep asking until one is heard."""
    db.init(BUSY_ONLY)
    with DaemonProcess(db.url, BUSY_ONLY, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        for round_ in range(3):
            with BusyWriters(db) as writers:
                time.sleep(0.5)
            wait_until(lambda: db.scalar(LISTENER_BACKEND) == 1, timeout=10)
            total = appended(db, "RevBusy")
            assert writers.total > 0
            wait_until(lambda total=total: applied(db, "rev_busy_seen") == total, timeout=60)
            wait_until(
                lambda r=round_: (
                    sum(e["event"] == "listener.reconnected" for e in daemon.log_events()) > r
                ),
                timeout=20,
            )
            settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevBusy", "rev_busy_seen")


# -- pause and resume --------------------------------------------------------------------------


def test_pausing_the_busy_projection_under_load(db: TestDatabase, state_dir: Path) -> None:
    """Paused, the busy runner neither reads nor asks: the others must keep the daemon armed
    and asleep, and a resume after the load catches up and re-arms."""
    db.init(BUSY_QUIET_IDLE)
    with DaemonProcess(db.url, BUSY_QUIET_IDLE, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db) as writers:
            time.sleep(0.5)
            ask(state_dir, "pause", name="rev_busy")
            time.sleep(0.5)
            applies_promptly(db, "RevQuiet", "rev_quiet_seen")
        paused_at = applied(db, "rev_busy_seen")
        assert paused_at < writers.total
        settles_armed_and_asleep(daemon, db)
        ask(state_dir, "resume", name="rev_busy")
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevBusy", "rev_busy_seen")


def test_everything_paused_under_load_then_resumed(db: TestDatabase, state_dir: Path) -> None:
    """With its only projection paused during the load, nobody asks the listener to arm: that is
    fine while paused (nothing to wake), but the resume must bring it back to armed."""
    db.init(BUSY_ONLY)
    with DaemonProcess(db.url, BUSY_ONLY, state_dir, extra_env=POLL_600) as daemon:
        wait_until(lambda: armed_listeners(db) == 1, timeout=10)
        with BusyWriters(db) as writers:
            time.sleep(0.5)
            ask(state_dir, "pause", name="rev_busy")
            time.sleep(0.5)
        share = idle_cpu(daemon)
        assert share < 0.05, f"a daemon whose only projection is paused uses {share:.0%}"
        ask(state_dir, "resume", name="rev_busy")
        wait_until(lambda: applied(db, "rev_busy_seen") == writers.total, timeout=60)
        settles_armed_and_asleep(daemon, db)
        applies_promptly(db, "RevBusy", "rev_busy_seen")
