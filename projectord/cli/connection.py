"""The database a subcommand works on: the configured URL, or the embedded Postgres when asked
for, and a connection that fails as one line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection

from projectord.cli.exits import EXIT_USAGE, CommandError
from projectord.config import Settings
from projectord.database import connect, describe_error, redact
from projectord.embedded import EMBEDDED_URL, embedded_database

MISSING_DATABASE_URL = (
    "database_url is not set: set it to a libpq URL (PROJECTORD_DATABASE_URL, --database-url or "
    'the config file), or to "embedded" (--embedded) for a private embedded Postgres in state_dir'
)


def require_database_url(settings: Settings) -> str:
    """The configured `database_url`. An unset one is a configuration error rather than a cue to
    start a server: a line missing from an env file must not quietly give a daemon its own empty
    database."""
    if not settings.database_dsn:
        raise CommandError(MISSING_DATABASE_URL, EXIT_USAGE)
    return settings.database_dsn


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """The DSN to use: `database_url`, or with `database_url = "embedded"` the embedded Postgres
    in `state_dir`, which this process starts (and stops again on exit) unless one already runs
    there."""
    url = require_database_url(settings)
    if url != EMBEDDED_URL:
        yield url
        return
    async with embedded_database(settings.state_dir) as dsn:
        yield dsn


async def open_connection(dsn: str) -> AsyncConnection[Any]:
    """An autocommit connection for a subcommand, or a one-line `CommandError` saying why not."""
    try:
        return await connect(dsn, autocommit=True, connect_timeout=10)
    except Exception as exc:
        raise CommandError(
            f"cannot connect to the database ({redact(dsn)}): {describe_error(exc, dsn)}"
        ) from None
