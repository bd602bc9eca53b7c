"""Every error is one line on stderr, never a traceback; with `--json` it is also one JSON object
on stdout, shaped like a control-socket error reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.cli_process import projectord

# Nothing listens on port 1 of the loopback: the connection is refused at once.
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nothing"


def assert_one_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("projectord: "), stderr


@pytest.mark.parametrize(
    "args",
    [
        ["health"],
        ["status"],
        ["pause", "ledger"],
        ["resume", "ledger"],
        ["skip", "ledger"],
        ["rebuild", "ledger"],
    ],
)
def test_no_daemon_is_exit_3_and_json_when_asked(args: list[str], tmp_path: Path) -> None:
    socket = str(tmp_path / "control.sock")
    plain = projectord(*args, "--control-socket", socket)
    assert plain.returncode == 3 and plain.stdout == ""
    assert_one_line(plain.stderr)
    assert "no daemon answers" in plain.stderr
    result = projectord(*args, "--json", "--control-socket", socket)
    assert result.returncode == 3
    assert_one_line(result.stderr)
    reply = json.loads(result.stdout)
    assert reply == {
        "ok": False,
        "error": {"code": "no_daemon", "message": reply["error"]["message"]},
    }
    assert socket in reply["error"]["message"]


def test_wait_against_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    result = projectord(
        "wait",
        "--database-url",
        UNREACHABLE,
        "--projections",
        "tests.support.projections:ledger_only",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result
    assert_one_line(result.stderr)
    assert "cannot connect to the database" in result.stderr


def test_init_json_against_an_unreachable_database(tmp_path: Path) -> None:
    result = projectord("init", "--json", "--database-url", UNREACHABLE, cwd=tmp_path)
    assert result.returncode == 1, result
    assert_one_line(result.stderr)
    reply = json.loads(result.stdout)
    assert reply["ok"] is False and reply["error"]["code"] == "failed"
    assert "cannot connect to the database" in reply["error"]["message"]


def test_a_configuration_error_is_json_with_exit_2(tmp_path: Path) -> None:
    result = projectord("health", "--json", "--batch-size", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line(result.stderr)
    reply = json.loads(result.stdout)
    assert reply["error"]["code"] == "usage" and "batch_size" in reply["error"]["message"]


def test_an_unexpected_error_is_one_line_too(tmp_path: Path) -> None:
    """A projections callable that raises is no failure the CLI knows of: still one line."""
    (tmp_path / "exploding.py").write_text(
        "def projections():\n    raise RuntimeError('boom when called')\n"
    )
    result = projectord(
        "wait",
        "--database-url",
        UNREACHABLE,
        "--projections",
        "exploding:projections",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result
    assert_one_line(result.stderr)
    assert "RuntimeError: boom when called" in result.stderr


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_payload_number_json_cannot_hold_is_refused_not_turned_into_null(
    number: str, tmp_path: Path
) -> None:
    """Python's json module reads NaN, Infinity and 1e999 (as inf); none is JSON, and the command
    store then wrote them as null: the command ran with a value the operator never gave."""
    result = projectord(
        "dispatch",
        "Deposit",
        "--tenant",
        "00000000-0000-0000-0000-000000000001",
        "--payload",
        f'{{"amount": {number}}}',
        "--database-url",
        UNREACHABLE,
        "--aggregates",
        "projectord.samples:demo_aggregates",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result
    assert_one_line(result.stderr)
    assert "--payload is not valid JSON" in result.stderr


def test_a_config_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "projectord.toml"
    config.write_bytes(b'log_level = "\xff"\n')
    result = projectord("health", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result
    assert_one_line(result.stderr)
    assert f"config file {config}: cannot be read" in result.stderr
