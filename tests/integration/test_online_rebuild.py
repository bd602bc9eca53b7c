"""The online rebuild against the real daemon: an incompatible change is repaired by building
shadow tables from the first event and swapping them in, while a reader loops on the table and a
writer keeps appending. The reader must only ever see a complete read model (old, then new), and
every event must end up applied exactly once."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import psycopg

from tests.support.drift_support import check, cli_env
from tests.support.harness import (
    TENANT,
    DaemonProcess,
    TestDatabase,
    bulk_credits,
    run_cli,
    wait_until,
)
from tests.support.projections import Ledger
from tests.support.role_support import TemporaryRoles

LEDGER = "tests.support.projections:ledger_only"
OBSERVE = (
    "SELECT coalesce(sum(events), 0)::bigint, coalesce(sum(total), 0)::bigint,"
    " pg_typeof(min(total))::text FROM ledger"
)


class Reader(threading.Thread):
    """Reads the whole ledger in a loop: (events counted, total, type of the total column)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[tuple[int, int, str]] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                try:
                    row = conn.execute(OBSERVE).fetchone()
                    assert row is not None
                    self.seen.append((int(row[0]), int(row[1]), str(row[2])))
                except psycopg.Error as exc:
                    self.errors.append(str(exc))


class Appender(threading.Thread):
    """Appends small batches of Credited events until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.batches = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                conn.execute(
                    "INSERT INTO projectord.events"
                    " (tenant_id, aggregate_id, version, type, payload)"
                    " SELECT %s, gen_random_uuid(), 1, 'Credited',"
                    " jsonb_build_object('account', g %% 50, 'amount', 1 + g %% 5)"
                    " FROM generate_series(1, 20) g",
                    (TENANT,),
                )
                self.batches += 1
                time.sleep(0.005)


def credited(db: TestDatabase) -> int:
    return int(db.scalar("SELECT count(*) FROM projectord.events WHERE type = 'Credited'"))


def applied(db: TestDatabase) -> int:
    return int(db.scalar("SELECT coalesce(sum(events), 0) FROM ledger"))


def prefix_totals(db: TestDatabase) -> list[int]:
    """The ledger's total after the first n events in commit order, for every n."""
    amounts = db.rows(
        "SELECT (payload->>'amount')::bigint FROM projectord.events WHERE type = 'Credited'"
        " ORDER BY transaction_id, global_position"
    )
    return [0, *itertools.accumulate(a for (a,) in amounts)]


def test_incompatible_change_is_rebuilt_online_under_readers_and_writers(
    db: TestDatabase, state_dir: Path
) -> None:
    with db.connect(autocommit=True) as conn:  # the live table: `total` numeric, declared bigint
        conn.execute(
            "CREATE TABLE ledger (account bigint PRIMARY KEY, total numeric NOT NULL,"
            " events bigint NOT NULL)"
        )
        bulk_credits(conn, 30_000)
    env = cli_env(db.url, LEDGER)
    with DaemonProcess(db.url, LEDGER, state_dir) as daemon:
        wait_until(lambda: applied(db) == 30_000, 60)
        assert check(db.url, [Ledger()]) == [("type_mismatch", "ledger", "total", "rebuild")]

        reader, appender = Reader(db.url), Appender(db.url)
        reader.start()
        appender.start()
        before = len(reader.seen)
        repaired = run_cli(
            "drift", "repair", "--apply", "--batch-size", "500", env=env, timeout=300
        )
        during = len(reader.seen) - before
        appender.done.set()
        appender.join()
        wait_until(lambda: applied(db) == credited(db), 60)
        reader.done.set()
        reader.join()
        assert repaired.returncode == 0, repaired.stderr
        # A drift repair that needs a rebuild takes the path of a version bump (the daemon builds
        # it, docs/evolution.md): the replaced table is kept, not dropped.
        assert "versioned rebuild, swapped in, replaced tables kept: ledger" in repaired.stderr
        assert daemon.has_logged("checkpoint.moved")  # the live runner saw its checkpoint move

    assert reader.errors == []
    assert appender.batches > 0 and during > 0
    totals = prefix_totals(db)
    counts = [n for n, _, _ in reader.seen]
    assert counts == sorted(counts) and counts[0] >= 30_000  # never empty, never going back
    assert all(totals[n] == total for n, total, _ in reader.seen)  # always a complete prefix
    types = [t for _, _, t in reader.seen]
    assert types[0] == "numeric" and types[-1] == "bigint"
    assert types == sorted(types, key=lambda t: t == "bigint")  # old, then new, once

    events = credited(db)
    assert applied(db) == events and db.scalar("SELECT sum(total) FROM ledger") == totals[-1]
    logged = db.rows("SELECT count(*), count(DISTINCT event_id) FROM applied_log")
    assert logged == [(events, events)]  # each event applied exactly once
    assert check(db.url, [Ledger()]) == []
    kept = db.rows("SELECT version, role, tables_schema FROM projectord.projection_versions")
    assert [(v, r) for v, r, _ in kept] == [(1, "kept")]
    assert db.scalar(f"SELECT pg_typeof(total)::text FROM {kept[0][2]}.ledger LIMIT 1") == "numeric"
    assert db.rows("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'projectord_%'") == [
        (kept[0][2],)
    ]
    positions = "SELECT name FROM projectord.projection_positions ORDER BY name"
    assert db.rows(positions) == [("ledger",), ("ledger#v1",)]  # the kept table's checkpoint


def test_rebuild_online_without_a_daemon_keeps_select_grants(
    db: TestDatabase, pg_admin_url: str
) -> None:
    roles = TemporaryRoles(pg_admin_url)
    try:
        reporting = roles.create("reporting")
        db.init(LEDGER)
        owner = db.scalar("SELECT current_user")
        with db.connect(autocommit=True) as conn:
            bulk_credits(conn, 2_000)
            conn.execute(f'GRANT SELECT, TRUNCATE ON ledger TO "{reporting}"')
        env = cli_env(db.url, LEDGER)
        unknown = run_cli("rebuild", "nope", "--online", env=env)
        assert unknown.returncode == 1 and "unknown projection 'nope'" in unknown.stderr

        done = run_cli("rebuild", "ledger", "--online", env=env)
        assert done.returncode == 0, done.stderr
        assert "2000 event(s) applied" in done.stdout
        assert applied(db) == 2_000 and db.scalar("SELECT sum(total) FROM ledger") == sum(
            1 + g % 7 for g in range(1, 2_001)
        )
        assert db.scalar("SELECT tableowner FROM pg_tables WHERE tablename = 'ledger'") == owner
        assert db.scalar("SELECT has_table_privilege(%s, 'ledger', 'SELECT')", (reporting,))
        # Only SELECT is carried over: TRUNCATE given to a reader is drift (not subject to RLS).
        assert not db.scalar("SELECT has_table_privilege(%s, 'ledger', 'TRUNCATE')", (reporting,))
    finally:
        roles.drop(db.url)


def test_a_failed_rebuild_leaves_the_live_tables_alone(db: TestDatabase) -> None:
    db.init(LEDGER)
    with db.connect(autocommit=True) as conn:
        bulk_credits(conn, 500)
        conn.execute("CREATE VIEW big_accounts AS SELECT account FROM ledger WHERE total > 10")
        conn.execute("INSERT INTO ledger VALUES (999, 1, 1)")  # what the live table holds now
    failed = run_cli("rebuild", "ledger", "--online", env=cli_env(db.url, LEDGER))
    assert failed.returncode == 1
    error = failed.stderr.strip().splitlines()[-1]  # after the JSON log lines
    assert error.startswith("projectord: cannot replace public.ledger: view big_accounts")
    assert db.rows("SELECT * FROM ledger") == [(999, 1, 1)]  # the view keeps the old table
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projectord_%'") == 0
    assert db.scalar("SELECT count(*) FROM projectord.projection_positions") == 1
