"""Versioned projections against real daemons (docs/evolution.md): a higher `version` is built
blue/green beside the serving one and swapped in while readers read and writers write; old code
never touches newer tables; two daemons of different versions share the work in a rolling deploy;
a kept version is rolled back to.

The projection is `notes` (tests/support/version_projections.py): version 1 adds values up,
version 2 keeps the last value of each key (not commutative) and has a new column."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.integration.test_metrics import free_port
from tests.integration.test_metrics import value as metric
from tests.support.harness import TENANT, DaemonProcess, TestDatabase, run_cli, wait_until

V1 = "tests.support.version_projections:v1"
V2 = "tests.support.version_projections:v2"
KEYS = 20

# One statement, so one snapshot: which version the live table is (by its columns), how many
# events it counts, and its rows.
OBSERVE = "SELECT coalesce(json_agg(row_to_json(n) ORDER BY n.key), '[]'::json)::text FROM notes n"


def append_notes(conn: psycopg.Connection[Any], count: int, rng: random.Random) -> None:
    """`count` Noted events in one transaction, each its own aggregate."""
    with conn.transaction():
        for _ in range(count):
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
                " VALUES (%s, %s, 1, 'Noted', %s)",
                (
                    TENANT,
                    uuid.uuid4(),
                    Jsonb({"key": rng.randrange(KEYS), "value": rng.randrange(1_000_000)}),
                ),
            )


def bulk_notes(conn: psycopg.Connection[Any], count: int) -> None:
    conn.execute(
        "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
        " SELECT %s, gen_random_uuid(), 1, 'Noted',"
        " jsonb_build_object('key', g %% %s, 'value', (g * 7919) %% 1000003)"
        " FROM generate_series(1, %s) g",
        (TENANT, KEYS, count),
    )


class Writer(threading.Thread):
    """Appends a few Noted events per transaction until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.commits = 0

    def run(self) -> None:
        rng = random.Random(7)
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                append_notes(conn, rng.randint(1, 5), rng)
                self.commits += 1
                time.sleep(0.003)


class Reader(threading.Thread):
    """Reads the whole live table in a loop; keeps what it saw, as (version, events, rows)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.seen: list[tuple[int, int, list[dict[str, Any]]]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                try:
                    row = conn.execute(OBSERVE).fetchone()
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    continue
                assert row is not None
                rows = json.loads(row[0])
                version = 2 if rows and "last_position" in rows[0] else 1
                if len({tuple(sorted(r)) for r in rows}) > 1:
                    self.errors.append(f"rows of two shapes in one read: {rows}")
                self.seen.append((version, sum(r["events"] for r in rows), rows))


def noted(db: TestDatabase) -> int:
    return int(db.scalar("SELECT count(*) FROM projectord.events WHERE type = 'Noted'"))


def serving_version(db: TestDatabase) -> int | None:
    return db.scalar("SELECT version FROM projectord.projection_positions WHERE name = 'notes'")


def applied(db: TestDatabase) -> int:
    return int(db.scalar("SELECT coalesce(sum(events), 0) FROM notes"))


def v2_fold(db: TestDatabase) -> list[dict[str, Any]]:
    """Version 2's fold of every event, in commit order, each exactly once."""
    last: dict[int, tuple[int, int]] = {}
    counts: dict[int, int] = {}
    for key, value, position in db.rows(
        "SELECT (payload->>'key')::int, (payload->>'value')::bigint, global_position"
        " FROM projectord.events WHERE type = 'Noted' ORDER BY transaction_id, global_position"
    ):
        last[key] = (value, position)
        counts[key] = counts.get(key, 0) + 1
    return [
        {"key": k, "value": last[k][0], "events": counts[k], "last_position": last[k][1]}
        for k in sorted(last)
    ]


def v1_fold(db: TestDatabase) -> list[dict[str, Any]]:
    rows = db.rows(
        "SELECT (payload->>'key')::int, sum((payload->>'value')::bigint), count(*)"
        " FROM projectord.events WHERE type = 'Noted' GROUP BY 1 ORDER BY 1"
    )
    return [{"key": k, "total": int(t), "events": int(c)} for k, t, c in rows]


def table(db: TestDatabase) -> list[dict[str, Any]]:
    return json.loads(db.scalar(OBSERVE))


def version_metric(address: str, role: str) -> float | None:
    return metric(address, "projectord_projection_version", projection="notes", role=role)


def env_for(db: TestDatabase, projections: str, state_dir: Path) -> dict[str, str]:
    return {
        "PROJECTORD_DATABASE_URL": db.url,
        "PROJECTORD_PROJECTIONS": projections,
        "PROJECTORD_STATE_DIR": str(state_dir),
    }


def status(db: TestDatabase, projections: str, state_dir: Path) -> dict[str, Any]:
    done = run_cli("status", "--json", env=env_for(db, projections, state_dir))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["projections"][0]


def health(db: TestDatabase, projections: str, state_dir: Path) -> tuple[int, dict[str, Any]]:
    done = run_cli("health", "--json", env=env_for(db, projections, state_dir))
    return done.returncode, json.loads(done.stdout)


def test_a_new_version_is_built_blue_green_and_swapped_in_under_readers_and_writers(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 40_000)
    v1_state = state_dir / "v1"
    v1_state.mkdir()
    with DaemonProcess(db.url, V1, v1_state):
        wait_until(lambda: applied(db) == 40_000, 60)
    assert table(db) == v1_fold(db)

    reader, writer = Reader(db.url), Writer(db.url)
    reader.start()
    writer.start()
    metrics = f"127.0.0.1:{free_port()}"
    # A build of 80 batches of at least 0.2 s: long enough to be seen building.
    slow = {
        "TEST_NOTES_SLOW": "0.2",
        "PROJECTORD_BATCH_SIZE": "500",
        "PROJECTORD_METRICS_ADDRESS": metrics,
    }
    with DaemonProcess(db.url, V2, state_dir, extra_env=slow):
        # The build shows in status, health and metrics while version 1 serves (frozen: one
        # daemon).
        wait_until(  # from the monitor's periodic look
            lambda: version_metric(metrics, "building") == 2,
            15,
        )
        assert version_metric(metrics, "serving") == 1
        assert version_metric(metrics, "code") == 2
        building = status(db, V2, state_dir)
        assert building["versions"]["version"] == 2
        assert building["versions"]["serving_version"] == 1
        assert building["versions"]["build"]["version"] == 2
        text = run_cli("status", env=env_for(db, V2, state_dir)).stdout
        assert "notes: version 2 " in text and "while version 1 serves" in text
        code, verdict = health(db, V2, state_dir)
        assert code == 1 and "version_building" in {r["code"] for r in verdict["reasons"]}
        wait_until(lambda: serving_version(db) == 2, 120)
        commits = writer.commits  # more writes after the swap, applied by version 2's runner
        wait_until(lambda: writer.commits >= commits + 50, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: applied(db) == noted(db), 60)
        reader.done.set()
        reader.join()
        after = status(db, V2, state_dir)
        assert after["state"] == "running" and after["caught_up"]
        assert after["versions"]["build"] is None
        assert [k["version"] for k in after["versions"]["kept_versions"]] == [1]
        wait_until(
            lambda: version_metric(metrics, "serving") == 2,
            15,
        )
        assert metric(metrics, "projectord_version_build_lag_events", projection="notes") == 0

    assert reader.errors == [] and writer.commits > 0
    versions = [v for v, _, _ in reader.seen]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions)  # version 1, then version 2, once: never mixed
    counts = [n for _, n, _ in reader.seen]
    assert counts[0] >= 40_000 and counts == sorted(counts)  # never empty, never partial
    assert all(len(rows) == KEYS for _, _, rows in reader.seen)
    assert table(db) == v2_fold(db)  # version 2's fold of every event, exactly once
    # Version 1's tables are kept, frozen at the swap, for a rollback.
    kept = db.rows("SELECT version, role, tables_schema FROM projectord.projection_versions")
    assert [(v, r) for v, r, _ in kept] == [(1, "kept")]
    frozen = db.scalar(f"SELECT sum(events) FROM {kept[0][2]}.notes")
    assert 40_000 <= frozen < noted(db)


def test_older_code_refuses_newer_tables_and_the_others_keep_running(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 500)
    with DaemonProcess(db.url, V2, state_dir):
        wait_until(lambda: applied(db) == 500, 30)
    assert serving_version(db) == 2
    before = table(db)
    old = "tests.support.version_projections:v1_and_ledger"
    with DaemonProcess(db.url, old, state_dir) as daemon:
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 100)
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
                " VALUES (%s, gen_random_uuid(), 1, 'Credited', '{\"account\": 1, \"amount\": 5}')",
                (TENANT,),
            )
        wait_until(lambda: db.scalar("SELECT sum(total) FROM ledger") == 5, 30)
        code, verdict = health(db, old, state_dir)
        reasons = {r["code"]: r for r in verdict["reasons"]}
        assert code == 2 and "projection_superseded" in reasons
        assert "superseded by version 2" in reasons["projection_superseded"]["message"]
        notes = next(
            p
            for p in json.loads(
                run_cli("status", "--json", env=env_for(db, old, state_dir)).stdout
            )["projections"]
            if p["name"] == "notes"
        )
        assert notes["state"] == "superseded"
        text = run_cli("status", env=env_for(db, old, state_dir))
        assert text.returncode == 0, text.stderr
        assert "notes: version 2 serves; this daemon runs version 1" in text.stdout
        assert daemon.process.poll() is None
    # Version 1's code never ran `notes` (its lock is per version: never taken), never touched
    # version 2's tables, and the daemon's other projection ran all along.
    acquired = [
        e.get("projection") for e in daemon.log_events() if e.get("event") == "ownership.acquired"
    ]
    assert acquired == ["ledger"]
    assert not daemon.has_logged("projection.handler_failed")
    assert table(db) == before
    assert serving_version(db) == 2


def test_rolling_deploy_two_daemons_kill_9_during_the_build(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 20_000)
    old_dir, new_dir = state_dir / "old", state_dir / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    writer = Writer(db.url)
    with DaemonProcess(db.url, V1, old_dir, extra_env={"TEST_INSTANCE": "old"}) as old:
        wait_until(lambda: applied(db) == 20_000, 60)
        writer.start()
        slow = {"TEST_NOTES_SLOW": "0.1", "PROJECTORD_BATCH_SIZE": "500"}
        new = DaemonProcess(db.url, V2, new_dir, extra_env=slow).wait_started()
        built = "SELECT applied_total FROM projectord.projection_positions WHERE name = 'notes#v2'"
        wait_until(lambda: (db.scalar(built) or 0) >= 2_000, 60)
        # Meanwhile the old daemon keeps version 1 live: it applies the new events, and its
        # status shows the build the other daemon runs.
        seen_by_old = status(db, V1, old_dir)
        assert seen_by_old["state"] == "running" and seen_by_old["local"]
        assert seen_by_old["versions"]["serving_version"] == 1
        assert seen_by_old["versions"]["build"]["version"] == 2
        assert not seen_by_old["versions"]["build"]["local"]
        live = applied(db)
        wait_until(lambda: applied(db) > live, 30)
        new.process.send_signal(signal.SIGKILL)
        new.process.wait(10)
        stopped_at = db.scalar(built)
        assert serving_version(db) == 1 and stopped_at < 20_000
        new = DaemonProcess(db.url, V2, new_dir).wait_started()
        try:
            wait_until(lambda: serving_version(db) == 2, 120)
            writer.done.set()
            writer.join()
            wait_until(lambda: applied(db) == noted(db), 60)
            # The old daemon stops `notes` and never writes version 2's tables.
            # (Its health says so from its next ownership turn: the versions it read then.)
            wait_until(lambda: "superseded by version 2" in json.dumps(health(db, V1, old_dir)), 30)
            code, verdict = health(db, V1, old_dir)
            assert code == 2
            [reason] = [r for r in verdict["reasons"] if r["code"] == "projection_superseded"]
            assert reason["version"] == 1 and reason["serving_version"] == 2
            wait_until(lambda: not status(db, V1, old_dir)["local"], 30)  # given up
            assert status(db, V1, old_dir)["state"] == "superseded"
            assert old.process.poll() is None
        finally:
            new.stop()
    assert new.has_logged("version.build_resumed")
    # Never a fight over a checkpoint: no daemon found its row claimed by the other.
    for daemon in (old, new):
        assert not daemon.has_logged("ownership.reclaimed")
    assert table(db) == v2_fold(db)


def test_rollback_to_the_kept_version_caught_up(db: TestDatabase, state_dir: Path) -> None:
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 3_000)
    with DaemonProcess(db.url, V1, state_dir):
        wait_until(lambda: applied(db) == 3_000, 60)
    with DaemonProcess(db.url, V2, state_dir):
        wait_until(lambda: serving_version(db) == 2, 60)
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 1_000)  # applied by version 2 only
        wait_until(lambda: applied(db) == noted(db), 60)
        # Version 2's code cannot roll back to version 1: it would apply itself to them.
        refused = run_cli("rollback", "notes", env=env_for(db, V2, state_dir))
        assert refused.returncode == 1
        assert "deploy it, then roll back" in refused.stderr and serving_version(db) == 2
    kept_table = db.scalar(
        "SELECT c.oid FROM pg_class c JOIN projectord.projection_versions v"
        " ON c.relnamespace = v.tables_schema::regnamespace AND c.relname = 'notes'"
    )
    with DaemonProcess(db.url, V1, state_dir):
        env = env_for(db, V1, state_dir)
        listed = run_cli("versions", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        [notes] = json.loads(listed.stdout)["projections"]
        assert notes["serving_version"] == 2 and [k["version"] for k in notes["kept"]] == [1]
        done = run_cli("rollback", "notes", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert serving_version(db) == 1
        # The kept table itself serves again, caught up from its checkpoint: not a new build.
        assert db.scalar("SELECT 'public.notes'::regclass::oid") == kept_table
        assert table(db) == v1_fold(db)
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 500)
        wait_until(lambda: applied(db) == noted(db), 60)
        assert table(db) == v1_fold(db)  # version 1 again, caught up with every event
        after = json.loads(run_cli("versions", "list", "--json", env=env).stdout)["projections"][0]
        assert [k["version"] for k in after["kept"]] == [2]
        dropped = run_cli("versions", "drop", "notes", "2", env=env)
        assert dropped.returncode == 0, dropped.stderr
        assert db.scalar("SELECT count(*) FROM projectord.projection_versions") == 0
        assert (
            db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projectord_v_%'") == 0
        )


def test_a_view_on_the_live_table_holds_the_swap_until_it_is_dropped(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 300)
        conn.execute("CREATE VIEW busy_notes AS SELECT key FROM notes WHERE events > 10")
    with DaemonProcess(db.url, V1, state_dir):
        wait_until(lambda: applied(db) == 300, 30)
    with DaemonProcess(db.url, V2, state_dir) as daemon:
        wait_until(lambda: daemon.has_logged("version.swap_blocked"), 30)
        code, verdict = health(db, V2, state_dir)
        assert code == 1
        [building] = [r for r in verdict["reasons"] if r["code"] == "version_building"]
        assert "view public.busy_notes on public.notes" in building["message"]
        assert serving_version(db) == 1  # the view would have followed version 1's table
        with db.connect(autocommit=True) as conn:
            conn.execute("DROP VIEW busy_notes")
        wait_until(lambda: serving_version(db) == 2, 30)
        wait_until(lambda: applied(db) == noted(db), 30)
    assert table(db) == v2_fold(db)


def test_a_kept_version_is_dropped_after_its_retention(db: TestDatabase, state_dir: Path) -> None:
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 200)
    with DaemonProcess(db.url, V1, state_dir):
        wait_until(lambda: applied(db) == 200, 30)
    kept = "SELECT count(*) FROM projectord.projection_versions WHERE role = 'kept'"
    schemas = "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projectord_v_%'"
    with DaemonProcess(db.url, V2, state_dir):
        wait_until(lambda: serving_version(db) == 2, 30)
    assert db.scalar(kept) == 1 and db.scalar(schemas) == 1  # kept under the default (7 days)
    with DaemonProcess(db.url, V2, state_dir, extra_env={"PROJECTORD_VERSION_RETENTION": "0"}):
        wait_until(lambda: db.scalar(kept) == 0, 30)  # the sweep at start finds it expired
    assert db.scalar(schemas) == 0
    assert db.rows("SELECT name FROM projectord.projection_positions") == [("notes",)]
    assert table(db) == v2_fold(db)


def test_a_projection_only_full_daemons_can_run_is_taken_beyond_the_share(
    db: TestDatabase, state_dir: Path
) -> None:
    """Two daemons, two projections, a fair share of one each. The new-code daemon starts first
    and takes `ledger` (and the build of `notes` v2, outside the share); the old one then takes
    `notes` v1. After the swap the old daemon may not run `notes`, and the new one is at its
    share: it must take `notes` beyond it rather than leave it unapplied."""
    old, new = "tests.support.version_projections:v1_and_ledger", V2 + "_and_ledger"
    db.init(old)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 20_000)
    old_dir, new_dir = state_dir / "old", state_dir / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    slow = {"TEST_NOTES_SLOW": "0.2", "PROJECTORD_BATCH_SIZE": "500"}
    with DaemonProcess(db.url, new, new_dir, extra_env=slow) as second:
        with DaemonProcess(db.url, old, old_dir) as first:
            owners = "SELECT name, owner IS NOT NULL FROM projectord.projection_positions"
            wait_until(lambda: ("notes", True) in db.rows(owners), 30)  # the old one runs it
            assert serving_version(db) == 1
            wait_until(lambda: serving_version(db) == 2, 60)
            with db.connect(autocommit=True) as conn:
                bulk_notes(conn, 100)
                conn.execute(
                    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type,"
                    " payload) VALUES (%s, gen_random_uuid(), 1, 'Credited',"
                    ' \'{"account": 1, "amount": 5}\')',
                    (TENANT,),
                )
            wait_until(lambda: applied(db) == noted(db), 30)
            wait_until(lambda: db.scalar("SELECT sum(total) FROM ledger") == 5, 30)
            assert second.has_logged("ownership.beyond_share")
            assert first.process.poll() is None
    assert table(db) == v2_fold(db)
