"""`--version`, and what `--help` tells an operator: the environment, the exit statuses, and a
flag for every configuration key."""

from __future__ import annotations

import re
from importlib.metadata import version

from projectord.config import Settings
from tests.unit.cli_process import projectord


def test_version_prints_the_installed_version() -> None:
    result = projectord("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"projectord {version('projectord')}"


def test_help_names_the_environment_and_the_exit_statuses() -> None:
    for args in (["--help"], ["status", "--help"], ["init", "--help"]):
        result = projectord(*args)
        assert result.returncode == 0, result.stderr
        text = result.stdout
        assert "PROJECTORD_CONFIG" in text and "PROJECTORD_<KEY>" in text, args
        assert "PROJECTORD_DATABASE_URL" in text, args
        for status in ("0 ", "1 ", "2 ", "3 "):
            assert re.search(rf"^\s+{status}", text, re.MULTILINE), (args, status)


def test_health_help_gives_its_own_statuses() -> None:
    text = projectord("health", "--help").stdout
    assert re.search(r"^\s+1\s+degraded", text, re.MULTILINE), text
    assert re.search(r"^\s+2\s+failing", text, re.MULTILINE), text


def test_every_configuration_key_has_a_flag() -> None:
    text = projectord("run", "--help").stdout
    missing = [
        key for key in Settings.model_fields if f"--{key.replace('_', '-')}" not in text.split()
    ]
    assert not missing, f"keys without a flag: {missing}"


def test_a_flag_for_a_key_reaches_the_setting_and_is_checked() -> None:
    """`--pool-size` is validated like the key: a bad value is one line naming it, exit 2."""
    result = projectord("status", "--pool-size", "many", "--control-socket", "/nonexistent/s")
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "pool_size" in result.stderr, result.stderr
