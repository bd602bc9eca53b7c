"""The docs' examples that need a database: README.md and docs/*.md.

How examples are marked (tests/support/doc_examples.py has the details):

- Fenced ```python and ```sh blocks are examples and are run; ```text, ```console, ```sql,
  ```toml and untagged blocks are output, fragments or other languages, and are not.
- `<!-- docs-test: database -->` on the line before a fence: run here, against a fresh migrated
  test database; `<!-- docs-test: daemon -->`: the same, with `projectord run` running the
  README's minimal projection on it. `<!-- docs-test: skip (why) -->`: not run. Unmarked blocks
  run in the unit tier (tests/unit/test_docs.py), and here again before a page's database
  blocks, which may use them.
- A page's Python blocks run in order in one namespace; top-level `await` is allowed, and `conn`
  is an autocommit psycopg `AsyncConnection`. Shell blocks run in a temporary directory with
  `PROJECTORD_DATABASE_URL` and `PROJECTORD_STATE_DIR` (the daemon's, if one runs) set, and the
  README's minimal projection as `PROJECTORD_PROJECTIONS`.

Beyond running the blocks, one test runs the README's minimal projection under the real daemon
while the README's command example dispatches commands, and checks the read model the README
promises.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from projectord.database import connect
from tests.support.doc_examples import (
    PAGES,
    Example,
    examples,
    new_namespace,
    run_python,
    run_shell,
    write_readme_projection,
)
from tests.support.harness import ROOT, DaemonProcess, TestDatabase, as_daemon_role, wait_until


def _database_examples(tag: str) -> list[Example]:
    return [e for page in PAGES for e in examples(page) if e.tag == tag and e.needs_database]


def _ids(items: list[Example]) -> list[str]:
    return [item.where for item in items]


async def _run_session(page: Path, url: str, upto: Example | None = None) -> dict[str, Any]:
    """Run `page`'s Python blocks that run (unmarked and database) in order, in one namespace,
    with `conn` on `url`; stop after `upto` if given. Return the namespace."""
    namespace = new_namespace(page)
    async with await connect(url, autocommit=True) as conn:
        namespace["conn"] = conn
        for block in examples(page):
            if block.tag == "python" and block.runs:
                await run_python(block, namespace)
            if block == upto:
                break
    return namespace


def _readme_daemon(db: TestDatabase, state_dir: Path, tmp_path: Path) -> DaemonProcess:
    """`projectord run` with the README's minimal projection (written into `tmp_path`)."""
    spec = write_readme_projection(tmp_path)
    path = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return DaemonProcess(db.url, spec, state_dir, extra_env=path)


DATABASE_PYTHON = _database_examples("python")


@pytest.mark.parametrize("example", DATABASE_PYTHON, ids=_ids(DATABASE_PYTHON))
def test_python_example_runs_against_a_database(
    example: Example, db: TestDatabase, state_dir: Path, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if example.marker == "daemon":
            stack.enter_context(_readme_daemon(db, state_dir, tmp_path))
        anyio.run(_run_session, example.page, as_daemon_role(db.url), example)
    if "dispatch(" in example.text:
        # An example that dispatches leaves its commands stored, and decided.
        stored, undecided = db.rows(
            "SELECT count(*), count(*) FILTER (WHERE status = 'pending') FROM projectord.commands"
        )[0]
        assert stored > 0 and undecided == 0


DATABASE_SHELL = _database_examples("sh")


@pytest.mark.parametrize("example", DATABASE_SHELL, ids=_ids(DATABASE_SHELL))
def test_shell_example_runs_against_a_database(
    example: Example, db: TestDatabase, state_dir: Path, tmp_path: Path
) -> None:
    spec = write_readme_projection(tmp_path)
    env = {
        "PROJECTORD_DATABASE_URL": as_daemon_role(db.url),
        "PROJECTORD_PROJECTIONS": spec,
        "PROJECTORD_STATE_DIR": str(state_dir),
    }
    with contextlib.ExitStack() as stack:
        if example.marker == "daemon":
            stack.enter_context(_readme_daemon(db, state_dir, tmp_path))
        result = run_shell(example, tmp_path, env=env)
    assert result.returncode == 0, f"{example.where}:\n{result.stdout}\n{result.stderr}"


def test_readme_projection_applies_the_readme_commands_under_the_daemon(
    db: TestDatabase, state_dir: Path, tmp_path: Path
) -> None:
    """The README's two examples together: its projection, run by `projectord run`, folds the
    events its command example appends; the balance the README states is the one read."""
    with _readme_daemon(db, state_dir, tmp_path):
        namespace = anyio.run(_run_session, ROOT / "README.md", as_daemon_role(db.url))
        account_id = namespace["account_id"]

        def balance() -> Any:
            return db.scalar("SELECT balance FROM balances WHERE account_id = %s", (account_id,))

        wait_until(lambda: balance() == 70, timeout=30)
    # The read model equals a fold of the event store, for every account, not only that one.
    folded = db.rows(
        "SELECT aggregate_id, sum(CASE type WHEN 'Deposited' THEN 1 ELSE -1 END"
        " * (payload->>'amount')::bigint) FROM projectord.events GROUP BY 1 ORDER BY 1"
    )
    assert folded == db.rows("SELECT account_id, balance FROM balances ORDER BY 1")
    assert "The `Balances` projection above then shows 70" in (ROOT / "README.md").read_text()
