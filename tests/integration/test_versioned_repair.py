"""A drift repair that needs a rebuild takes the path of a version bump (docs/evolution.md):
the daemon builds the projection's tables as declared in a shadow schema, owned and resumable
after a kill -9, shown in status, health and metrics; the drifted tables serve reads until one
atomic swap; the tables replaced are kept as a version that `rollback` brings back, caught up.

The projection is `notes` version 2 (tests/support/version_projections.py): the last value of
each key wins, so an event applied twice, out of order or not at all shows. The drift: its
`value` column turned into `text` by hand, which has no safe cast back to the declared `bigint`.
The live runner goes on writing that table meanwhile (a bigint is assigned to text), so a read
tells the old table (values as JSON strings) from the rebuilt one (numbers)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import anyio
import psycopg

from projectord.runner.version_store import replaced_schema, version_schema
from projectord.schema.versioned_repair import request_rebuild
from tests.integration.test_metrics import free_port
from tests.integration.test_versions import (
    KEYS,
    V1,
    V2,
    Reader,
    Writer,
    bulk_notes,
    env_for,
    health,
    noted,
    serving_version,
    status,
    table,
    v1_fold,
    v2_fold,
    version_metric,
)
from tests.support.drift_support import check, cli_env, repair, settings_for
from tests.support.harness import (
    DaemonProcess,
    TestDatabase,
    as_daemon_role,
    bulk_credits,
    run_cli,
    wait_until,
)
from tests.support.ops_support import ask
from tests.support.version_projections import NotesV1

DRIFT = "ALTER TABLE notes ALTER COLUMN value TYPE text"
KEPT = "SELECT version, role, tables_schema FROM projectord.projection_versions"
BUILT = "SELECT applied_total FROM projectord.projection_positions WHERE name = 'notes#v2'"


class Repair(threading.Thread):
    """`projectord drift repair --apply`, which returns once the rebuild has swapped in."""

    def __init__(self, db: TestDatabase, state_dir: Path) -> None:
        super().__init__(daemon=True)
        self.env = env_for(db, V2, state_dir)
        self.done: Any = None

    def run(self) -> None:
        self.done = run_cli("drift", "repair", "--apply", env=self.env, timeout=300)


def drift(db: TestDatabase, state_dir: Path) -> list[dict[str, Any]]:
    done = run_cli("drift", "check", "--json", env=env_for(db, V2, state_dir))
    return [
        {k: d[k] for k in ("kind", "column", "repair")} for d in json.loads(done.stdout)["drift"]
    ]


def shape(rows: list[dict[str, Any]]) -> str:
    """Which table a read saw: `old` (value text), `new` (bigint), or `mixed`."""
    kinds = {type(r["value"]) for r in rows}
    return {frozenset({str}): "old", frozenset({int}): "new"}.get(frozenset(kinds), "mixed")


def prefix_folds(db: TestDatabase, wanted: set[int]) -> dict[int, list[dict[str, Any]]]:
    """Version 2's fold of the first n events in commit order, for each n wanted."""
    last: dict[int, tuple[int, int]] = {}
    counts: dict[int, int] = {}
    folds = {0: []} if 0 in wanted else {}
    events = db.rows(
        "SELECT (payload->>'key')::int, (payload->>'value')::bigint, global_position"
        " FROM projectord.events WHERE type = 'Noted' ORDER BY transaction_id, global_position"
    )
    for n, (key, value, position) in enumerate(events, start=1):
        last[key] = (value, position)
        counts[key] = counts.get(key, 0) + 1
        if n in wanted:
            folds[n] = [
                {"key": k, "value": last[k][0], "events": counts[k], "last_position": last[k][1]}
                for k in sorted(last)
            ]
    return folds


def assert_complete_reads(db: TestDatabase, reader: Reader) -> None:
    """Every read was the whole fold of a prefix of the events: never empty, partial or mixed;
    the drifted table, then the rebuilt one, once; never going back."""
    assert reader.errors == [] and reader.seen
    seen = [rows for _, _, rows in reader.seen]
    shapes = [shape(rows) for rows in seen]
    assert "mixed" not in shapes
    assert shapes[0] == "old" and shapes[-1] == "new"
    assert shapes == sorted(shapes, key=lambda s: s == "new")  # old, then new, once
    counts = [sum(r["events"] for r in rows) for rows in seen]
    assert counts == sorted(counts) and counts[0] >= 20_000
    folds = prefix_folds(db, set(counts))
    for rows, n in zip(seen, counts, strict=True):
        assert len(rows) == KEYS
        assert [{**r, "value": int(r["value"])} for r in rows] == folds[n]


def test_a_drift_that_needs_a_rebuild_is_built_by_the_daemon_and_swapped_in(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 20_000)
    metrics = f"127.0.0.1:{free_port()}"
    slow = {
        "TEST_NOTES_SLOW": "0.2",
        "PROJECTORD_BATCH_SIZE": "500",
        "PROJECTORD_METRICS_ADDRESS": metrics,
    }
    with DaemonProcess(db.url, V2, state_dir, extra_env=slow) as daemon:
        wait_until(lambda: sum(r["events"] for r in table(db)) == 20_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT)
        assert drift(db, state_dir) == [
            {"kind": "type_mismatch", "column": "value", "repair": "rebuild"}
        ]
        dry = run_cli("drift", "repair", env=env_for(db, V2, state_dir))
        assert dry.returncode == 0, dry.stderr
        assert "-- versioned rebuild of projection notes (version 2)" in dry.stdout
        dry_json = json.loads(
            run_cli("drift", "repair", "--json", env=env_for(db, V2, state_dir)).stdout
        )
        assert dry_json["rebuilds"] == ["notes"] and dry_json["rebuild_versions"] == {"notes": 2}
        assert db.rows(KEPT) == []  # a dry run records nothing

        reader, writer = Reader(db.url), Writer(db.url)
        reader.start()
        writer.start()
        repair = Repair(db, state_dir)
        repair.start()
        # The daemon builds it, and shows it as it shows a version build.
        wait_until(lambda: version_metric(metrics, "building") == 2, 30)
        building = status(db, V2, state_dir)
        assert building["versions"]["serving_version"] == 2
        assert building["versions"]["build"]["version"] == 2
        assert building["versions"]["build"]["local"]
        assert building["state"] == "running"  # the live runner goes on meanwhile
        code, verdict = health(db, V2, state_dir)
        [reason] = [r for r in verdict["reasons"] if r["code"] == "version_building"]
        assert code == 1 and "rebuilding version 2" in reason["message"]
        text = run_cli("status", env=env_for(db, V2, state_dir)).stdout
        assert "notes: rebuild of version 2 running" in text
        assert db.rows(f"{KEPT} WHERE role = 'building'")
        repair.join(300)
        assert repair.done.returncode == 0, repair.done.stderr
        assert "versioned rebuild, swapped in, replaced tables kept: notes" in repair.done.stderr
        commits = writer.commits  # more writes after the swap, applied to the rebuilt table
        wait_until(lambda: writer.commits >= commits + 50, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
        reader.done.set()
        reader.join()
        after = status(db, V2, state_dir)
        assert after["versions"]["build"] is None and after["caught_up"]
        assert [k["version"] for k in after["versions"]["kept_versions"]] == [2]
        listed = run_cli("versions", "list", "--json", env=env_for(db, V2, state_dir))
        [notes] = json.loads(listed.stdout)["projections"]
        assert notes["serving_version"] == 2 and notes["building"] == []
        assert [k["version"] for k in notes["kept"]] == [2] and notes["kept"][0]["expires_at"]
    assert daemon.has_logged("version.swapped")
    assert not daemon.has_logged("ownership.reclaimed")  # the live runner kept its row

    assert_complete_reads(db, reader)
    assert table(db) == v2_fold(db)  # the fold of every event, exactly once
    assert drift(db, state_dir) == []
    # The replaced table is kept as version 2, drifted as it was, frozen at the swap.
    [(version, role, schema)] = db.rows(KEPT)
    assert (version, role) == (2, "kept")
    assert db.scalar(f"SELECT pg_typeof(value)::text FROM {schema}.notes LIMIT 1") == "text"
    assert 20_000 <= db.scalar(f"SELECT sum(events) FROM {schema}.notes") < noted(db)


def test_kill_9_during_a_versioned_drift_repair_the_next_daemon_resumes_it(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 20_000)
    slow = {"TEST_NOTES_SLOW": "0.1", "PROJECTORD_BATCH_SIZE": "500"}
    writer = Writer(db.url)
    daemon = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
    wait_until(lambda: sum(r["events"] for r in table(db)) == 20_000, 60)
    with db.connect(autocommit=True) as conn:
        conn.execute(DRIFT)
    writer.start()
    repair = Repair(db, state_dir)
    repair.start()
    wait_until(lambda: (db.scalar(BUILT) or 0) >= 2_000, 60)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    stopped_at = db.scalar(BUILT)
    assert stopped_at < 20_000 and db.rows(f"{KEPT} WHERE role = 'building'")
    assert shape(table(db)) == "old"  # still the drifted table, untouched
    second = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
    try:
        repair.join(300)  # it waited for the daemons all along
        assert repair.done.returncode == 0, repair.done.stderr
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
    finally:
        second.stop()
    assert second.has_logged("version.build_resumed")  # from its checkpoint, not from scratch
    assert not second.has_logged("version.build_started")
    assert table(db) == v2_fold(db)
    assert [(v, r) for v, r, _ in db.rows(KEPT)] == [(2, "kept")]


def test_rollback_brings_the_tables_a_drift_repair_replaced_back_caught_up(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 2_000)
    env = env_for(db, V2, state_dir)
    slow = {"TEST_NOTES_SLOW": "0.2", "PROJECTORD_BATCH_SIZE": "500"}  # a build of 1 s at least
    with DaemonProcess(db.url, V2, state_dir, extra_env=slow) as daemon:
        wait_until(lambda: sum(r["events"] for r in table(db)) == 2_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT)
        drifted = db.scalar("SELECT 'public.notes'::regclass::oid")
        # Over the control socket: answered once recorded; the daemon builds it.
        answered = ask(state_dir, "drift_repair", apply=True)
        assert answered["applied"] and answered["rebuilds"] == ["notes"]
        assert answered["rebuild_versions"] == {"notes": 2}
        assert [(v, r) for v, r, _ in db.rows(KEPT)] == [(2, "building")]  # not waited for
        wait_until(lambda: [(v, r) for v, r, _ in db.rows(KEPT)] == [(2, "kept")], 60)
        assert shape(table(db)) == "new"
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 1_000)  # applied to the rebuilt table only
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)

        done = run_cli("rollback", "notes", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "before its last rebuild" in done.stderr
        assert sum(r["events"] for r in table(db)) == noted(db)  # caught up when swapped in
        # The replaced table itself serves again, caught up from its checkpoint.
        assert db.scalar("SELECT 'public.notes'::regclass::oid") == drifted
        assert shape(table(db)) == "old"
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 500)
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
        rows = [{**r, "value": int(r["value"])} for r in table(db)]
        assert rows == v2_fold(db)  # every event exactly once, in the drifted table
        assert drift(db, state_dir) == [
            {"kind": "type_mismatch", "column": "value", "repair": "rebuild"}
        ]
        # The rebuilt table is the kept one now; dropped on request.
        [(version, role, schema)] = db.rows(KEPT)
        assert (version, role) == (2, "kept")
        assert db.scalar(f"SELECT pg_typeof(value)::text FROM {schema}.notes LIMIT 1") == "bigint"
        dropped = run_cli("versions", "drop", "notes", "2", env=env)
        assert dropped.returncode == 0, dropped.stderr
        assert db.rows(KEPT) == []
        namespaces = "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projectord_v_%'"
        assert db.scalar(namespaces) == 0
        positions = "SELECT name FROM projectord.projection_positions"
        assert db.rows(positions) == [("notes",)]
    assert not daemon.has_logged("ownership.reclaimed")


def test_a_version_keeps_one_copy_and_an_online_rebuild_waits_for_its_rebuild(
    db: TestDatabase, state_dir: Path
) -> None:
    """Without a daemon the repair builds the rebuild itself. A second rebuild of a version
    replaces the copy the first kept; while one is recorded `rebuild --online` is refused; when
    the version leaves service for a newer one, its tables are the copy kept."""
    v1 = [NotesV1()]
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 300)
    replaced = replaced_schema("public", "notes", 1)
    for kept_events in (None, 300):  # the drifted table the first time is empty (never run)
        with db.connect(autocommit=True) as conn:
            conn.execute("ALTER TABLE notes ALTER COLUMN total TYPE text")
        assert ("type_mismatch", "notes", "total", "rebuild") in check(db.url, v1)
        repair(db.url, v1, apply=True)
        assert check(db.url, v1) == [] and table(db) == v1_fold(db)
        assert db.rows(KEPT) == [(1, "kept", replaced)]
        assert db.scalar(f"SELECT sum(events) FROM {replaced}.notes") == kept_events

    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE notes ALTER COLUMN total TYPE text")
    anyio.run(_request_rebuild, db.url, v1[0])
    # Recorded as the build of version 1; the copy the last rebuild kept is dropped.
    assert db.rows(KEPT) == [(1, "building", version_schema("public", "notes", 1))]
    assert db.scalar("SELECT to_regnamespace(%s)", (replaced,)) is None
    refused = run_cli("rebuild", "notes", "--online", env=env_for(db, V1, state_dir))
    assert refused.returncode == 1 and "is being rebuilt by a daemon" in refused.stderr
    repair(db.url, v1, apply=True)  # the recorded rebuild, built here
    assert check(db.url, v1) == [] and table(db) == v1_fold(db)

    with DaemonProcess(db.url, V2, state_dir):
        wait_until(lambda: serving_version(db) == 2, 60)
    assert db.rows(KEPT) == [(1, "kept", version_schema("public", "notes", 1))]
    namespaces = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'projectord_v_%'"
    assert db.rows(namespaces) == [(version_schema("public", "notes", 1),)]


async def _request_rebuild(url: str, projection: NotesV1) -> None:
    url = as_daemon_role(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await request_rebuild(conn, settings_for(url), projection)


def test_a_rollback_right_after_the_swap_catches_the_kept_tables_up_first(
    db: TestDatabase, state_dir: Path
) -> None:
    """The live runner is paused, so the tables the repair replaces (and their checkpoint) stay
    500 events behind the rebuild. The rollback asked right after the swap must catch them up
    before it swaps them in, not trust what the build runner knew of its last build."""
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 1_000)
    env = env_for(db, V2, state_dir)
    with DaemonProcess(db.url, V2, state_dir):
        wait_until(lambda: sum(r["events"] for r in table(db)) == 1_000, 60)
        assert run_cli("pause", "notes", env=env).returncode == 0
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 500)
            conn.execute(DRIFT)
        repaired = run_cli("drift", "repair", "--apply", env=env, timeout=120)
        assert repaired.returncode == 0, repaired.stderr
        assert shape(table(db)) == "new" and sum(r["events"] for r in table(db)) == 1_500
        [(_, _, kept)] = db.rows(KEPT)
        assert db.scalar(f"SELECT sum(events) FROM {kept}.notes") == 1_000
        done = run_cli("rollback", "notes", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert shape(table(db)) == "old" and sum(r["events"] for r in table(db)) == 1_500
        assert [{**r, "value": int(r["value"])} for r in table(db)] == v2_fold(db)


def test_a_rebuild_that_stops_fails_the_repair_and_leaves_the_live_tables(
    db: TestDatabase,
) -> None:
    """Built here (no daemon), by a handler that writes its table by its qualified name: the
    build's guard stops it; the command says why, exit 1; the drifted table serves on."""
    qualified = "tests.support.rebuild_projections:qualified"
    db.init(qualified)
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE qualified_totals ALTER COLUMN total DROP NOT NULL")
        conn.execute("INSERT INTO qualified_totals VALUES (99, NULL)")  # NOT NULL: a rebuild
        bulk_credits(conn, 300, accounts=5)
    failed = run_cli("drift", "repair", "--apply", env=cli_env(db.url, qualified), timeout=120)
    assert failed.returncode == 1
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "projectord: the versioned rebuild of 'qualified' stopped, its live tables untouched:"
        " projection 'qualified' wrote public.qualified_totals"
    ), error
    assert db.rows("SELECT * FROM qualified_totals") == [(99, None)]
    assert [(v, r) for v, r, _ in db.rows(KEPT)] == [(1, "building")]  # still asked for
