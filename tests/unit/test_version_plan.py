"""Which units of work a daemon's code may own, per projection and version
(projectord/daemon/versions.py): the rule that keeps old and new code off each other's tables."""

from __future__ import annotations

from datetime import UTC, datetime

from projectord.daemon.versions import eligible_units
from projectord.runner.version_store import (
    VersionRow,
    replaced_schema,
    version_row_name,
    version_schema,
)

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def row(version: int, role: str) -> VersionRow:
    return VersionRow("notes", version, role, version_schema("public", "notes", version), NOW)


def test_the_serving_version_runs_live_and_builds_nothing() -> None:
    assert eligible_units({"notes": 2}, {"notes": 2}, {}) == {"notes"}
    assert eligible_units({"notes": 3}, {}, {}) == {"notes"}  # nothing recorded: a fresh start


def test_newer_code_builds_and_never_runs_the_older_tables() -> None:
    assert eligible_units({"notes": 2}, {"notes": 1}, {}) == {"notes#v2"}


def test_older_code_runs_nothing_unless_a_rollback_to_it_was_asked() -> None:
    kept = {"notes": [row(1, "kept")]}
    assert eligible_units({"notes": 1}, {"notes": 2}, kept) == set()
    asked = {"notes": [row(1, "building")]}
    assert eligible_units({"notes": 1}, {"notes": 2}, asked) == {"notes#v1"}
    # A rollback to another version is not this code's to run.
    assert eligible_units({"notes": 1}, {"notes": 3}, {"notes": [row(2, "building")]}) == set()


def test_a_rebuild_of_the_serving_version_runs_beside_the_live_runner() -> None:
    """A versioned drift repair (or a rollback to the tables it replaced): the same code runs
    the live tables on and builds the new ones; a kept copy alone asks for nothing."""
    asked = {"notes": [row(2, "building")]}
    assert eligible_units({"notes": 2}, {"notes": 2}, asked) == {"notes", "notes#v2"}
    assert eligible_units({"notes": 2}, {"notes": 2}, {"notes": [row(2, "kept")]}) == {"notes"}
    assert eligible_units({"notes": 2}, {}, asked) == {"notes"}  # nothing serves: nothing to swap


def test_names_of_versions_and_their_schemas() -> None:
    assert version_row_name("notes", 2) == "notes#v2"
    schema = version_schema("public", "notes", 2)
    assert schema.startswith("projectord_v_") and len(schema) <= 63
    assert schema != version_schema("public", "notes", 1)
    assert replaced_schema("public", "notes", 2) not in (
        schema,
        version_schema("public", "notes", 1),
    )
    assert schema != version_schema("reads", "notes", 2)
