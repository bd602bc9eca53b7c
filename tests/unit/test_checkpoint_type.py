"""The checkpoint's arithmetic: commit order, the horizon, parsing a positions row. No PostgreSQL.

A checkpoint compared in the wrong order would skip events or apply them twice; these pin the
order the runner, `wait` and the dead-letter retry rely on."""

from __future__ import annotations

from datetime import UTC, datetime

from projectord.checkpoint import START, Checkpoint
from projectord.runner.checkpoint_store import StoredPosition


def test_commit_order_is_the_transaction_first_then_the_position() -> None:
    # A later transaction's event may have a lower global position (it took its identity value
    # first, committed last): it still comes after.
    assert Checkpoint(5, 900) < Checkpoint(6, 10)
    assert Checkpoint(6, 10) < Checkpoint(6, 11)
    assert sorted([Checkpoint(6, 11), Checkpoint(5, 900), Checkpoint(6, 10)]) == [
        Checkpoint(5, 900),
        Checkpoint(6, 10),
        Checkpoint(6, 11),
    ]


def test_a_checkpoint_compares_with_a_plain_commit_position() -> None:
    """Targets and stored values meet as tuples too (an event's commit position, a status row)."""
    assert Checkpoint(7, 3) == (7, 3)
    assert Checkpoint(7, 3) >= (7, 3)
    assert Checkpoint(7, 3) < (7, 4)
    txid, position = Checkpoint(7, 3)
    assert (txid, position) == (7, 3)


def test_the_start_is_before_every_event() -> None:
    assert START == (0, 0)
    assert START < Checkpoint(1, 1)


def test_the_horizon_is_past_every_older_transaction_and_before_its_own() -> None:
    horizon = Checkpoint.at_horizon(100)
    assert Checkpoint(99, 10**12) < horizon  # every event of an older transaction is passed
    assert horizon < Checkpoint(100, 1)  # the horizon's own transaction may still commit
    # After a short batch the runner moves to the later of the horizon and the last event.
    assert max(horizon, Checkpoint(99, 5)) == horizon
    assert max(horizon, Checkpoint(100, 5)) == Checkpoint(100, 5)


def test_parse_reads_the_transaction_id_as_text() -> None:
    """An xid8 is read as text: it may exceed a bigint, and must still order as a number."""
    big = 2**63 + 5
    checkpoint = Checkpoint.parse(str(big), 42)
    assert checkpoint == Checkpoint(big, 42)
    assert Checkpoint.parse("9", 1) < Checkpoint.parse("10", 1)  # not compared as strings


def test_a_positions_row_becomes_a_stored_position() -> None:
    updated = datetime(2026, 1, 1, tzinfo=UTC)
    error = {"type": "ValueError", "message": "bad"}
    row = ("balances", "1234", 56, "failed", 78, error, updated, "host-1", 2)
    stored = StoredPosition.of_row(row)
    assert stored == StoredPosition(
        "balances", Checkpoint(1234, 56), "failed", 78, error, updated, "host-1", 2
    )
    assert isinstance(stored.checkpoint, Checkpoint)
