"""The embedded Postgres is private to the OS user who starts it (issue 18 §1, issue 15 §1).

A second OS user is a real one: as root (as CI runs) the tests create or reuse the system user
`projectord_probe` and connect as it through a subprocess that drops to its uid, gid and groups.
Without root no process can become another user, so those tests check what stops every other
uid instead: the socket directory and the socket are 0700 and ours (the kernel refuses anyone
else without CAP_DAC_OVERRIDE), and pg_hba.conf admits peer-authenticated, mapped users only.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from structlog.testing import capture_logs

from projectord.embedded import EmbeddedError, EmbeddedPostgres, ensure_system_user
from tests.support.harness import run_cli

PROBE_USER = "projectord_probe"
AS_ROOT = os.geteuid() == 0


def probe_user() -> pwd.struct_passwd:
    """An unprivileged OS user other than the server's and ours (root only: it may be created,
    the same way as the server's)."""
    return ensure_system_user(PROBE_USER)


def psql_as_probe(server: EmbeddedPostgres, *args: str) -> subprocess.CompletedProcess[str]:
    """The server's own psql (libpq, as any client) run as the probe user, with its own uid, gid
    and no other groups. The tests' Python may sit where the probe cannot reach (/root)."""
    user = probe_user()
    return subprocess.run(
        [str(server.bin_dir / "psql"), "-X", "-w", *args],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def socket_dir(url: str) -> Path:
    return Path(conninfo_to_dict(url)["host"])


def postmaster_pid(server: EmbeddedPostgres) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().split()[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("embedded") / "pgdata", durable=False)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.destroy()


def test_the_socket_directory_is_private_and_auth_is_peer(server: EmbeddedPostgres) -> None:
    directory = socket_dir(server.url)
    info = directory.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == server.account.uid
    assert stat.S_IMODE((directory / ".s.PGSQL.5432").stat().st_mode) == 0o700
    rules = [
        line.split()
        for line in (server.data_dir / "pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules == [
        ["local", "all", "all", "peer", "map=projectord"],
        ["local", "replication", "all", "peer", "map=projectord"],
    ]
    mapped = {
        line.split()[1]
        for line in (server.data_dir / "pg_ident.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert mapped == {pwd.getpwuid(os.geteuid()).pw_name, server.user}
    with psycopg.connect(server.url) as conn:  # and the invoking user does get in
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_another_os_user_cannot_connect(server: EmbeddedPostgres) -> None:
    if not AS_ROOT:
        # No other user can be become; the directory's mode and owner decide (module docstring).
        info = socket_dir(server.url).stat()
        assert info.st_uid == os.geteuid() and info.st_mode & 0o077 == 0
        return
    runs = psql_as_probe(server, "--version")
    assert runs.returncode == 0, runs.stderr  # so that the failure below is the server's doing
    refused = psql_as_probe(server, "-c", "SELECT 1", server.url)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr, refused.stderr


def test_auth_checks_who_connects_even_through_an_open_directory(
    server: EmbeddedPostgres,
) -> None:
    """Defence in depth: with the socket directory opened up (as a careless operator might),
    peer authentication still turns the other user away, as postgres and as itself."""
    directory = socket_dir(server.url)
    socket = directory / ".s.PGSQL.5432"
    if not AS_ROOT:
        with psycopg.connect(server.url) as conn:
            hba = conn.execute("SELECT auth_method, user_name FROM pg_hba_file_rules").fetchall()
        assert hba == [("peer", ["all"]), ("peer", ["all"])]
        return
    directory.chmod(0o711)
    socket.chmod(0o777)
    try:
        for user in ("postgres", PROBE_USER):
            refused = psql_as_probe(server, "-c", "SELECT 1", f"{server.url}&user={user}")
            assert refused.returncode != 0
            assert "Peer authentication failed" in refused.stderr, refused.stderr
    finally:
        socket.chmod(0o700)
        directory.chmod(0o700)


def test_the_server_runs_with_its_own_groups_only(server: EmbeddedPostgres) -> None:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{postmaster_pid(server)}/status").open()
    )
    uids = {int(n) for n in status["Uid"].split()}
    gids = {int(n) for n in status["Gid"].split()}
    groups = {int(n) for n in status["Groups"].split()}
    entry = pwd.getpwnam(server.user)
    assert uids == {entry.pw_uid}
    assert gids == {server.account.gid}
    assert groups <= set(server.account.groups) | {server.account.gid}
    if AS_ROOT:
        assert server.user != "root" and 0 not in gids | groups
        assert groups <= set(os.getgrouplist(entry.pw_name, entry.pw_gid))


def victim(path: Path) -> Path:
    """A directory standing for something private that a planted link points at."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def test_a_link_at_the_old_predictable_socket_path_is_not_followed(tmp_path: Path) -> None:
    """Earlier versions used /tmp/projectord-pg-<hash of the data directory>, mode 0777, and
    followed a link planted there."""
    target = victim(tmp_path / "victim")
    data_dir = tmp_path / "state" / "pgdata"
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    planted = Path(tempfile.gettempdir()) / f"projectord-pg-{digest}"
    planted.symlink_to(target)
    try:
        embedded = EmbeddedPostgres(data_dir, durable=False)
        try:
            assert socket_dir(embedded.start()) != planted
        finally:
            embedded.destroy()
    finally:
        planted.unlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert list(target.iterdir()) == []


def test_a_link_planted_as_the_data_directory_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path / "victim")
    state = tmp_path / "state"
    state.mkdir()
    (state / "pgdata").symlink_to(target)
    embedded = EmbeddedPostgres(state / "pgdata", durable=False)
    with pytest.raises(EmbeddedError, match="not a directory"):
        embedded.start()
    info = target.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    assert list(target.iterdir()) == []


def test_the_socket_directory_is_removed_on_stop(tmp_path: Path) -> None:
    """Removed on stop; made again at the same path by a later start (URLs handed out stay
    valid) unless something was planted there meanwhile, which is then left alone."""
    target = victim(tmp_path / "victim")
    embedded = EmbeddedPostgres(tmp_path / "state" / "pgdata", durable=False)
    directory = socket_dir(embedded.start())
    try:
        assert directory.is_dir()
        embedded.restart("fast")
        embedded.stop()
        assert not directory.exists()
        assert socket_dir(embedded.start()) == directory
        with psycopg.connect(embedded.url) as conn:
            conn.execute("SELECT 1")
        embedded.stop()
        directory.symlink_to(target)
        assert socket_dir(embedded.start()) != directory
        assert stat.S_IMODE(target.stat().st_mode) == 0o700 and list(target.iterdir()) == []
    finally:
        embedded.destroy()


def test_a_command_uses_the_server_already_running_there(tmp_path: Path) -> None:
    """It finds the socket directory from postmaster.pid, and leaves the server running."""
    embedded = EmbeddedPostgres(tmp_path / "state" / "pgdata", durable=False)
    url = embedded.start()
    try:
        result = run_cli("init", "--embedded", "--state-dir", str(tmp_path / "state"))
        assert result.returncode == 0, result.stderr
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('projectord.events')").fetchone() != (None,)
        assert socket_dir(url).is_dir() and embedded.is_running()
    finally:
        embedded.destroy()


def test_creating_the_system_user_is_said(tmp_path: Path) -> None:
    """As root a missing server user is created, without a login shell or home, and logged. As
    anyone else no user can be created: an existing one (ours) is returned, and nothing said."""
    name = f"pd_sys_{os.getpid()}" if AS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
    try:
        with capture_logs() as logs:
            entry = ensure_system_user(name)
        assert entry.pw_name == name
        if AS_ROOT:
            assert logs == [{"event": "embedded.system_user_created", "user": name,
                             "log_level": "warning"}]  # fmt: skip
            assert entry.pw_shell == "/usr/sbin/nologin" and not Path(entry.pw_dir).exists()
        else:
            assert logs == []
    finally:
        if AS_ROOT:
            subprocess.run(["userdel", name], check=True)


def test_a_system_user_created_by_two_servers_at_once_is_theirs_both() -> None:
    """Two servers started at once on a fresh machine (the test workers of pytest-xdist, two
    demos) both find their user missing and both run useradd: the one that loses the race finds
    the user the other made, instead of failing."""
    name = f"pd_race_{os.getpid()}" if AS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
    together = threading.Barrier(2)
    found: list[pwd.struct_passwd] = []

    def start() -> None:
        together.wait()
        found.append(ensure_system_user(name))

    threads = [threading.Thread(target=start) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [entry.pw_name for entry in found] == [name, name]
        assert found[0].pw_uid == found[1].pw_uid
    finally:
        if AS_ROOT:
            subprocess.run(["userdel", name], check=True)
