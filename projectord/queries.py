"""Named SQL queries, kept in `.sql` files instead of strings scattered through the code.

Each file under `sql/queries/` holds several queries, each introduced by a `-- name: NAME` line;
comment lines document them in the file and are not sent to the server.
`{schema}` in a query is replaced by projectord's own schema, quoted as an identifier; every other
value travels as a bound parameter, never interpolated.

Queries run with the read-model schema on the search_path (the daemon's pool), where a role with
CREATE could add operators and functions. Postgres picks an exact-typed operator or function from
any schema on the path over a pg_catalog one that needs an implicit cast or is polymorphic, so
every query here is written to leave it no such choice: operands of exactly the types of a
pg_catalog operator (`1000000::numeric`, `amname::text`, `0::oid`, `regclass::oid`), and
`pg_catalog.` before polymorphic or "any" functions (`unnest`, `count(x)`,
`json_populate_recordset`). A multi-array unnest is spelled `ROWS FROM (pg_catalog.unnest(a), …)`:
the qualified name has no multi-argument form. tests/integration/test_drift_hardening.py arms such
operators
and runs the daemon, init, drift and status under them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from psycopg import sql

_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """Where the SQL files are: inside the installed package, or at the top of a checkout."""
    packaged = Path(__file__).parent / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).parent.parent / "sql"


@functools.cache
def _raw_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        parts = _NAME_LINE.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice (in {path.name})")
            queries[name] = _without_comment_lines(body).strip().rstrip(";")
    return queries


def _without_comment_lines(body: str) -> str:
    """The query without its whole-line `--` comments: they document the file, and need not
    travel with every execution (the fetch's are longer than the query, and it is not
    prepared)."""
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))


def quote_ident(name: str) -> str:
    return sql.Identifier(name).as_string()


class Queries:
    """The queries of one installation, with its schema filled in."""

    def __init__(self, schema: str) -> None:
        self._schema = quote_ident(schema)
        self._cache: dict[str, str] = {}

    @property
    def schema_sql(self) -> str:
        """The schema, quoted as an identifier, for SQL kept outside the query files."""
        return self._schema

    def __getitem__(self, name: str) -> str:
        query = self._cache.get(name)
        if query is None:
            query = _raw_queries()[name].replace("{schema}", self._schema)
            self._cache[name] = query
        return query
