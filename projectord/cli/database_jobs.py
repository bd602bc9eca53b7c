"""Running a schema job (drift check, repair, online rebuild) straight against the database,
without a daemon, so that its known failures end as one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import anyio
import psycopg

from projectord.cli.configuration import load
from projectord.cli.connection import database
from projectord.cli.exits import CommandError
from projectord.database import describe_error
from projectord.schema.drift import DriftError
from projectord.schema.online_rebuild import RebuildError
from projectord.schema.repair import RepairError


def run_database_job(args: argparse.Namespace, job: Callable[..., Any], error_status: int) -> Any:
    """Load settings and projections, get the database, run `job(dsn, settings, projections)`;
    known failures become one line with `error_status`."""
    settings, projections = load(args)

    async def run() -> Any:
        async with database(settings) as dsn:
            try:
                return await job(dsn, settings, projections)
            except (DriftError, RepairError, RebuildError) as exc:
                raise CommandError(str(exc), error_status, code="failed") from None
            except (psycopg.Error, OSError) as exc:
                raise CommandError(describe_error(exc, dsn), error_status, code="failed") from None

    return anyio.run(run)
