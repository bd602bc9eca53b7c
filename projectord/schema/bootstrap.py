"""What `projectord init` (and the daemon at start) does: migrate projectord's schema, create the
projections' missing tables, and give the tables of projections that declare `read_access` their
row-level security, policies and grants, all in one transaction. Without that last step a
freshly created table would have no row-level security until someone ran `drift repair`, and the
first `drift check` after `init` would fail.

The security step lives here rather than in `schema` because it reuses drift detection, which
itself creates declared tables through `schema`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord.config import Settings
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.schema.migrations import initialise, serving_projections
from projectord.schema.repair import secure_tables


async def bootstrap(
    conn: AsyncConnection[Any], settings: Settings, projections: Sequence[Projection]
) -> list[str]:
    """Bring the database up to date for these projections; return what was created or
    changed. One transaction: concurrent runs are serialised by `initialise`'s lock, held until
    the security step has committed too."""
    async with conn.transaction():
        done = await initialise(
            conn,
            schema=settings.schema,
            read_model_schema=settings.read_model_schema,
            projections=projections,
            lock_timeout=settings.init_lock_timeout,
        )
        serving = await serving_projections(conn, Queries(settings.schema), projections)
        done += await secure_tables(conn, settings, serving)
    return done
