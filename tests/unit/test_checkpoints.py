"""Checkpoint arithmetic: commit positions `(transaction_id, global_position)` and their order,
what a batch says about where the checkpoint may go, the read-ahead's position check, and how a
fetch sizes itself. The checkpoint type is a plain tuple today (`fetcher.Checkpoint`,
`catch_up.Position`); these tests go through the public names that use it."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from projectord.event_store import Event
from projectord.fetcher import Batch, Fetcher, ReadAhead
from projectord.queries import Queries

positions = st.tuples(st.integers(1, 2**40), st.integers(1, 2**40))


def event(transaction_id: int, global_position: int) -> Event:
    return Event(
        global_position, uuid.uuid4(), uuid.UUID(int=0), uuid.UUID(int=1), "", 1, "T", "{}",
        "{}", 0, transaction_id,
    )  # fmt: skip


@given(a=positions, b=positions)
def test_commit_order_is_by_transaction_first_then_position(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    """An event of a later transaction comes after, whatever its global position: positions are
    taken at insert, but a transaction's events become visible in commit order."""
    first, second = event(*a).commit_position, event(*b).commit_position
    assert first == a and second == b
    if a[0] != b[0]:
        assert (first < second) is (a[0] < b[0])
    else:
        assert (first < second) is (a[1] < b[1])


def test_a_later_transaction_with_a_lower_position_is_past_the_target() -> None:
    """What `catch_up.wait_for_positions` relies on: a checkpoint at or past a target."""
    target = event(10, 500).commit_position
    assert event(11, 400).commit_position >= target
    assert event(10, 500).commit_position >= target
    assert not event(10, 499).commit_position >= target


@given(st.lists(positions, min_size=1, max_size=20, unique=True))
def test_a_batch_ends_at_its_last_event_in_commit_order(found: list[tuple[int, int]]) -> None:
    events = sorted((event(*p) for p in found), key=lambda e: e.commit_position)
    batch = Batch(events, horizon=0, held_back=False, limit=len(events))
    assert batch.last == max(found)
    assert all(e.commit_position <= batch.last for e in events)


@given(count=st.integers(0, 50), limit=st.integers(1, 50), cut=st.booleans())
def test_only_a_batch_with_room_left_and_not_cut_is_short(
    count: int, limit: int, cut: bool
) -> None:
    """A short batch moves the checkpoint up to the horizon (every event below it was seen); a
    batch stopped by the byte bound, or full, must not."""
    batch = Batch([event(1, i) for i in range(1, count + 1)], 0, False, limit, cut=cut)
    assert batch.short is (count < limit and not cut)


def test_a_batch_remembers_the_limit_it_was_read_with() -> None:
    """A reload may lower batch_size between read and apply: 10 events read with limit 10 are a
    full batch, not a short one under a new limit of 20."""
    batch = Batch([event(1, i) for i in range(1, 11)], 0, False, limit=10)
    assert not batch.short


def test_a_batch_read_ahead_is_used_only_from_the_position_it_was_read_from() -> None:
    ahead = ReadAhead(Fetcher(Queries("projectord"), ["T"]), pool=None)  # type: ignore[arg-type]
    batch = Batch([event(5, 50)], 0, False, 10)
    ahead._after, ahead._batch = (4, 40), batch
    assert ahead.take((4, 41)) is None  # the runner moved (a skip, a rebuild): thrown away
    assert ahead.take((4, 40)) is None  # ...and not kept for later
    ahead._after, ahead._batch = (4, 40), batch
    assert ahead.take((4, 40)) is batch
    assert ahead.used == 1


@given(
    limit=st.integers(1, 100_000),
    max_bytes=st.integers(2**10, 2**31 - 1),
    per_event=st.integers(0, 2**31),
)
def test_rows_asked_when_reading_by_bytes_stay_within_the_limit_and_cover_the_bound(
    limit: int, max_bytes: int, per_event: int
) -> None:
    fetcher = Fetcher(Queries("projectord"), ["T"])
    fetcher._bytes_per_event = per_event
    rows = fetcher._rows_for(limit, max_bytes)
    assert 1 <= rows <= limit
    if per_event and rows < limit:
        # Fewer rows than the limit only when they already hold more than the byte bound.
        assert rows * per_event >= max_bytes
