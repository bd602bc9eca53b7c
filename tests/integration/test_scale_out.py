"""Several daemons on one database: ownership spreads, survives kill -9 and lost connections, and
no projection is ever applied by two instances at once.

The proof is in the data. Every `Ledger` copy logs each event it applies with the instance that
applied it and the time (tests/support/projections.py). Each daemon logs when it took and gave up
each
projection (`ownership.acquired` / `.released` / `.lost`), and the test notes when it killed one.
Then, per projection: the ownership periods of the instances never overlap, and every run of
events applied by one instance (in commit order) lies inside one of that instance's periods.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from tests.support.fault_projections import LEDGER_COPIES
from tests.support.harness import (
    PROJECTION_LOCK_HOLDERS,
    DaemonProcess,
    TestDatabase,
    Writers,
    append_sql,
    wait_until,
)
from tests.support.ops_support import ask

SPECS = "tests.support.fault_projections:ledgers"
NAMES = [f"ledger_{n}" for n in range(1, LEDGER_COPIES + 1)]
FAR_FUTURE = datetime.max.replace(tzinfo=UTC)

Period = tuple[str, datetime, datetime]  # (instance, start, end)


class Fleet:
    """Daemons in slots; each start is a new instance `d<slot>.<generation>`."""

    def __init__(self, db: TestDatabase, root: Path) -> None:
        self.db = db
        self.root = root
        self.running: dict[int, tuple[str, DaemonProcess]] = {}
        self.all: list[tuple[str, DaemonProcess]] = []
        self.killed_at: dict[str, datetime] = {}
        self.generation = 0

    def start(self, slot: int) -> str:
        self.generation += 1
        name = f"d{slot}.{self.generation}"
        state_dir = self.root / name
        state_dir.mkdir()
        env = {"PROJECTORD_INSTANCE_NAME": name, "TEST_INSTANCE": name}
        daemon = DaemonProcess(self.db.url, SPECS, state_dir, extra_env=env)
        self.running[slot] = (name, daemon)
        self.all.append((name, daemon))
        return name

    def kill(self, slot: int) -> str:
        name, daemon = self.running.pop(slot)
        self.killed_at[name] = datetime.now(UTC)  # before the kill: no apply can come later
        daemon.kill()
        return name

    def state_dir(self, slot: int) -> Path:
        return self.root / self.running[slot][0]

    def stop_all(self) -> None:
        for _, daemon in self.running.values():
            assert daemon.stop() == 0
        self.running.clear()

    def kill_all(self) -> None:
        for _, daemon in self.all:
            if daemon.process.poll() is None:
                daemon.kill()

    def periods(self) -> dict[str, list[Period]]:
        """Per projection, each instance's ownership periods, from the daemons' own logs."""
        found: dict[str, list[Period]] = defaultdict(list)
        for name, daemon in self.all:
            open_since: dict[str, datetime] = {}
            for event in daemon.log_events():
                kind, at = event.get("event"), _time(event.get("timestamp"))
                if kind == "ownership.acquired":
                    open_since[event["projection"]] = at
                elif kind == "ownership.released":
                    found[event["projection"]].append(
                        (name, open_since.pop(event["projection"]), at)
                    )
                elif kind == "ownership.lost":
                    for projection in event["projections"]:
                        found[projection].append((name, open_since.pop(projection), at))
            end = self.killed_at.get(name, FAR_FUTURE)
            for projection, start in open_since.items():
                found[projection].append((name, start, end))
        return found


def _time(stamp: str | None) -> datetime:
    return datetime.fromisoformat(stamp) if stamp else datetime.min.replace(tzinfo=UTC)


def owners(db: TestDatabase) -> dict[str, str]:
    return dict(db.rows("SELECT name, owner FROM projectord.projection_positions"))


def events_total(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM projectord.events")


def applied(db: TestDatabase) -> dict[str, int]:
    counts = dict(db.rows("SELECT projection, count(*) FROM applied_log GROUP BY projection"))
    return {name: counts.get(name, 0) for name in NAMES}


def all_caught_up(db: TestDatabase) -> bool:
    total = events_total(db)
    return all(count == total for count in applied(db).values())


def assert_exact_and_once(db: TestDatabase) -> None:
    """Every projection applied every event exactly once, and its totals equal the fold."""
    fold = db.rows(
        "SELECT (payload->>'account')::bigint, sum((payload->>'amount')::bigint), count(*)"
        " FROM projectord.events GROUP BY 1 ORDER BY 1"
    )
    for name in NAMES:
        assert (
            db.scalar(
                "SELECT count(*) FROM (SELECT event_id FROM applied_log WHERE projection = %s"
                " GROUP BY event_id HAVING count(*) > 1) twice",
                (name,),
            )
            == 0
        ), f"{name} applied an event twice"
        assert (
            db.scalar(
                "SELECT count(*) FROM projectord.events e WHERE NOT EXISTS (SELECT 1 FROM"
                " applied_log a WHERE a.projection = %s AND a.event_id = e.event_id)",
                (name,),
            )
            == 0
        ), f"{name} never applied an event"
        totals = db.rows(f'SELECT account, total, events FROM "{name}" ORDER BY account')
        assert totals == fold, f"{name} differs from the fold of the events"


def runs(db: TestDatabase) -> dict[str, list[tuple[str, datetime, datetime]]]:
    """Per projection, the runs of consecutive events (in commit order) one instance applied:
    (instance, first applied at, last applied at)."""
    rows = db.rows(
        """
        SELECT projection, instance, min(applied_at), max(applied_at)
        FROM (
            SELECT a.projection, a.instance, a.applied_at, e.transaction_id, e.global_position,
                   row_number() OVER (PARTITION BY a.projection
                                      ORDER BY e.transaction_id, e.global_position)
                 - row_number() OVER (PARTITION BY a.projection, a.instance
                                      ORDER BY e.transaction_id, e.global_position) AS run
            FROM applied_log a JOIN projectord.events e USING (event_id)
        ) t
        GROUP BY projection, instance, run
        ORDER BY projection, min(transaction_id::text::bigint), min(global_position)
        """
    )
    found: dict[str, list[tuple[str, datetime, datetime]]] = defaultdict(list)
    for projection, instance, first, last in rows:
        found[projection].append((instance, first, last))
    return found


def assert_periods_disjoint(fleet: Fleet) -> None:
    """No projection was owned by two instances at once. (When a session is cut from the server
    side, the instance logs `ownership.lost` only once it notices, possibly after another took
    over; the compare-and-set on the owner guards that moment, so this holds for kills.)"""
    for name, periods in fleet.periods().items():
        ordered = sorted(periods, key=lambda p: p[1])
        for before, after in itertools.pairwise(ordered):
            assert before[2] <= after[1], f"{name} owned twice at once: {before} {after}"


def _merged(periods: list[Period]) -> list[Period]:
    """Consecutive periods of one instance (it gave a projection up and took it back before
    anyone else did) as one: a run of its events may span the gap."""
    merged: list[Period] = []
    for period in periods:
        if merged and merged[-1][0] == period[0]:
            merged[-1] = (period[0], merged[-1][1], period[2])
        else:
            merged.append(period)
    return merged


def _until_taken_over(periods: list[Period], killed_at: dict[str, datetime]) -> list[Period]:
    """A killed instance's period lasts until the next owner took over, not until the kill: a
    batch whose statements and COMMIT were already sent (pipeline mode) still commits when the
    server reads them, after the process is gone. That is safe: it commits only while the
    positions row still names the killed instance (the compare-and-set), so before the next
    owner's first batch, which the interleaving check below verifies."""
    extended: list[Period] = []
    for i, (who, start, end) in enumerate(periods):
        if killed_at.get(who) == end:
            end = periods[i + 1][1] if i + 1 < len(periods) else FAR_FUTURE
        extended.append((who, start, end))
    return extended


def assert_one_instance_at_a_time(db: TestDatabase, fleet: Fleet) -> dict[str, int]:
    """Each run of events one instance applied lies inside one of its ownership periods, and
    the runs follow each other in time: no two instances applied a projection at once."""
    periods = fleet.periods()
    applied_runs = runs(db)
    for name in NAMES:
        ordered = _merged(
            _until_taken_over(sorted(periods[name], key=lambda p: p[1]), fleet.killed_at)
        )
        for instance, first, last in applied_runs[name]:
            assert any(
                who == instance and start <= first and last <= end for who, start, end in ordered
            ), f"{name}: {instance} applied {first}..{last} outside its ownership {ordered}"
        for earlier, later in itertools.pairwise(applied_runs[name]):
            assert earlier[2] < later[1], f"{name}: runs interleave in time: {earlier} {later}"
    return {name: len(applied_runs[name]) for name in NAMES}


def test_three_daemons_with_kill_9_and_restarts(db: TestDatabase, tmp_path: Path) -> None:
    db.init(SPECS)
    fleet = Fleet(db, tmp_path)
    rng = random.Random(5)
    try:
        for slot in range(3):
            fleet.start(slot)
        for _, daemon in fleet.running.values():
            daemon.wait_started()
        # Spread, not piled on the first: two projections each.
        wait_until(lambda: sorted(_counts(owners(db)).values()) == [2, 2, 2], timeout=15)
        status = ask(fleet.state_dir(0), "status")
        by_owner = owners(db)
        assert [p["name"] for p in status["projections"]] == NAMES
        for entry in status["projections"]:
            assert entry["owner"] == by_owner[entry["name"]]
            assert entry["local"] == (entry["owner"] == status["instance"])

        # A count of kills, not a time budget: on a loaded machine restarts are slower, and a
        # deadline made the number of kills (what the test is about) depend on the load.
        with Writers(db.url, count=3):
            for _ in range(5):
                before = events_total(db)
                wait_until(lambda before=before: events_total(db) > before + 50, timeout=10)
                slot = rng.randrange(3)
                fleet.kill(slot)
                fleet.start(slot)
                fleet.running[slot][1].wait_started()
        wait_until(lambda: all_caught_up(db), timeout=30, interval=0.2)
        assert_exact_and_once(db)
        assert_periods_disjoint(fleet)
        run_counts = assert_one_instance_at_a_time(db, fleet)
        assert sum(run_counts.values()) > len(NAMES), "ownership never moved"
        fleet.stop_all()
    finally:
        fleet.kill_all()


def _counts(by_projection: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for owner in by_projection.values():
        counts[owner] += 1
    return counts


def test_takeover_within_10s_after_kill_9_and_after_a_lost_connection(
    db: TestDatabase, tmp_path: Path
) -> None:
    db.init(SPECS)
    fleet = Fleet(db, tmp_path)
    try:
        first, second = fleet.start(0), fleet.start(1)
        for _, daemon in fleet.running.values():
            daemon.wait_started()
        wait_until(lambda: sorted(_counts(owners(db)).values()) == [3, 3], timeout=15)

        # kill -9: the survivor takes the dead one's projections and applies what comes next.
        fleet.kill(0)
        killed = time.monotonic()
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 5})
        wait_until(lambda: set(owners(db).values()) == {second} and all_caught_up(db), 10)
        assert time.monotonic() - killed < 10
        assert_periods_disjoint(fleet)

        # A lost connection: terminate the ownership session of the daemon that owns it all.
        third = fleet.start(2)
        fleet.running[2][1].wait_started()
        wait_until(lambda: sorted(_counts(owners(db)).values()) == [3, 3], timeout=15)
        victim = next(name for name, owner in owners(db).items() if owner == second)
        terminated = db.scalar(
            f"SELECT count(pg_terminate_backend(pid)) FROM ({PROJECTION_LOCK_HOLDERS}) h",
            (victim,),
        )
        assert terminated == 1
        lost_at = time.monotonic()
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 2, "amount": 7})
        wait_until(lambda: all_caught_up(db) and len(owners(db)) == len(NAMES), 10)
        assert time.monotonic() - lost_at < 10
        wait_until(lambda: fleet.running[1][1].has_logged("ownership.lost"), timeout=5)
        assert {second, third} >= set(owners(db).values())
        assert_exact_and_once(db)
        assert_one_instance_at_a_time(db, fleet)
        fleet.stop_all()
        assert first in fleet.killed_at
    finally:
        fleet.kill_all()


def test_a_runner_whose_projection_has_another_owner_commits_nothing(
    db: TestDatabase, state_dir: Path
) -> None:
    """The second guard: were an instance to keep running a projection that another instance
    has taken over (its lock lost, its runner not stopped yet), the compare-and-set refuses
    its batches, because the positions row names the new owner."""
    specs = "tests.support.projections:ledger_only"
    db.init(specs)
    env = {"PROJECTORD_INSTANCE_NAME": "a", "TEST_INSTANCE": "a", "PROJECTORD_POLL_INTERVAL": "0.2"}
    with DaemonProcess(db.url, specs, state_dir, extra_env=env):
        wait_until(lambda: owners(db) == {"ledger": "a"}, timeout=10)
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 1})
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 1, timeout=10)
        with db.connect() as conn:  # as if another instance had taken it over
            conn.execute("UPDATE projectord.projection_positions SET owner = 'b'")
            append_sql(conn, "Credited", {"account": 1, "amount": 2})
        wait_until(lambda: ask(state_dir, "status")["projections"][0]["state"] == "standby", 10)
        assert db.scalar("SELECT count(*) FROM applied_log") == 1
        assert db.scalar("SELECT applied_total FROM projectord.projection_positions") == 1
        with db.connect() as conn:  # back to this instance: it goes on from the checkpoint
            conn.execute("UPDATE projectord.projection_positions SET owner = 'a'")
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 2, timeout=10)
    assert db.scalar("SELECT count(DISTINCT event_id) FROM applied_log") == 2
