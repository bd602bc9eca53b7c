"""What bounds a batch, and what a batch's bounds mean for the checkpoint.

A batch is bounded by `batch_size` (events) and `batch_max_bytes` (payload and metadata as JSON
text); the batch read ahead counts against the same byte bound. A batch that stopped at either
bound is full, never short: only a short batch moves the checkpoint to the horizon, and "short"
is judged against the bounds the batch was read with, not those in force when it is applied
(a SIGHUP may change them in between).
"""

from __future__ import annotations

import random
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from projectord.fetcher import Batch
from projectord.queries import Queries
from projectord.runner.loop import ProjectionRunner
from tests.integration.test_fetcher import run_runner
from tests.support.batch_projections import Documents
from tests.support.harness import DaemonProcess, TestDatabase, append_sql, bulk_credits, wait_until

EVENTS = 20_000
# Growing sizes are what lost events: a full batch read with the old, smaller size looked short.
RELOADED_SIZES = (
    "batch_size = 80",
    "batch_size = 130",
    "batch_size = 70",
    "batch_size = 160",
    "batch_size = 200",
)
# The byte bound changed as well: batches cut by bytes (about 30 bytes an event here) between
# batches cut by count, each applied with the bounds it was read with.
RELOADED_BOUNDS = (
    'batch_size = 80\nbatch_max_bytes = "2KiB"',
    'batch_size = 130\nbatch_max_bytes = "32MiB"',
    'batch_size = 70\nbatch_max_bytes = "1KiB"',
    'batch_size = 160\nbatch_max_bytes = "3KiB"',
    'batch_size = 200\nbatch_max_bytes = "32MiB"',
)

LAG = """
SELECT count(*) FROM projectord.events e, projectord.projection_positions p
WHERE p.name = %s AND e.type = 'Credited'
  AND (e.transaction_id, e.global_position) > (p.transaction_id, p.global_position)
"""


def lag(db: TestDatabase, name: str = "ledger") -> int:
    return int(db.scalar(LAG, (name,)))


def applied(db: TestDatabase) -> int:
    return int(db.scalar("SELECT count(*) FROM applied_log"))


@pytest.mark.parametrize("reloads", [RELOADED_SIZES, RELOADED_BOUNDS], ids=["size", "bytes"])
def test_batch_bounds_changed_by_sighup_during_a_catch_up_lose_nothing(
    db: TestDatabase, state_dir: Path, reloads: tuple[str, ...]
) -> None:
    specs = "tests.support.batch_projections:paced_ledger"
    db.init(specs)
    with db.connect(autocommit=True) as conn:
        bulk_credits(conn, EVENTS)
    config = state_dir / "projectord.toml"
    config.write_text("batch_size = 50\n")
    with DaemonProcess(db.url, specs, state_dir, args=["--config", str(config)]) as daemon:
        for reloaded, settings in enumerate(reloads, start=1):
            before = applied(db)
            # Reload in the middle of the catch-up: after some batches, before the end.
            wait_until(lambda b=before: applied(db) >= b + 1000 or lag(db) == 0, timeout=60)
            config.write_text(settings + "\n")
            daemon.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda n=reloaded: (
                    sum(e["event"] == "config.reloaded" for e in daemon.log_events()) >= n
                ),
                timeout=10,
            )
        assert applied(db) < EVENTS, "the catch-up ended before the reloads: nothing was tested"
        wait_until(lambda: lag(db) == 0, timeout=120)
        assert daemon.stop() == 0
    assert applied(db) == EVENTS, f"{EVENTS - applied(db)} events never applied"
    assert db.scalar("SELECT count(DISTINCT event_id) FROM applied_log") == EVENTS
    expected = db.scalar(
        "SELECT sum((payload->>'amount')::bigint) FROM projectord.events WHERE type = 'Credited'"
    )
    assert db.scalar("SELECT sum(total) FROM ledger") == expected


QUERIES = Queries("projectord")
# Per batch: its events and their bytes as the fetch counts them (payload and metadata text).
BATCHES = """
SELECT a.batch_xid::text, count(*), sum(octet_length(e.payload::text)
                                        + octet_length(e.metadata::text))
FROM document_applies a JOIN projectord.events e USING (event_id)
GROUP BY a.batch_xid ORDER BY min(e.global_position)
"""


def document(db: TestDatabase, aggregate: uuid.UUID, version: int, size: int) -> None:
    with db.connect(autocommit=True) as conn:
        body = f"{aggregate}:{version}:".ljust(size, "x")
        append_sql(conn, "Documented", {"body": body}, aggregate_id=aggregate, version=version)


def apply_documents(
    db: TestDatabase, runner_class: type[ProjectionRunner] = ProjectionRunner, **settings: Any
) -> ProjectionRunner:
    """Run a `Documents` runner in this process until its checkpoint has passed the last
    `Documented` event (a checkpoint that jumps over events gets there too, and the checks after
    it say what was lost)."""
    last = db.rows(
        "SELECT e.transaction_id::text::bigint, e.global_position FROM projectord.events e"
        " WHERE e.type = 'Documented'"
        " ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1"
    )[0]

    async def done(runner: ProjectionRunner) -> bool:
        return runner.status.checkpoint >= last

    return run_runner(
        db,
        lambda pool: runner_class(Documents(), pool, QUERIES, poll_interval=60, **settings),
        done,
    )


def assert_applied_once(db: TestDatabase) -> None:
    total = db.scalar("SELECT count(*) FROM projectord.events WHERE type = 'Documented'")
    assert db.scalar("SELECT count(*) FROM document_applies") == total
    assert db.scalar("SELECT count(DISTINCT event_id) FROM document_applies") == total


def test_an_event_larger_than_the_byte_bound_is_applied_alone(db: TestDatabase) -> None:
    db.init("tests.support.batch_projections:documents")
    sizes = [100] * 10 + [50_000] + [100] * 10
    for size in sizes:
        document(db, uuid.uuid4(), 1, size)
    apply_documents(db, batch_size=100, batch_max_bytes=16_384)
    assert_applied_once(db)
    batches = db.rows(BATCHES)
    big = [(count, size) for _, count, size in batches if size > 16_384]
    assert big and big[0][0] == 1, f"the oversized event was not alone: {batches}"
    assert batches[0][1] == 10, f"the small events before it should share a batch: {batches}"


def test_large_and_small_events_are_each_applied_once_within_the_bound(db: TestDatabase) -> None:
    """A last-value projection over documents of mixed sizes: every batch within the byte bound
    (or a lone oversized event), every event applied once, the last version of each kept."""
    db.init("tests.support.batch_projections:documents")
    rng = random.Random(12)
    versions = dict.fromkeys((uuid.uuid4() for _ in range(30)), 0)
    for _ in range(240):
        aggregate = rng.choice(list(versions))
        versions[aggregate] += 1
        document(db, aggregate, versions[aggregate], rng.choice([60, 900, 4000, 9000, 30_000]))
    apply_documents(db, batch_size=50, batch_max_bytes=20_000)
    assert_applied_once(db)
    batches = db.rows(BATCHES)
    assert all(size <= 20_000 or count == 1 for _, count, size in batches), batches
    assert any(count > 1 for _, count, _ in batches), "no batch held more than one event"
    final = dict(db.rows("SELECT id, version FROM documents"))
    assert final == {aggregate: n for aggregate, n in versions.items() if n}
    bodies = db.scalar(
        "SELECT count(*) FROM documents WHERE body LIKE id || ':' || version || ':%'"
    )
    assert bodies == len(final)


class BoundsRecorder(ProjectionRunner):
    """Records, for every batch applied, its bytes and those of the batch read ahead meanwhile."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[tuple[int, int]] = []

    async def _apply_reading_ahead(self, conn: Any, batch: Batch) -> None:
        await super()._apply_reading_ahead(conn, batch)
        ahead = self._read_ahead._batch
        self.held.append((batch.bytes, ahead.bytes if ahead else 0))


def test_the_batch_read_ahead_counts_against_the_byte_bound(db: TestDatabase) -> None:
    db.init("tests.support.batch_projections:documents")
    for n in range(200):
        document(db, uuid.uuid4(), 1, 1500 + 10 * (n % 7))
    runner = apply_documents(db, BoundsRecorder, batch_size=8, batch_max_bytes=20_000)
    assert isinstance(runner, BoundsRecorder)
    assert_applied_once(db)
    assert runner._read_ahead.used >= 10, "the catch-up hardly read ahead: nothing was tested"
    over = [(now, ahead) for now, ahead in runner.held if now + ahead > 20_000]
    assert not over, f"a batch and the one read ahead held more than the bound: {over}"
