"""Rebuilds never corrupt or double a read model (issue 12 §4, §5).

- Online: a handler that writes a live table by its schema-qualified name escapes the shadow's
  search_path; the shadow's guard rolls that batch back and aborts the rebuild, naming the table,
  while the live runner keeps applying to the live tables.
- Online: the shadow runs under the projection's own error policy and pipeline setting, over the
  configured defaults.
- Offline: a projection seen writing a table it does not declare is not rebuilt (a rebuild does not
  empty that table, so every event would be applied to it again) unless the operator confirms.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from psycopg_pool import AsyncConnectionPool

from projectord.config import load_settings
from projectord.runner.error_policy import ErrorPolicy
from projectord.schema.online_rebuild import _OnlineRebuild
from tests.support.drift_support import cli_env
from tests.support.harness import (
    DaemonProcess,
    TestDatabase,
    bulk_credits,
    credits,
    run_cli,
    wait_until,
)
from tests.support.ops_support import ask_error, cli
from tests.support.rebuild_projections import Skippy

QUALIFIED = "tests.support.rebuild_projections:qualified"
AUDITED = "tests.support.rebuild_projections:audited"
SKIPPY = "tests.support.rebuild_projections:skippy"
ACCOUNTS = 50


def expected_sum(count: int) -> int:
    """What `bulk_credits` of `count` events adds up to."""
    return sum(1 + g % 7 for g in range(1, count + 1))


def totals(db: TestDatabase, table: str) -> tuple[int, int]:
    """(rows, sum of total) of a totals table."""
    row = db.rows(f"SELECT count(*), coalesce(sum(total), 0) FROM {table}")[0]
    return int(row[0]), int(row[1])


def leftovers(db: TestDatabase) -> tuple[int, list[str]]:
    """Shadow or retired schemas left behind, and the checkpoint rows."""
    schemas = db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projectord_%'")
    names = [n for (n,) in db.rows("SELECT name FROM projectord.projection_positions")]
    return int(schemas), names


def test_online_rebuild_stops_when_the_handler_writes_a_live_table_by_qualified_name(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(QUALIFIED)
    with db.connect(autocommit=True) as conn:
        bulk_credits(conn, 3_000, accounts=ACCOUNTS)
    before = (ACCOUNTS, expected_sum(3_000))
    with DaemonProcess(db.url, QUALIFIED, state_dir):
        wait_until(lambda: totals(db, "qualified_totals") == before, 60)
        rebuilt = run_cli("rebuild", "qualified", "--online", env=cli_env(db.url, QUALIFIED))
        assert rebuilt.returncode == 1, rebuilt.stdout
        error = rebuilt.stderr.strip().splitlines()[-1]
        assert error.startswith(
            "projectord: projection 'qualified' wrote public.qualified_totals during its online"
            " rebuild"
        ), error
        assert totals(db, "qualified_totals") == before  # the live data is untouched
        with db.connect(autocommit=True) as conn:  # and the live runner keeps applying
            bulk_credits(conn, 700, accounts=ACCOUNTS)
        wait_until(lambda: totals(db, "qualified_totals")[1] == expected_sum(3_700), 30)
    assert leftovers(db) == (0, ["qualified"])


def test_the_shadow_runs_under_the_projections_error_policy_and_the_configured_defaults(
    db: TestDatabase,
) -> None:
    """`Skippy` says on_error = "skip"; the configuration says max_attempts = 1. The poison event
    is dead-lettered after one attempt, for the projection (not its shadow), and the rebuild
    swaps in the other 19 events."""
    db.init(SKIPPY)
    credits(db, 20, poison_at=10)
    poison = db.scalar("SELECT event_id FROM projectord.events WHERE payload ? 'poison'")
    env = cli_env(db.url, SKIPPY) | {"PROJECTORD_MAX_ATTEMPTS": "1"}
    rebuilt = run_cli("rebuild", "skippy", "--online", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert db.scalar("SELECT count(*) FROM picky_seen") == 19
    letters = db.rows(
        "SELECT projection, event_id, attempts, resolved_at IS NULL FROM projectord.dead_letters"
    )
    assert letters == [("skippy", poison, 1, True)]
    assert leftovers(db) == (0, ["skippy"])


def test_the_shadow_runner_has_the_live_runners_settings() -> None:
    settings = load_settings(
        None, database_url="postgresql://nowhere", max_attempts=3, handler_timeout=9.0
    )

    async def shadow_runner() -> None:
        pool = AsyncConnectionPool("postgresql://nowhere", open=False)
        runner = _OnlineRebuild("postgresql://nowhere", settings, Skippy()).shadow_runner(pool)
        assert runner.policy == ErrorPolicy(on_error="skip", max_attempts=3, handler_timeout=7.0)
        assert runner.projection.pipeline is False
        assert runner.batches.observe_writes is False  # the guard checks every batch instead

    anyio.run(shadow_runner)


def test_offline_rebuild_refuses_a_projection_that_writes_undeclared_tables(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(AUDITED)
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE audit_sums (account bigint PRIMARY KEY, total bigint NOT NULL)")
        bulk_credits(conn, 3_000, accounts=ACCOUNTS)
    before = (ACCOUNTS, expected_sum(3_000))
    with DaemonProcess(db.url, AUDITED, state_dir):
        wait_until(lambda: totals(db, "audit_sums") == before, 60)
        refused = cli(state_dir, "rebuild", "audited", "--wait")
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            "projectord: refusing to rebuild audited: it writes public.audit_sums, not among its"
            " declared tables, which a rebuild does not empty, so every event would be applied"
            " to it again; declare the table in the projection's `tables`, or empty it yourself"
            " and confirm with --allow-undeclared"
        ]
        assert ask_error(state_dir, "rebuild", name="audited").code == "undeclared_tables"
        assert totals(db, "audited_totals") == totals(db, "audit_sums") == before

        with db.connect(autocommit=True) as conn:  # the operator empties it, then confirms
            conn.execute("TRUNCATE audit_sums")
        confirmed = cli(state_dir, "rebuild", "audited", "--wait", "--allow-undeclared")
        assert confirmed.returncode == 0, confirmed.stderr
        assert totals(db, "audited_totals") == totals(db, "audit_sums") == before
        # The rebuild saw the undeclared table again: the next one is refused too.
        assert cli(state_dir, "rebuild", "audited").returncode == 1
    online = run_cli(
        "rebuild", "audited", "--online", "--allow-undeclared", env=cli_env(db.url, AUDITED)
    )
    assert online.returncode == 2 and "is for the offline rebuild" in online.stderr
