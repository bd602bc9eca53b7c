"""Transaction ids from another cluster: found at `init` and at start-up, refused.

Commit order is `(transaction_id, global_position)`, and ids are the cluster's own. An event store
restored with pg_dump into another cluster, or filled by logical replication, keeps ids the new
cluster has not reached: the events it appends from now on get lower ids, sort behind the old
checkpoints and are never applied (and a horizon below old ids holds nothing back). Nothing breaks
visibly, so this is refused before anything runs, with one line saying what to do.
pg_upgrade and a promoted physical replica keep the cluster's ids, so they never trip it.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore

DOCS = "docs/ordering.md, 'Transaction ids from another cluster'"


class ForeignTransactionIds(Exception):
    """The store holds transaction ids this server has not handed out yet; one line."""


async def check_transaction_ids(conn: AsyncConnection[Any], queries: Queries) -> None:
    """Raise `ForeignTransactionIds` if events or checkpoints are ahead of this server's ids."""
    # The checkpoints first: one that moves meanwhile stays below the next id read after it.
    newest_checkpoint = await CheckpointStore(queries).newest_transaction_id(conn)
    cur = await conn.execute(queries["transaction_ids_ahead"])
    row = await cur.fetchone()
    assert row is not None
    next_id, newest_event = row
    found = []
    if newest_event is not None and newest_event >= next_id:
        found.append(f"events up to transaction id {newest_event}")
    if newest_checkpoint is not None and newest_checkpoint > next_id:
        found.append(f"checkpoints up to {newest_checkpoint}")
    if found:
        raise ForeignTransactionIds(
            f"{' and '.join(found)} are ahead of this server's next transaction id {next_id}"
            " (restored with pg_dump into another cluster, or copied by logical replication?):"
            " new events would sort behind them and never be applied; stop the writers and"
            f" follow {DOCS}"
        )
