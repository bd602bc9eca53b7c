"""A hostile review of the versioned drift repair (issue 16, docs/evolution.md "A drift repair
that needs a rebuild"), against a real PostgreSQL, real daemons, kill -9 and concurrent repairs.

Each test states a suspicion. Those named `..._found_by_review` reproduced a bug (they were
strict xfails, each docstring says what went wrong) and pass since its fix; the others are
suspicions that held (the behaviour is right). All stay as regression tests.

The invariant checked throughout: every copy of the tables (the live one, the one kept as version
N) is exactly its checkpoint's fold: the projection's fold of the events at or below the
checkpoint row that goes with it (`NAME` for the live tables, `NAME#vN` for the kept ones), each
event once, in commit order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.runner.version_store import replaced_schema, version_schema
from tests.integration.test_versions import (
    V1,
    V2,
    Writer,
    bulk_notes,
    env_for,
    noted,
    serving_version,
    table,
    v1_fold,
    v2_fold,
)
from tests.support.drift_support import check, repair
from tests.support.harness import (
    ROOT,
    TENANT,
    DaemonProcess,
    TestDatabase,
    as_daemon_role,
    bulk_credits,
    run_cli,
    wait_until,
)
from tests.support.ops_support import ask
from tests.support.version_projections import NotesV1

KEPT = "SELECT version, role, tables_schema FROM projectord.projection_versions"
POSITION = (
    "SELECT transaction_id::text, global_position, owner, state"
    " FROM projectord.projection_positions WHERE name = %s"
)
DRIFT_V2 = "ALTER TABLE notes ALTER COLUMN value TYPE text"
DRIFT_V1 = "ALTER TABLE notes ALTER COLUMN total TYPE text"
ASIDE_SPEC = "tests.integration.test_versioned_repair_review:notes_v1_and_aside"


class Aside(Projection):
    """A second projection whose drift (a dropped nullable column) is repaired in place: its
    ALTER TABLE is where a test holds a `drift repair --apply` between its check and its apply."""

    name = "aside"
    event_types = ("Asided",)
    tables = {"aside": Table({"id": "int PRIMARY KEY", "note": "text"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        return None


def notes_v1_and_aside() -> list[Projection]:
    return [NotesV1(), Aside()]


class LiteV1(Projection):
    """Two versions of a projection whose tables differ only in ways `drift repair` changes in
    place: version 2 drops `total` and adds a nullable `note` (a bump, built blue/green)."""

    name = "lite"
    event_types = ("Lited",)
    version = 1
    tables = {
        "lite": Table(
            {
                "key": "int PRIMARY KEY",
                "total": "bigint NOT NULL DEFAULT 0",
                "events": "bigint NOT NULL DEFAULT 0",
            }
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            await conn.execute(
                "INSERT INTO lite AS l (key, total, events) VALUES (%s, %s, 1) ON CONFLICT (key)"
                " DO UPDATE SET total = l.total + excluded.total, events = l.events + 1",
                (int(event.payload["key"]), int(event.payload["value"])),
            )


class LiteV2(Projection):
    name = "lite"
    event_types = ("Lited",)
    version = 2
    tables = {
        "lite": Table(
            {"key": "int PRIMARY KEY", "events": "bigint NOT NULL DEFAULT 0", "note": "text"}
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            await conn.execute(
                "INSERT INTO lite AS l (key, events, note) VALUES (%s, 1, %s) ON CONFLICT (key)"
                " DO UPDATE SET events = l.events + 1, note = excluded.note",
                (int(event.payload["key"]), str(event.payload["value"])),
            )


def lite_v1() -> list[Projection]:
    return [LiteV1()]


def lite_v2() -> list[Projection]:
    return [LiteV2()]


# -- folds of a prefix of the events ---------------------------------------------------------------

PREFIX = (
    "SELECT (payload->>'key')::int, (payload->>'value')::bigint, global_position"
    " FROM projectord.events"
    " WHERE type = 'Noted' AND (transaction_id, global_position) <= (%s::xid8, %s)"
    " ORDER BY transaction_id, global_position"
)


def checkpoint_of(db: TestDatabase, row: str) -> tuple[str, int]:
    found = db.rows(POSITION, (row,))
    assert found, f"no positions row {row}"
    return found[0][0], int(found[0][1])


def v2_fold_at(db: TestDatabase, row: str) -> list[dict[str, Any]]:
    """Version 2's fold of the events at or below the checkpoint of positions row `row`."""
    last: dict[int, tuple[int, int]] = {}
    counts: dict[int, int] = {}
    for key, value, position in db.rows(PREFIX, checkpoint_of(db, row)):
        last[key] = (value, position)
        counts[key] = counts.get(key, 0) + 1
    return [
        {"key": k, "value": last[k][0], "events": counts[k], "last_position": last[k][1]}
        for k in sorted(last)
    ]


def v1_fold_at(db: TestDatabase, row: str) -> list[dict[str, Any]]:
    totals: dict[int, list[int]] = {}
    for key, value, _ in db.rows(PREFIX, checkpoint_of(db, row)):
        t = totals.setdefault(key, [0, 0])
        t[0] += value
        t[1] += 1
    return [{"key": k, "total": t[0], "events": t[1]} for k, t in sorted(totals.items())]


def rows_of(db: TestDatabase, schema: str) -> list[dict[str, Any]]:
    """The rows of `schema`.notes, values as integers (a drifted copy holds them as text)."""
    found = json.loads(
        db.scalar(
            "SELECT coalesce(json_agg(row_to_json(n) ORDER BY n.key), '[]'::json)::text"
            f" FROM {schema}.notes n"
        )
    )
    ints = ("value", "total", "events", "last_position")
    return [{k: int(v) if k in ints else v for k, v in r.items()} for r in found]


def kept(db: TestDatabase) -> list[tuple[int, str, str]]:
    return [(int(v), r, s) for v, r, s in db.rows(KEPT)]


def both_copies_exact(db: TestDatabase) -> None:
    """The live table is version 2's fold of every event, and the one kept copy is the fold of
    the events up to its own checkpoint, `notes#v2`."""
    assert table(db) == v2_fold(db)
    [(_, _, schema)] = kept(db)
    assert rows_of(db, schema) == v2_fold_at(db, "notes#v2")


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"PROJECTORD_BATCH_SIZE": "200", **(extra or {})}


def cli_process(db: TestDatabase, projections: str, state_dir: Path, *args: str, **extra: str):
    """A `projectord` command as a process of its own, to kill -9."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **env_for(db, projections, state_dir),
        "PROJECTORD_LOG_FORMAT": "json",
        **extra,
    }
    env["PROJECTORD_DATABASE_URL"] = as_daemon_role(env["PROJECTORD_DATABASE_URL"])
    return subprocess.Popen(
        [sys.executable, "-m", "projectord", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- 1. two `drift repair --apply` at once ---------------------------------------------------------


class _Repair(threading.Thread):
    def __init__(self, url: str, projections: list[Projection]) -> None:
        super().__init__(daemon=True)
        self.url, self.projections = url, projections
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = repair(self.url, self.projections, apply=True)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _waiting_on(db: TestDatabase, relation: str) -> bool:
    return bool(
        db.scalar(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
            (relation,),
        )
    )


def test_two_repairs_at_once_the_second_drops_the_first_ones_kept_copy_found_by_review(
    db: TestDatabase,
) -> None:
    """Two operators (or a CI job and an operator) run `drift repair --apply` at the same time.
    Repair B checks first and sees the drifted `notes`; before it applies, repair A (which also
    saw it) rebuilds it and keeps the drifted table as version 1. B then records its rebuild,
    unconditionally: the drift it saw is gone, but the kept copy of the hand-altered table goes."""
    db.init(ASIDE_SPEC)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 300)
    notes = [NotesV1()]
    both = [NotesV1(), Aside()]
    with db.connect(autocommit=True) as conn:
        conn.execute(DRIFT_V1)
        # Never run by a daemon: the table holds what was put there by hand, nothing else.
        conn.execute("INSERT INTO notes VALUES (1, '42 (checked by hand)', 1)")
        conn.execute("ALTER TABLE aside DROP COLUMN note")
    assert ("type_mismatch", "notes", "total", "rebuild") in check(db.url, both)
    assert ("missing_column", "aside", "note", "in_place") in check(db.url, both)

    hold = psycopg.connect(db.url)  # holds B between its check and its apply
    hold.execute("LOCK TABLE aside IN ACCESS SHARE MODE")
    b = _Repair(db.url, both)
    try:
        b.start()
        wait_until(lambda: _waiting_on(db, "aside"), 10)  # B has checked; it waits to apply
        repair(db.url, notes, apply=True)  # A: built here (no daemon), swapped in, copy kept
        [(version, role, schema)] = kept(db)
        assert (version, role) == (1, "kept")
        assert db.scalar(f"SELECT total FROM {schema}.notes WHERE key = 1").endswith("by hand)")
    finally:
        hold.rollback()
        hold.close()
    b.join(120)
    assert b.error is None, b.error
    assert check(db.url, both) == [] and table(db) == v1_fold(db)
    # The copy A kept is the hand-altered table, still there for a rollback.
    [(version, role, schema)] = kept(db)
    assert db.scalar("SELECT to_regnamespace(%s)", (schema,)) is not None
    assert db.scalar(f"SELECT pg_typeof(total)::text FROM {schema}.notes LIMIT 1") == "text"


# -- 2. two daemons, the builder killed -9 ---------------------------------------------------------


def _builder(daemons: list[DaemonProcess]) -> DaemonProcess:
    started = [d for d in daemons if d.has_logged("version.build_started")]
    assert len(started) == 1, [d.log_path for d in daemons]
    return started[0]


def test_two_daemons_the_builder_killed_9_every_copy_is_its_checkpoints_fold(
    db: TestDatabase, state_dir: Path
) -> None:
    """Suspicion: with the live unit and the build unit in two daemons (or one), a writer going
    on and the builder killed -9 mid-build, the exchange of the two checkpoint rows at the swap
    leaves a copy whose rows are not its checkpoint's fold (an in-flight live batch landing in
    the rebuilt table, or counted in the kept one's checkpoint)."""
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 6_000)
    slow = daemon_env({"TEST_NOTES_SLOW": "0.05"})
    dirs = [state_dir / "a", state_dir / "b", state_dir / "c"]
    for d in dirs:
        d.mkdir()
    a = DaemonProcess(db.url, V2, dirs[0], extra_env=slow).wait_started()
    b = DaemonProcess(db.url, V2, dirs[1], extra_env=slow).wait_started()
    c: DaemonProcess | None = None
    writer = Writer(db.url)
    try:
        wait_until(lambda: sum(r["events"] for r in table(db)) == 6_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V2)
        writer.start()
        answered = ask(dirs[0], "drift_repair", apply=True)
        assert answered["rebuilds"] == ["notes"]
        wait_until(lambda: (db.scalar(BUILT) or 0) >= 1_000, 60)
        builder = _builder([a, b])
        builder.kill()
        survivor = b if builder is a else a
        c = DaemonProcess(db.url, V2, dirs[2], extra_env=slow).wait_started()
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
        assert survivor.has_logged("version.build_resumed") or c.has_logged("version.build_resumed")
    finally:
        writer.done.set()
        for d in (a, b, c):
            if d is not None and d.process.poll() is None:
                d.stop()
    assert table(db) == v2_fold(db)
    [(version, role, schema)] = kept(db)
    assert (version, role) == (2, "kept")
    assert rows_of(db, schema) == v2_fold_at(db, "notes#v2")
    assert rows_of(db, "public") == v2_fold_at(db, "notes")


BUILT = "SELECT applied_total FROM projectord.projection_positions WHERE name = 'notes#v2'"


# -- 3. the command builds (no daemon); a daemon starts; the command is killed -9 ------------------


def test_the_command_builds_a_daemon_starting_meanwhile_leaves_it_and_resumes_after_a_kill_9(
    db: TestDatabase, state_dir: Path
) -> None:
    """Suspicion: `drift repair --apply` building by itself (no daemon) and a daemon started
    meanwhile both build `notes#v2` (two runners on one checkpoint, one set of tables), or the
    daemon, after the command is killed -9, starts over or loses the build's progress."""
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 4_000)
    slow = daemon_env({"TEST_NOTES_SLOW": "0.1"})
    with DaemonProcess(db.url, V2, state_dir, extra_env=slow):
        wait_until(lambda: sum(r["events"] for r in table(db)) == 4_000, 60)
    with db.connect(autocommit=True) as conn:
        conn.execute(DRIFT_V2)
        bulk_notes(conn, 500)  # the live tables are behind now: no daemon runs
    command = cli_process(db, V2, state_dir, "drift", "repair", "--apply", **slow)
    writer = Writer(db.url)
    daemon: DaemonProcess | None = None
    try:
        wait_until(lambda: (db.scalar(BUILT) or 0) >= 400, 60)
        owner = db.rows(POSITION, ("notes#v2",))[0][2]
        assert owner.startswith("drift-repair@")
        writer.start()
        daemon = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
        wait_until(lambda: (db.scalar(BUILT) or 0) >= 1_600, 60)
        assert not daemon.has_logged("version.build_started")
        assert not daemon.has_logged("version.build_resumed")
        assert db.rows(POSITION, ("notes#v2",))[0][2] == owner  # still the command's
        command.send_signal(signal.SIGKILL)
        command.wait(10)
        stopped_at = db.scalar(BUILT)
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        assert daemon.has_logged("version.build_resumed")
        assert not daemon.has_logged("version.build_started")
        assert stopped_at >= 1_600
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
    finally:
        writer.done.set()
        if command.poll() is None:
            command.kill()
        if daemon is not None:
            daemon.stop()
    both_copies_exact(db)


# -- 4. rollback under a writer --------------------------------------------------------------------


def test_a_rollback_under_a_writer_each_copy_stays_its_checkpoints_fold(
    db: TestDatabase, state_dir: Path
) -> None:
    """Suspicion: a rollback to the replaced tables, while events keep coming, swaps in a copy
    that misses or doubles the events committed during its catch-up, or leaves the rebuilt copy
    (now kept) out of step with its checkpoint."""
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 3_000)
    env = env_for(db, V2, state_dir)
    slow = daemon_env({"TEST_NOTES_SLOW": "0.05"})
    writer = Writer(db.url)
    with DaemonProcess(db.url, V2, state_dir, extra_env=slow):
        wait_until(lambda: sum(r["events"] for r in table(db)) == 3_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V2)
        writer.start()
        ask(state_dir, "drift_repair", apply=True)
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        done = run_cli("rollback", "notes", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(int(r["events"]) for r in table(db)) == noted(db), 60)
    assert rows_of(db, "public") == v2_fold(db)
    assert db.scalar("SELECT pg_typeof(value)::text FROM notes LIMIT 1") == "text"  # the old one
    [(version, role, schema)] = kept(db)
    assert (version, role) == (2, "kept")
    assert rows_of(db, schema) == v2_fold_at(db, "notes#v2")


# -- 5. a version bump while a rebuild of the serving version runs ---------------------------------


BUILT_V1 = "SELECT applied_total FROM projectord.projection_positions WHERE name = 'notes#v1'"
BUILT_V2_OF = "SELECT applied_total FROM projectord.projection_positions WHERE name = 'notes#v2'"


@pytest.mark.parametrize("first", ["repair", "bump"])
def test_a_version_bump_and_a_drift_rebuild_at_once_leave_one_consistent_kept_copy(
    db: TestDatabase, state_dir: Path, first: str
) -> None:
    """Suspicion: version 1 is being rebuilt (a drift repair) when a daemon of version 2 starts
    and builds version 2, or the repair is asked while version 2 builds; whichever swaps first,
    the other's swap (or the rebuild given up) leaves version 1's kept copy out of step with its
    checkpoint `notes#v1`, a stray schema, or v2's table wrong."""
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 4_000)
    d1, d2 = state_dir / "v1", state_dir / "v2"
    d1.mkdir()
    d2.mkdir()
    slow = daemon_env({"TEST_NOTES_SLOW": "0.05"})
    writer = Writer(db.url)
    one = DaemonProcess(db.url, V1, d1, extra_env=slow).wait_started()
    two: DaemonProcess | None = None
    try:
        wait_until(lambda: sum(int(r["events"]) for r in table(db)) == 4_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V1)
        writer.start()
        if first == "repair":
            ask(d1, "drift_repair", apply=True)
            wait_until(lambda: (db.scalar(BUILT_V1) or 0) >= 600, 60)
            two = DaemonProcess(db.url, V2, d2, extra_env=slow).wait_started()
        else:
            two = DaemonProcess(db.url, V2, d2, extra_env=slow).wait_started()
            wait_until(lambda: (db.scalar(BUILT_V2_OF) or 0) >= 600, 60)
            ask(d1, "drift_repair", apply=True)
            assert sorted(v for v, r, _ in kept(db) if r == "building") == [1, 2]
        wait_until(lambda: serving_version(db) == 2, 180)
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(int(r["events"]) for r in table(db)) == noted(db), 60)
    finally:
        writer.done.set()
        for d in (one, two):
            if d is not None and d.process.poll() is None:
                d.stop()
    assert table(db) == v2_fold(db)
    rows = kept(db)
    assert [(v, r) for v, r, _ in rows] == [(1, "kept")]
    schema = rows[0][2]
    assert rows_of(db, schema) == v1_fold_at(db, "notes#v1")
    namespaces = db.rows("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'projectord_%'")
    assert namespaces == [(schema,)]
    assert db.scalar("SELECT to_regnamespace(%s)", (replaced_schema("public", "notes", 1),)) is None


# -- 6. dead letters of the replaced tables, and a rollback to them --------------------------------

PENDING = (
    "SELECT count(*) FROM projectord.dead_letters WHERE projection = 'notes'"
    " AND resolved_at IS NULL"
)


def append_values(db: TestDatabase, values: list[int]) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
            " SELECT %s, gen_random_uuid(), 1, 'Noted', jsonb_build_object('key', i %% 20,"
            " 'value', v) FROM unnest(%s::bigint[]) WITH ORDINALITY AS u(v, i)",
            (TENANT, values),
        )


KEPT_PENDING = (
    "SELECT count(*) FROM projectord.dead_letters WHERE projection = 'notes#v2'"
    " AND resolved_at IS NULL"
)
DEAD_LETTER_POLICY = {"PROJECTORD_ON_ERROR": "skip", "PROJECTORD_MAX_ATTEMPTS": "1"}


@contextmanager
def _repaired_with_dead_letters(db: TestDatabase, state_dir: Path) -> Iterator[dict[str, str]]:
    """A daemon of `notes` v2 (on_error skip) has applied 200 events; `value` narrowed by hand
    makes 5 more dead letters; `drift repair` rebuilds the table (applying them) and keeps the
    drifted one, with those 5 dead letters (unit `notes#v2`), as version 2. Yields the CLI's
    environment, the daemon running."""
    db.init(V2)
    append_values(db, [7] * 200)
    with DaemonProcess(db.url, V2, state_dir, extra_env=daemon_env(DEAD_LETTER_POLICY)):
        wait_until(lambda: sum(r["events"] for r in table(db)) == 200, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute("ALTER TABLE notes ALTER COLUMN value TYPE numeric(5, 0)")
        append_values(db, [9] * 40 + [100_000] * 5)  # the last 5 overflow numeric(5, 0)
        wait_until(lambda: db.scalar(PENDING) == 5, 60)
        wait_until(lambda: sum(r["events"] for r in table(db)) == 240, 60)
        ask(state_dir, "drift_repair", apply=True)
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        assert sum(r["events"] for r in table(db)) == 245  # the rebuilt table applied them
        assert (db.scalar(PENDING), db.scalar(KEPT_PENDING)) == (0, 5)  # kept with their tables
        yield env_for(db, V2, state_dir)


def test_a_rollback_to_the_replaced_tables_loses_their_dead_lettered_events_found_by_review(
    db: TestDatabase, state_dir: Path
) -> None:
    """The drift makes the live handler fail on some events (`value` narrowed to numeric(5, 0) by
    hand): with `on_error = "skip"` they become dead letters of `notes`, to be retried once the
    table is fixed. The repair rebuilds the table (the rebuilt one applies them) and keeps the
    drifted one as version 2; the swap resolved the dead letters as `rebuilt`. `rollback notes`
    then brought the drifted table back "caught up": it never applied those events, and no
    pending dead letter said so any more. Every event must be in the table or pending."""
    with _repaired_with_dead_letters(db, state_dir) as env:
        done = run_cli("rollback", "notes", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert db.scalar("SELECT pg_typeof(value)::text FROM notes LIMIT 1") == "numeric"
    applied = sum(r["events"] for r in table(db))
    assert applied + db.scalar(PENDING) == noted(db) == 245
    assert db.scalar(KEPT_PENDING) == 0  # the rebuilt tables, kept now, applied every event


def test_dropping_the_kept_copy_drops_the_dead_letters_kept_with_it(
    db: TestDatabase, state_dir: Path
) -> None:
    """The dead letters a kept copy keeps go with it when it is dropped: no pending dead letter
    is left of tables that no longer exist."""
    with _repaired_with_dead_letters(db, state_dir) as env:
        dropped = run_cli("versions", "drop", "notes", "2", env=env)
        assert dropped.returncode == 0, dropped.stderr
    assert kept(db) == []
    assert (
        db.scalar("SELECT count(*) FROM projectord.dead_letters WHERE projection = 'notes#v2'") == 0
    )


# -- 7. the swap interrupted in its transaction: kill -9, or its session terminated

SWAP_WAITING = (
    "SELECT pid FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'"
    " AND relation = to_regclass('public.notes')"
)


@pytest.mark.parametrize("how", ["kill_9", "terminate"])
def test_a_swap_interrupted_in_its_transaction_loses_and_doubles_nothing(
    db: TestDatabase, state_dir: Path, how: str
) -> None:
    """Suspicion: the swap, interrupted after it locked the live tables, let the build apply the
    last events and stopped the build runner, but before its commit (a reader holds the live
    table, so its ACCESS EXCLUSIVE lock waits), leaves the build runner stopped for good, the
    live runner blocked, or the build's checkpoint ahead of its tables; the next try (the same
    daemon after a terminated session, the next daemon after a kill -9) swaps in a wrong copy."""
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 3_000)
    slow = daemon_env({"TEST_NOTES_SLOW": "0.02"})
    writer = Writer(db.url)
    first = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
    second: DaemonProcess | None = None
    reader = psycopg.connect(db.url)
    try:
        wait_until(lambda: sum(r["events"] for r in table(db)) == 3_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V2)
        writer.start()
        reader.execute("SELECT count(*) FROM notes").fetchone()  # holds ACCESS SHARE
        ask(state_dir, "drift_repair", apply=True)
        wait_until(lambda: bool(db.rows(SWAP_WAITING)), 60)
        [(pid,)] = db.rows(SWAP_WAITING)
        if how == "kill_9":
            first.kill()
        else:
            assert db.scalar("SELECT pg_terminate_backend(%s)", (pid,))
        reader.rollback()
        if how == "kill_9":
            second = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
    finally:
        writer.done.set()
        reader.close()
        for d in (first, second):
            if d is not None and d.process.poll() is None:
                d.stop()
    if second is not None:
        assert second.has_logged("version.build_resumed")
    both_copies_exact(db)


# -- 8. sessions terminated at random during the build and the swap


def test_sessions_terminated_at_random_during_a_drift_rebuild_lose_and_double_nothing(
    db: TestDatabase, state_dir: Path
) -> None:
    """Suspicion: the daemon losing connections (its ownership session, the build's control
    connection, pooled batch connections) at any moment of the build and the swap makes the live
    and build units run twice, or commits a batch into the other unit's tables."""
    import random
    import time

    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 4_000)
    # 20 batches of 200 at 0.1 s each: the build takes 2 s at the very least on any machine, and a
    # termination comes at most every 0.25 s (plus a query), so at least 6 land before the swap.
    # At 0.02 s a batch a fast machine finished the build after 5 (CI, stop 21).
    slow = daemon_env({"TEST_NOTES_SLOW": "0.1"})
    dirs = [state_dir / "a", state_dir / "b"]
    for d in dirs:
        d.mkdir()
    writer = Writer(db.url)
    daemons = [DaemonProcess(db.url, V2, d, extra_env=slow).wait_started() for d in dirs]
    rng = random.Random(16)
    try:
        wait_until(lambda: sum(r["events"] for r in table(db)) == 4_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V2)
        writer.start()
        ask(dirs[0], "drift_repair", apply=True)
        deadline = time.monotonic() + 60
        terminated = 0
        while time.monotonic() < deadline and not (kept(db) and kept(db)[0][1] == "kept"):
            pids = [
                p
                for (p,) in db.rows(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND application_name LIKE 'projectord%%'"
                )
            ]
            if pids:
                db.scalar("SELECT pg_terminate_backend(%s)", (rng.choice(pids),))
                terminated += 1
            time.sleep(rng.uniform(0.05, 0.25))
        assert terminated > 5
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 90)
    finally:
        writer.done.set()
        for d in daemons:
            if d.process.poll() is None:
                d.stop()
    both_copies_exact(db)


# -- 9. a rolling deploy of projectord itself: a daemon of the release before this one


# The release before the versioned drift repair: main as stop 20 left it. A commit, not a branch:
# `main` itself has the repair since it was merged.
PREVIOUS_RELEASE = "2ef0b8c"


def _old_release(tmp: Path) -> Path:
    """projectord as released before this change (PREVIOUS_RELEASE), unpacked into `tmp`."""
    tmp.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "projectord", "sql"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    return tmp


def test_a_daemon_of_the_previous_release_runs_the_live_unit_while_this_one_rebuilds(
    db: TestDatabase, state_dir: Path, tmp_path: Path
) -> None:
    """Suspicion: in a rolling deploy of projectord itself, a daemon of the previous release
    (which knows nothing of a rebuild of the serving version) owns the live unit while a daemon
    of this release builds and swaps; the old live runner goes on applying to the moved (kept)
    tables, or continues from the wrong checkpoint after the exchange."""
    old = _old_release(tmp_path / "old")
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 3_000)
    slow = daemon_env({"TEST_NOTES_SLOW": "0.02"})
    dirs = [state_dir / "old", state_dir / "new"]
    for d in dirs:
        d.mkdir()
    writer = Writer(db.url)
    previous = DaemonProcess(db.url, V2, dirs[0], extra_env={**slow, "PYTHONPATH": str(old)})
    previous.process.kill()  # DaemonProcess puts this branch first: start it again, old code
    previous.process.wait(10)
    env = {
        **os.environ,
        **env_for(db, V2, dirs[0]),
        **slow,
        "PYTHONPATH": str(old),
        "PYTHONDONTWRITEBYTECODE": "",  # its __pycache__ shows which code it imported
        "PROJECTORD_LOG_FORMAT": "json",
        "PROJECTORD_DATABASE_URL": as_daemon_role(db.url),
    }
    log = previous.log_path.open("w")
    previous.process = subprocess.Popen(
        [sys.executable, "-m", "projectord", "run"],  # cwd first on sys.path: the old code
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(old),
    )
    previous._log_file = log
    current: DaemonProcess | None = None
    try:
        previous.wait_started()
        assert (old / "projectord" / "daemon" / "__pycache__").is_dir()  # it runs the old code
        assert not (old / "projectord" / "schema" / "versioned_repair.py").exists()
        wait_until(lambda: sum(r["events"] for r in table(db)) == 3_000, 60)
        assert db.rows(POSITION, ("notes",))[0][2] is not None  # the old daemon owns it
        live_owner = db.rows(POSITION, ("notes",))[0][2]
        current = DaemonProcess(db.url, V2, dirs[1], extra_env=slow).wait_started()
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V2)
        writer.start()
        ask(dirs[1], "drift_repair", apply=True)
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        assert db.rows(POSITION, ("notes",))[0][2] == live_owner  # still the old daemon's
        assert current.has_logged("version.swapped")
        commits = writer.commits
        wait_until(lambda: writer.commits >= commits + 30, 30)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
    finally:
        writer.done.set()
        for d in (previous, current):
            if d is not None and d.process.poll() is None:
                d.stop()
    both_copies_exact(db)


# -- 10. `drift repair` by the code of a version that does not serve

LITE = "tests.integration.test_versioned_repair_review:lite_v"


def _lite_columns(db: TestDatabase) -> list[str]:
    return [
        c
        for (c,) in db.rows(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.lite'::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        )
    ]


@pytest.mark.parametrize(("serving", "code"), [(1, 2), (2, 1)])
def test_a_repair_by_the_code_of_another_version_leaves_the_serving_tables_found_by_review(
    db: TestDatabase, state_dir: Path, serving: int, code: int
) -> None:
    """A rolling deploy: version `serving` of `lite` serves; `drift repair --apply --drop-extra`
    is run from a host with the code of version `code` (newer: a bump being built; older: a host
    not yet upgraded). Its declaration differs from the live table, so it sees drift; fixing the
    serving version's tables to another version's declaration must be refused (docs/evolution.md:
    a version's tables are only ever applied, and changed, by its own code)."""
    db.init(f"{LITE}{serving}")
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
            " SELECT %s, gen_random_uuid(), 1, 'Lited', jsonb_build_object('key', g %% 5,"
            " 'value', g) FROM generate_series(1, 50) g",
            (TENANT,),
        )
    with DaemonProcess(db.url, f"{LITE}{serving}", state_dir):
        wait_until(lambda: db.scalar("SELECT sum(events) FROM lite") == 50, 60)
    assert serving_version_of(db, "lite") == serving
    before = _lite_columns(db)
    projection = LiteV1() if code == 1 else LiteV2()
    for apply in (False, True):  # the dry run too: it would print another version's SQL
        with pytest.raises(Exception, match="drift repair refused, nothing changed: version"):
            repair(db.url, [projection], apply=apply, drop_extra=True)
    assert _lite_columns(db) == before
    assert db.scalar("SELECT sum(events) FROM lite") == 50


def serving_version_of(db: TestDatabase, name: str) -> int | None:
    return db.scalar("SELECT version FROM projectord.projection_positions WHERE name = %s", (name,))


# -- 11. a rollback to a kept copy that lacks a table (the drift was a dropped table) --------------

LEDGER = "tests.support.projections:ledger_only"


def _ledger_repaired_after_a_dropped_table(db: TestDatabase, state_dir: Path) -> DaemonProcess:
    """`ledger` (tables `ledger` and `applied_log`), its `applied_log` dropped by hand and
    repaired by a versioned rebuild: the copy kept as version 1 has `ledger` only. Returns the
    daemon, running."""
    db.init(LEDGER)
    with db.connect(autocommit=True) as conn:
        bulk_credits(conn, 300, accounts=5)
    daemon = DaemonProcess(db.url, LEDGER, state_dir, extra_env=daemon_env()).wait_started()
    wait_until(lambda: db.scalar("SELECT sum(events) FROM ledger") == 300, 60)
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE applied_log")
    ask(state_dir, "drift_repair", apply=True)
    wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 60)
    assert db.scalar("SELECT count(*) FROM applied_log") == 300
    return daemon


def test_a_rollback_to_a_kept_copy_without_the_dropped_table_strands_it_found_by_review(
    db: TestDatabase, state_dir: Path
) -> None:
    """`versions list` offers the copy for a rollback. Whatever `rollback ledger` does, it must
    end, leaving a state an operator can act on: rolled back with every event, or refused with
    the copy still kept (droppable)."""
    env = env_for(db, LEDGER, state_dir)
    daemon = _ledger_repaired_after_a_dropped_table(db, state_dir)
    try:
        try:
            done = run_cli("rollback", "ledger", "--timeout", "20", env=env, timeout=40)
            code, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            code, stderr = -1, "the rollback command did not return"
        rows = [(v, r) for v, r, _ in kept(db)]
        if code == 0:
            assert db.scalar("SELECT sum(events) FROM ledger") == 300
        else:
            assert rows == [(1, "kept")], (stderr, rows)
            assert "lacks table(s) applied_log" in stderr, stderr
            dropped = run_cli("versions", "drop", "ledger", "1", env=env)
            assert dropped.returncode == 0, dropped.stderr
        assert db.scalar("SELECT count(*) FROM applied_log") == 300  # the live one, untouched
    finally:
        daemon.stop()


def test_a_swap_that_always_fails_is_retried_with_a_growing_backoff_found_by_review(
    db: TestDatabase, state_dir: Path
) -> None:
    """The same stranded rollback, seen from the daemon: each try resumes the build, locks the
    live tables, fails on the missing table and starts over. With the backoff the code means to
    use (jittered, 0.1 s doubling to 5 s) a handful of tries fit in 5 s, not dozens. `rollback`
    now refuses that copy, so the rollback is recorded by hand, as `rollback` did before (moved
    where the build of version 1 lives, marked `building`): a swap that fails every time."""
    daemon = _ledger_repaired_after_a_dropped_table(db, state_dir)
    try:
        [(_, _, schema)] = kept(db)
        build = version_schema("public", "ledger", 1)
        with db.connect(autocommit=True) as conn:
            conn.execute(f'ALTER SCHEMA "{schema}" RENAME TO "{build}"')
            conn.execute(
                "UPDATE projectord.projection_versions SET role = 'building', tables_schema = %s"
                " WHERE name = 'ledger' AND version = 1",
                (build,),
            )

        def interrupted() -> list[dict[str, Any]]:
            return [e for e in daemon.log_events() if e.get("event") == "version.build_interrupted"]

        wait_until(lambda: bool(interrupted()), 30)
        import time

        start = time.monotonic()
        wait_until(lambda: time.monotonic() - start >= 5, 10)  # a window to count tries in
        tries = len(interrupted())
    finally:
        daemon.stop()
    assert tries <= 15, f"{tries} failed swaps in about 5 s"


# -- 12. what `drift repair --apply` says when its rebuild is given up


def test_a_repair_whose_rebuild_is_given_up_does_not_say_it_swapped_in_found_by_review(
    db: TestDatabase, state_dir: Path
) -> None:
    """Version 1 serves with a drifted table; `drift repair --apply` (version 1's code) records
    the rebuild of version 1 and waits while the version 1 daemon builds it, slowly. A daemon of
    version 2 starts, builds version 2 quickly and swaps it in: the rebuild of version 1 is given
    up (docs/evolution.md). The command must not report a rebuild that never swapped in."""
    db.init(V1)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 3_000)
    d1, d2 = state_dir / "v1", state_dir / "v2"
    d1.mkdir()
    d2.mkdir()
    one = DaemonProcess(db.url, V1, d1, extra_env=daemon_env()).wait_started()
    two: DaemonProcess | None = None
    command = None
    try:
        wait_until(lambda: sum(int(r["events"]) for r in table(db)) == 3_000, 60)
        one.stop()
        one = DaemonProcess(
            db.url, V1, d1, extra_env=daemon_env({"TEST_NOTES_SLOW": "0.3"})
        ).wait_started()
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V1)
        command = cli_process(db, V1, d1, "drift", "repair", "--apply")
        wait_until(lambda: (db.scalar(BUILT_V1) or 0) >= 200, 60)
        two = DaemonProcess(db.url, V2, d2, extra_env=daemon_env()).wait_started()
        wait_until(lambda: serving_version(db) == 2, 120)
        _, stderr = command.communicate(timeout=60)
        assert (1, "kept") in [(v, r) for v, r, _ in kept(db)]
        assert table(db) == v2_fold(db)
    finally:
        if command is not None and command.poll() is None:
            command.kill()
        for d in (one, two):
            if d is not None and d.process.poll() is None:
                d.stop()
    assert command.returncode == 1, stderr
    assert "was given up, nothing swapped in: version 2 serves now" in stderr, stderr


# -- 13. kill -9 during a rollback to the replaced tables


def test_kill_9_during_a_rollback_to_the_replaced_tables_the_next_daemon_finishes_it(
    db: TestDatabase, state_dir: Path
) -> None:
    """Suspicion: a daemon killed -9 while it catches the replaced tables up (a rollback after a
    drift repair) leaves them half caught up under a checkpoint that says otherwise, or the next
    daemon rebuilds from scratch (dropping the copy it was to bring back)."""
    db.init(V2)
    with db.connect(autocommit=True) as conn:
        bulk_notes(conn, 1_000)
    slow = daemon_env({"TEST_NOTES_SLOW": "0.05"})
    first = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
    second: DaemonProcess | None = None
    writer = Writer(db.url)
    try:
        wait_until(lambda: sum(r["events"] for r in table(db)) == 1_000, 60)
        with db.connect(autocommit=True) as conn:
            conn.execute(DRIFT_V2)
        ask(state_dir, "drift_repair", apply=True)
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 60)
        [(_, _, replaced)] = kept(db)
        drifted = db.scalar(f"SELECT '{replaced}.notes'::regclass::oid")
        with db.connect(autocommit=True) as conn:
            bulk_notes(conn, 3_000)  # the replaced tables have all of these to catch up
        wait_until(lambda: sum(r["events"] for r in table(db)) == noted(db), 60)
        kept_at = int(db.scalar(BUILT))
        writer.start()
        ask(state_dir, "rollback", name="notes")
        wait_until(lambda: int(db.scalar(BUILT) or 0) >= kept_at + 800, 60)
        first.kill()
        assert [(v, r) for v, r, _ in kept(db)] == [(2, "building")]
        second = DaemonProcess(db.url, V2, state_dir, extra_env=slow).wait_started()
        wait_until(lambda: kept(db) and kept(db)[0][1] == "kept", 120)
        writer.done.set()
        writer.join()
        wait_until(lambda: sum(int(r["events"]) for r in table(db)) == noted(db), 60)
    finally:
        writer.done.set()
        for d in (first, second):
            if d is not None and d.process.poll() is None:
                d.stop()
    assert second.has_logged("version.build_resumed")
    assert not second.has_logged("version.build_started")
    assert db.scalar("SELECT 'public.notes'::regclass::oid") == drifted  # that very table
    assert rows_of(db, "public") == v2_fold(db)
    [(_, _, schema)] = kept(db)
    assert rows_of(db, schema) == v2_fold_at(db, "notes#v2")
