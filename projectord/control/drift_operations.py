"""`drift_check` and `drift_repair` on the control socket: the same as `projectord drift check`
and `drift repair [--apply] [--drop-extra]`, answered by the running daemon with its own settings,
projections and database. A repair that needs a rebuild answers once the rebuild is recorded: the
daemons build it (a versioned rebuild, docs/evolution.md) and status shows its progress.

The arguments are two booleans, checked by the control server before anything runs; nothing from a
request reaches SQL. A repair with `apply` is logged at info with the caller's uid, as every
state-changing operation is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from projectord.config import Settings
from projectord.control.server import Arg, Operation, RequestError
from projectord.database import describe_error
from projectord.projection import Projection
from projectord.schema.drift import DriftError, drift_check
from projectord.schema.online_rebuild import RebuildError
from projectord.schema.repair import RepairError, drift_repair


class DriftOperations:
    def __init__(self, dsn: str, settings: Settings, projections: Sequence[Projection]) -> None:
        self.dsn = dsn
        self.settings = settings
        self.projections = list(projections)

    def table(self) -> dict[str, Operation]:
        options = {"apply": Arg(bool), "drop_extra": Arg(bool)}
        return {
            "drift_check": Operation(self.check, {}),
            "drift_repair": Operation(self.repair, options, changes_state=True),
        }

    async def check(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._errors():
            report = await drift_check(self.dsn, self.settings, self.projections)
        return report | {"ok": report["count"] == 0}

    async def repair(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._errors():
            result = await drift_repair(
                self.dsn,
                self.settings,
                self.projections,
                apply=bool(args.get("apply", False)),
                drop_extra=bool(args.get("drop_extra", False)),
                wait=False,  # this daemon builds its rebuilds: status shows their progress
            )
        return result | {"schema": self.settings.read_model_schema}

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Known failures become one-line error replies, as on the command line."""
        try:
            yield
        except DriftError as exc:
            raise RequestError("drift_error", str(exc)) from None
        except (RepairError, RebuildError) as exc:
            raise RequestError("repair_failed", str(exc)) from None
        except (psycopg.Error, OSError) as exc:
            raise RequestError("database_error", describe_error(exc, self.dsn)) from None
