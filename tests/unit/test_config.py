"""Configuration: flags > PROJECTORD_* environment > TOML file > defaults, and every malformed
value reported as one line naming the key (the CLI turns `ConfigError` into exit status 2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from projectord.config import ConfigError, Settings, load_settings
from projectord.daemon.reload import RUNTIME_KEYS, compare_settings
from projectord.database import describe_error, redact


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No PROJECTORD_* variable of the machine running the tests leaks into them."""
    import os

    for key in list(os.environ):
        if key.startswith("PROJECTORD_") or key == "RUNTIME_DIRECTORY":
            monkeypatch.delenv(key)
    yield


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "projectord.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.schema, settings.read_model_schema, settings.batch_size) == (
        "projectord",
        "public",
        2000,
    )
    assert settings.database_dsn is None
    assert settings.batch_max_bytes == 32 * 2**20
    assert (settings.on_error, settings.max_attempts) == ("pause", 5)


def test_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = toml(tmp_path, 'batch_size = 10\npoll_interval = 2.5\nschema = "from_file"\n')
    monkeypatch.setenv("PROJECTORD_BATCH_SIZE", "20")
    monkeypatch.setenv("PROJECTORD_POLL_INTERVAL", "3.5")
    settings = load_settings(path, batch_size=30)
    assert settings.batch_size == 30  # flag
    assert settings.poll_interval == 3.5  # environment over file
    assert settings.schema == "from_file"  # file over default
    assert settings.pool_size == 10  # default


def test_a_flag_left_unset_does_not_override(tmp_path: Path) -> None:
    path = toml(tmp_path, "batch_size = 10\n")
    assert load_settings(path, batch_size=None).batch_size == 10


def test_config_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJECTORD_CONFIG", str(toml(tmp_path, 'read_model_schema = "rm"\n')))
    assert load_settings().read_model_schema == "rm"


def test_lists_from_the_environment_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJECTORD_PROJECTIONS", " a.b:C , d:e ,")
    assert load_settings().projections == ["a.b:C", "d:e"]


def test_sizes_and_case_are_normalised(tmp_path: Path) -> None:
    path = toml(tmp_path, 'batch_max_bytes = "1MiB"\nlog_level = "DEBUG"\n')
    settings = load_settings(path)
    assert (settings.batch_max_bytes, settings.log_level) == (2**20, "debug")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("batch_size = 0\n", "batch_size: "),
        ("batch_size = 100001\n", "batch_size: "),
        ('batch_size = "many"\n', "batch_size: "),
        ("pool_size = 1\n", "pool_size: "),
        ("poll_interval = 0\n", "poll_interval: "),
        ('schema = "Bad-Name"\n', "schema: 'Bad-Name' is not a plain lower-case identifier"),
        ('read_model_schema = "x; drop"\n', "read_model_schema: "),
        ('on_error = "explode"\n', "on_error: "),
        ('log_format = "xml"\n', "log_format: "),
        ('metrics_address = "9187"\n', "metrics_address: '9187' is not HOST:PORT"),
        ('metrics_address = "host:70000"\n', "metrics_address: "),
        ('projections = ["nocolon"]\n', "'nocolon' is not of the form 'module:attr'"),
        ('instance_name = "a\\nb"\n', "instance_name: must be printable text"),
        ("no_such_key = 1\n", "no_such_key: unknown key"),
        ('batch_max_bytes = "1KB"\n', "batch_max_bytes: "),
    ],
)
def test_malformed_values_are_one_line_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(toml(tmp_path, text))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(toml(tmp_path, 'batch_size = 0\non_error = "x"\n'))
    assert str(caught.value).count(";") == 1
    assert "batch_size" in str(caught.value) and "on_error" in str(caught.value)


def test_a_malformed_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJECTORD_MAX_ATTEMPTS", "lots")
    with pytest.raises(ConfigError, match=r"^max_attempts: .*\(got 'lots'\)$"):
        load_settings()


def test_a_database_url_that_does_not_parse_is_refused_without_echoing_it() -> None:
    secret = "postgresql://u:hunter2@[::1/db"  # psycopg would quote all of it
    with pytest.raises(ConfigError) as caught:
        load_settings(database_url=secret)
    assert str(caught.value).startswith("database_url: cannot be parsed")
    assert "hunter2" not in str(caught.value)


def test_database_url_is_kept_secret_but_usable(tmp_path: Path) -> None:
    settings = load_settings(database_url="postgresql://u:hunter2@localhost/db")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in redact(settings.database_dsn or "")
    with pytest.raises(ConfigError, match=r"^database_url: "):
        load_settings(toml(tmp_path, "database_url = 42\n"))
    assert settings.database_dsn == "postgresql://u:hunter2@localhost/db"
    assert load_settings(database_url="embedded").database_dsn == "embedded"


def test_an_error_about_an_unparsable_url_withholds_its_text() -> None:
    """The URL cannot be parsed, so its password cannot be found: say nothing of the text."""
    text = describe_error(ValueError("near 'password hunter2'"), "host=h password hunter2")
    assert "hunter2" not in text and "ValueError" in text


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_settings(toml(tmp_path, "batch_size = = 1\n"))
    assert "\n" not in str(caught.value)


# -- where the control socket is --------------------------------------------------------------


def test_socket_path_configured_then_systemd_runtime_directory_then_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    assert settings.socket_path() == tmp_path / "state" / "control.sock"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/projectord:/run/other")
    assert settings.socket_path() == Path("/run/projectord/control.sock")
    explicit = Settings(state_dir=tmp_path, control_socket=tmp_path / "c.sock")
    assert explicit.socket_path() == tmp_path / "c.sock"


# -- what a reload (SIGHUP) changed ---------------------------------------------------------------


def test_reload_applies_runtime_keys_and_names_the_others_without_values() -> None:
    old = Settings(batch_size=100, database_url="postgresql://u:old@h/db", pool_size=4)
    new = Settings(batch_size=200, database_url="postgresql://u:new@h/db", pool_size=4)
    changed, needs_restart = compare_settings(old, new)
    assert changed == {"batch_size": (100, 200)}
    assert needs_restart == ["database_url"]


def test_reload_without_changes_reports_nothing() -> None:
    assert compare_settings(Settings(), Settings()) == ({}, [])


def test_every_runtime_key_is_a_setting() -> None:
    assert set(RUNTIME_KEYS) <= set(Settings.model_fields)
