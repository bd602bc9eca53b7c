"""Configuration sources and their priority: flags > environment > TOML > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from projectord.config import ConfigError, load_settings
from projectord.database import describe_error, redact


def test_priority_of_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text("batch_size = 11\npoll_interval = 3.5\nschema = 'fromfile'\n")
    monkeypatch.setenv("PROJECTORD_BATCH_SIZE", "22")
    settings = load_settings(config, schema="fromflag")
    assert settings.batch_size == 22  # environment beats the file
    assert settings.poll_interval == 3.5  # the file beats the default
    assert settings.schema == "fromflag"  # a flag beats everything
    assert settings.read_model_schema == "public"  # default


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "p.toml"
    config.write_text("projections = ['a.b:c', 'd:e']\n")
    monkeypatch.setenv("PROJECTORD_CONFIG", str(config))
    assert load_settings().projections == ["a.b:c", "d:e"]


def test_projections_from_environment_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROJECTORD_PROJECTIONS", "a:b, c.d:e ,")
    assert load_settings().projections == ["a:b", "c.d:e"]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_password_never_shown(tmp_path: Path) -> None:
    settings = load_settings(database_url="postgresql://u:hunter2@localhost/db")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in redact(settings.database_dsn or "")
    config = tmp_path / "p.toml"
    config.write_text("database_url = 42\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "database_url" in str(caught.value)


def test_an_error_about_an_unparsable_url_withholds_its_text() -> None:
    """The URL cannot be parsed, so its password cannot be found: say nothing of the text."""
    text = describe_error(ValueError("near 'password hunter2'"), "host=h password hunter2")
    assert "hunter2" not in text and "ValueError" in text
