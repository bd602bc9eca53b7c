"""No silent embedded server outside the demo (issue 15 §1): without `database_url` the commands
that need the database exit 2 with one line naming it, and start nothing; the embedded server
starts when asked (`--embedded` or `database_url = "embedded"`), and is gone again afterwards."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.integration.test_bad_input import LEDGER, one_line
from tests.support.harness import run_cli

TENANT = "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize(
    "command",
    [
        ["init"],
        ["run", "--projections", LEDGER],
        ["wait"],
        ["drift", "check"],
        ["drift", "repair"],
        ["dead-letters", "list"],
        ["dead-letters", "retry"],
        ["dispatch", "Deposit", "--aggregates", "projectord.samples:demo_aggregates",
         "--tenant", TENANT, "--payload", "{}"],
    ],
)  # fmt: skip
def test_no_database_url_is_a_configuration_error(tmp_path: Path, command: list[str]) -> None:
    state = tmp_path / "state"
    env = {"PROJECTORD_DATABASE_URL": "", "PROJECTORD_CONFIG": ""}
    result = run_cli(*command, "--state-dir", str(state), env=env)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "database_url is not set" in line and "embedded" in line
    assert not state.exists(), "something was started without a database_url"


def test_run_without_projections_is_a_configuration_error(tmp_path: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:1/nowhere"
    result = run_cli("run", "--database-url", url, "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "no projections configured" in one_line(result.stderr)


def test_embedded_and_another_url_conflict(tmp_path: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:1/nowhere"
    result = run_cli("init", "--embedded", "--database-url", url, "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "database_url" in one_line(result.stderr)


def log_events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("how", ["--embedded", "PROJECTORD_DATABASE_URL=embedded"])
def test_init_on_the_embedded_server_when_asked(tmp_path: Path, how: str) -> None:
    """As root the server's user needs a way through a private parent; that change is logged
    (never made silently). As anyone else nothing outside the state directory changes."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    state = private / "state"
    flags = [how] if how.startswith("--") else []
    env = {"PROJECTORD_LOG_FORMAT": "json"}
    if not flags:
        env["PROJECTORD_DATABASE_URL"] = how.partition("=")[2]
    result = run_cli("init", *flags, "--state-dir", str(state), env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "change(s) applied" in result.stdout
    events = log_events(result.stderr)
    changed = [e for e in events if e["event"] == "embedded.parent_made_traversable"]
    if os.geteuid() == 0:
        assert {e["path"] for e in changed} >= {str(private)}
        assert stat.S_IMODE(private.stat().st_mode) == 0o701
    else:
        assert changed == [] and stat.S_IMODE(private.stat().st_mode) == 0o700
    (started,) = [e for e in events if e["event"] == "embedded.started"]
    assert not Path(str(started["socket_dir"])).exists(), "socket directory left behind"
    again = run_cli("init", *flags, "--state-dir", str(state), env=env, timeout=120)
    assert again.returncode == 0 and "schema is up to date" in again.stdout
