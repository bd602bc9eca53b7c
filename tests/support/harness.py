"""Helpers shared by the tests: a test database handle, writers, and the daemon as a process."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import psycopg.sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from projectord.config import load_settings
from projectord.daemon.listener import ARMING
from projectord.database import connect
from projectord.projection import load_projections
from projectord.queries import Queries
from projectord.schema.bootstrap import bootstrap
from projectord.schema.migrations import migrations

ROOT = Path(__file__).resolve().parents[2]
TENANT = uuid.UUID("00000000-0000-0000-0000-00000000000a")


# The sessions holding a projection's ownership lock (its key is in lock_keys, migration 0014).
PROJECTION_LOCK_HOLDERS = (
    "SELECT l.pid FROM pg_locks l"
    " JOIN projectord.lock_keys k ON k.purpose = 'projection' AND k.name = %s"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid = ((k.key >> 32) & 4294967295)::oid AND l.objid = (k.key & 4294967295)::oid"
)


@contextlib.contextmanager
def temporary_database(admin_url: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database with a unique name (cloned from `template` if given), dropped after use."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clone = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clone}')
    try:
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def init_database(dsn: str, projections: Sequence[str] = ()) -> list[str]:
    """`projectord init` in-process, with the default schemas, as the test daemon's role."""
    settings = load_settings(None, database_url=dsn)

    async def run() -> list[str]:
        conn = await connect(as_daemon_role(dsn), autocommit=True)
        async with conn:
            return await bootstrap(conn, settings, load_projections(projections))

    return anyio.run(run)


@dataclass
class TestDatabase:
    __test__ = False  # not a test class, despite its name

    url: str
    name: str

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, **kwargs)

    def scalar(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
        with self.connect(autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()
            return row[0] if row else None

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect(autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def init(self, *projections: str) -> list[str]:
        return init_database(self.url, projections)


def append_sql(
    conn: psycopg.Connection[Any],
    type_: str,
    payload: dict[str, Any],
    *,
    aggregate_id: uuid.UUID | None = None,
    version: int = 1,
    tenant_id: uuid.UUID = TENANT,
) -> None:
    """A plain SQL append, as any writer may do it."""
    conn.execute(
        "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
        " VALUES (%s, %s, %s, %s, %s)",
        (tenant_id, aggregate_id or uuid.uuid4(), version, type_, Jsonb(payload)),
    )


def credits(db: TestDatabase, count: int, poison_at: int | None = None) -> None:
    """`count` Credited events of amounts 1..count in `count` transactions, so commit order and
    batches interleave; the one at `poison_at` carries `"poison": true`."""
    with db.connect(autocommit=True) as conn:
        for n in range(1, count + 1):
            payload: dict[str, Any] = {"account": n % 3, "amount": n}
            if n == poison_at:
                payload["poison"] = True
            append_sql(conn, "Credited", payload)


def bulk_credits(conn: psycopg.Connection[Any], count: int, accounts: int = 100) -> None:
    """`count` Credited events of amount 1..7 spread over `accounts` accounts, in one statement."""
    conn.execute(
        """
        INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)
        SELECT %s, md5('acct' || (g %% %s))::uuid, base.n + g, 'Credited',
               jsonb_build_object('account', (g %% %s), 'amount', 1 + g %% 7)
        FROM generate_series(1, %s) g,
             (SELECT coalesce(max(version), 0) AS n FROM projectord.events) base
        """,
        (TENANT, accounts, accounts, count),
    )


class Writers:
    """Threads appending one committed event per transaction, riding out outages."""

    def __init__(self, url: str, count: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.attempted_commits = 0
        self.threads = [threading.Thread(target=self._write, args=(n,)) for n in range(count)]

    def _write(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.url, connect_timeout=3) as conn:
                    while not self.stop.is_set():
                        append_sql(
                            conn,
                            "Credited",
                            {"account": rng.randint(1, 9), "amount": 1},
                            aggregate_id=uuid.uuid4(),
                        )
                        conn.commit()
                        time.sleep(rng.uniform(0, 0.01))
            except psycopg.Error:
                time.sleep(0.1)  # the server is away; an uncertain commit is checked by the fold

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def arm_wakeups(conn: psycopg.Connection[Any], channel: str = "projectord_projectord") -> None:
    """Arm the wake-ups on `conn` (autocommit) exactly as the daemon's listener does: from now on
    the next append notifies, and every append that did not has ended."""
    queries = Queries("projectord")
    for step in ARMING:
        conn.execute(queries[step], {"channel": channel})


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll `predicate` until it holds; return the seconds it took; fail at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


DAEMON_ROLE_ENV = "PROJECTORD_TEST_DAEMON_ROLE"
LEAST_PRIVILEGE = "NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE LOGIN"


def daemon_role() -> str | None:
    """The role the tests run projectord as, when PROJECTORD_TEST_DAEMON_ROLE names one: a
    least-privilege role (see `prepare_for_daemon_role`) instead of the test server's superuser."""
    return os.environ.get(DAEMON_ROLE_ENV) or None


def as_daemon_role(url: str) -> str:
    """`url` as the test daemon's role, when one is configured and `url` is the superuser's (a
    URL of a test's own role is left alone)."""
    role = daemon_role()
    if role is None or conninfo_to_dict(url).get("user") == role:
        return url
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    return make_conninfo(url, user=role) if row and row[0] else url


def prepare_for_daemon_role(admin_url: str) -> None:
    """Give a fresh database what the documented least-privilege setup gives projectord's role
    (docs/security-roles.md): the role, created once per cluster; projectord's schema owned by it;
    CREATE on the read-model schema `public`; CREATE on the database (a build's schema). Nothing
    else: no superuser, no BYPASSRLS, no database ownership. A no-op without
    PROJECTORD_TEST_DAEMON_ROLE."""
    role = daemon_role()
    if role is None:
        return
    ident = psycopg.sql.Identifier(role)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('projectord test daemon role'))")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            conn.execute(psycopg.sql.SQL("CREATE ROLE {} " + LEAST_PRIVILEGE).format(ident))
        conn.execute("SELECT pg_advisory_unlock(hashtext('projectord test daemon role'))")
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA projectord AUTHORIZATION {}").format(ident))
        conn.execute(psycopg.sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(ident))
    grant_create_on_database(admin_url)


def grant_create_on_database(admin_url: str) -> None:
    """CREATE on the database for the test daemon's role (a clone of the template database does
    not inherit the template's grants). A no-op without PROJECTORD_TEST_DAEMON_ROLE."""
    role = daemon_role()
    if role is None:
        return
    with psycopg.connect(admin_url, autocommit=True) as conn:
        database = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        conn.execute(
            psycopg.sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                psycopg.sql.Identifier(database), psycopg.sql.Identifier(role)
            )
        )


class DaemonProcess:
    """`projectord run` as a real process, with its JSON log lines collected in a file."""

    def __init__(
        self,
        database_url: str,
        projections: str,
        state_dir: Path,
        *,
        extra_env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.log_path = state_dir / f"daemon-{uuid.uuid4().hex[:6]}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PROJECTORD_DATABASE_URL": database_url,
            "PROJECTORD_PROJECTIONS": projections,
            "PROJECTORD_STATE_DIR": str(state_dir),
            "PROJECTORD_LOG_FORMAT": "json",
            **(extra_env or {}),
        }
        env["PROJECTORD_DATABASE_URL"] = as_daemon_role(env["PROJECTORD_DATABASE_URL"])
        self._log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "projectord", "run", *args],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def has_logged(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.log_events())

    def wait_started(self, timeout: float = 30) -> DaemonProcess:
        def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.log_path.read_text()}")
            return self.has_logged("daemon.started") and self.has_logged("listener.connected")

        wait_until(started, timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self._log_file.close()

    def __enter__(self) -> DaemonProcess:
        return self.wait_started()

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.kill()
        else:
            self._log_file.close()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if "PROJECTORD_DATABASE_URL" in env:
        env["PROJECTORD_DATABASE_URL"] = as_daemon_role(env["PROJECTORD_DATABASE_URL"])
    return subprocess.run(
        [sys.executable, "-m", "projectord", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


async def apply_migrations_up_to(conn: psycopg.AsyncConnection[Any], last: int) -> None:
    """Migrations 0001 to `last` of projectord's schema, with the bookkeeping `projectord init`
    keeps, as the init of an older release left them: the starting point of an upgrade test.
    Run inside the caller's transaction."""
    cur = await conn.execute("SELECT to_regnamespace('projectord') IS NULL")
    if (await cur.fetchone() or (False,))[0]:  # else made for a least-privilege role, which
        await conn.execute("CREATE SCHEMA projectord")  # may lack CREATE on the database
    await conn.execute("SET LOCAL search_path TO projectord")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
        " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for migration in migrations():
        if migration.version > last:
            break
        await conn.execute(migration.sql.encode())
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
    await conn.execute("SET LOCAL search_path TO DEFAULT")
