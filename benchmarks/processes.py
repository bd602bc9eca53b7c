"""The processes a benchmark drives: the real daemon, and pgbench as the writer.

pgbench (from the `embedded` extra's Postgres, or the machine's) writes single-event transactions
from C, so the writer costs the machine little and its throughput is a fair measure of the write
side.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from projectord.embedded import postgres_bin_dir

ROOT = Path(__file__).resolve().parent.parent
TENANT = "00000000-0000-0000-0000-00000000000b"
# One event per transaction, of a type only the benchmarks' projections read; `clock` is the
# writer's clock at the INSERT, for latency when the server keeps no commit timestamps.
APPEND_SCRIPT = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
    f" VALUES ('{TENANT}', gen_random_uuid(), 1, 'Pinged',"
    " jsonb_build_object('clock', extract(epoch FROM clock_timestamp())));\n"
)
# The same event as the next version of the client's own aggregate, so the store's ordering check
# (sql/migrations/0010_append_order.sql) finds a previous version, as most appends do. One
# aggregate per client: the clients never collide.
NEXT_VERSION_SCRIPT = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
    f" SELECT '{TENANT}', a.id,"
    " coalesce((SELECT max(e.version) FROM projectord.events e WHERE e.aggregate_id = a.id), 0)"
    " + 1, 'Pinged', jsonb_build_object('clock', extract(epoch FROM clock_timestamp()))"
    " FROM (SELECT md5('writer' || :client_id)::uuid AS id) a;\n"
)


@contextmanager
def background(
    name: str, command: Sequence[str], state_dir: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process with its output in `<state_dir>/<name>.log`, stopped with SIGTERM at the end."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with (state_dir / f"{name}.log").open("a") as log:
        process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(1.5)  # connected and listening; the callers' warm-up confirms it
            if process.poll() is not None:
                raise SystemExit(f"{name} exited early; see {state_dir / f'{name}.log'}")
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def daemon(
    url: str, projections: str, state_dir: Path, **settings: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`projectord run` with these projections; `settings` become PROJECTORD_* variables."""
    env = {
        "PROJECTORD_DATABASE_URL": url,
        "PROJECTORD_PROJECTIONS": projections,
        "PROJECTORD_STATE_DIR": str(state_dir),
        "PROJECTORD_LOG_FORMAT": "json",
        "PROJECTORD_LOG_LEVEL": "warning",
        **{f"PROJECTORD_{key.upper()}": value for key, value in settings.items()},
    }
    with background("projectord", [sys.executable, "-m", "projectord", "run"], state_dir, env) as p:
        yield p


def pgbench_path() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    try:
        return str(postgres_bin_dir() / "pgbench")
    except Exception as exc:
        raise SystemExit(f"pgbench not found ({exc}); install the `embedded` extra") from None


def append_with_pgbench(
    url: str,
    *,
    clients: int,
    seconds: float,
    state_dir: Path,
    rate: int | None = None,
    append_script: str = APPEND_SCRIPT,
    extra: Sequence[str] = (),
) -> float:
    """Single-event transactions from `clients` connections for `seconds`, at `rate` per second
    in all (a Poisson schedule) or as fast as they go; returns the transactions per second."""
    script = state_dir / "append.sql"
    script.write_text(append_script)
    command = [pgbench_path(), "-n", "-c", str(clients), "-j", str(min(clients, 2))]
    if rate:
        command += ["-R", str(rate)]
    command += [*extra, "-T", str(max(1, round(seconds))), "-f", str(script), url]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise SystemExit(f"pgbench printed no tps:\n{result.stdout}\n{result.stderr}")
