"""The command line finds the daemon's socket from the configuration alone, and a user who may
not use it is told who may, in one line."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path

import pytest

from projectord.cli.main import main
from projectord.config import load_settings
from tests.unit.cli_process import ROOT, fake_daemon, projectord

HEALTHY = {"status": "ok", "reasons": []}


def test_the_same_config_reaches_the_same_socket_from_anywhere(tmp_path: Path) -> None:
    """The daemon under systemd has RUNTIME_DIRECTORY, an operator's shell has not: a config that
    names the socket (as the example does) gives both the same path."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = tmp_path / "projectord.toml"
    config.write_text(
        f'state_dir = "{state_dir}"\ncontrol_socket = "{state_dir / "control.sock"}"\n'
    )
    shell_view = load_settings(config)
    os.environ["RUNTIME_DIRECTORY"] = str(tmp_path / "run")
    try:
        assert load_settings(config).socket_path() == shell_view.socket_path()
    finally:
        del os.environ["RUNTIME_DIRECTORY"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with fake_daemon(state_dir / "control.sock", HEALTHY) as requests:
        result = projectord("health", "--config", str(config), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok" and requests[0]["command"] == "health"


def test_unit_and_example_config_agree_on_the_paths() -> None:
    """The unit gives the daemon only the config file, and the example names the socket the unit's
    RuntimeDirectory holds: `--config` tells a command all the daemon knows about its socket."""
    service = unit_settings(ROOT / "systemd" / "projectord.service")
    environment = " ".join(service.get("Environment", []))
    for key in ("PROJECTORD_STATE_DIR", "PROJECTORD_CONTROL_SOCKET"):
        assert key not in environment, f"the unit sets {key}, which `--config` cannot see"
    assert "PROJECTORD_CONFIG=/etc/projectord/projectord.toml" in environment
    example = tomllib.loads((ROOT / "config" / "projectord.example.toml").read_text())
    state_dir = Path(example["state_dir"])
    assert [state_dir] == [Path("/var/lib") / name for name in service["StateDirectory"]]
    assert str(state_dir) in " ".join(service["ReadWritePaths"]).split()
    runtime = [Path("/run") / name for name in service["RuntimeDirectory"]]
    assert [Path(example["control_socket"])] == [path / "control.sock" for path in runtime]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Each key of a systemd unit with every value it is given (keys repeat, as Environment=)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")
def test_a_user_outside_the_group_is_told_who_may_connect() -> None:
    directory = Path(tempfile.mkdtemp(prefix="projectord-socket-"))
    try:
        directory.chmod(0o755)
        path = directory / "control.sock"
        with fake_daemon(path, HEALTHY):
            path.chmod(0o660)
            result = as_nobody("status", "--control-socket", str(path))
    finally:
        shutil.rmtree(directory)
    assert result.returncode == 1, result
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"permission denied on {path}" in result.stderr
    assert "user root and members of group root" in result.stderr, result.stderr
    assert "usermod -aG root" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")
def test_a_directory_that_keeps_the_user_out_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o750)
    path = private / "control.sock"
    with fake_daemon(path, HEALTHY):
        result = as_nobody("health", "--json", "--control-socket", str(path))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    reply = json.loads(result.stdout)
    assert reply["error"]["code"] == "permission_denied"
    # The first directory on the way that nobody may enter: pytest's own, or `private`.
    assert "may not enter" in reply["error"]["message"], reply


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line in a child process that runs as `nobody`. Forked rather than started
    afresh: this interpreter may live where nobody can read it (a home directory)."""
    nobody = pwd.getpwnam("nobody")
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 99
        try:
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            status = main(list(args))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(out_write)
    os.close(err_write)
    with open(out_read) as out, open(err_read) as err:
        stdout, stderr = out.read(), err.read()
    _, wait_status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(
        ["projectord", *args], os.waitstatus_to_exitcode(wait_status), stdout, stderr
    )
