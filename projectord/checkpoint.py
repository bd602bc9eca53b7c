"""The checkpoint: how far a projection has applied the event history, in commit order.

Events are ordered by the transaction that appended them, then by their position within it:
`(transaction_id, global_position)`. A checkpoint is such a pair; a projection has applied every
event at or below it. It is a tuple, so checkpoints and plain `(transaction, position)` tuples
compare alike, in that order. The positions table stores it (projectord/runner/checkpoint_store.py
is the only module that reads or writes it).
"""

from __future__ import annotations

from typing import NamedTuple


class Checkpoint(NamedTuple):
    """A point in commit order: after the event `global_position` of transaction
    `transaction_id`, and before every later one."""

    transaction_id: int
    global_position: int

    @classmethod
    def parse(cls, transaction_id: int | str, global_position: int) -> Checkpoint:
        """From a row: the transaction id arrives as text (an `xid8` read as `::text`)."""
        return cls(int(transaction_id), int(global_position))

    @classmethod
    def at_horizon(cls, horizon: int) -> Checkpoint:
        """Past every event of the transactions below `horizon` and before any of `horizon`'s own
        (positions start at 1): where a projection may move once it has seen everything a
        snapshot whose oldest open transaction is `horizon` shows."""
        return cls(horizon, 0)


START = Checkpoint(0, 0)  # before the first event: a new projection's, and a rebuilt one's
