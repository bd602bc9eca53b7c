"""The shipped example config (issue 15 §3): copied as the install steps say, it must configure
nothing but the defaults and the systemd unit's paths; above all it must not install the demo's
projections or aggregates into a production database."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from projectord.config import Settings, load_settings

EXAMPLE = Path(__file__).parents[2] / "config" / "projectord.example.toml"
# The only keys whose example value is not the default: the paths the systemd unit gives the
# daemon (RuntimeDirectory=, StateDirectory=), so that `--config` reaches its socket.
SYSTEMD_PATHS = {
    "control_socket": Path("/run/projectord/control.sock"),
    "state_dir": Path("/var/lib/projectord"),
}


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the file and the defaults: a PROJECTORD_* variable of the caller's must not count."""
    for name in list(os.environ):
        if name.startswith("PROJECTORD_") or name == "RUNTIME_DIRECTORY":
            monkeypatch.delenv(name)


def test_the_example_configures_no_projection_or_aggregate() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.projections == [] and settings.aggregates == []
    assert "samples" not in str(tomllib.loads(EXAMPLE.read_text()))


def test_the_example_equals_the_defaults_but_for_the_systemd_paths() -> None:
    example = load_settings(EXAMPLE).model_dump()
    defaults = Settings().model_dump()
    for key, path in SYSTEMD_PATHS.items():
        assert example.pop(key) == path
        defaults.pop(key)
    assert example == defaults


def test_the_example_names_every_key() -> None:
    """Set to its default, or commented out where the key has none (`# key = ...`)."""
    text = EXAMPLE.read_text()
    named = set(re.findall(r"^(?:# )?([a-z_]+) = ", text, flags=re.MULTILINE))
    assert named >= set(Settings.model_fields), set(Settings.model_fields) - named
    set_in_file = set(tomllib.loads(text))
    unset = {
        key
        for key, field in Settings.model_fields.items()
        if field.default is None and key not in SYSTEMD_PATHS
    }
    assert set_in_file == set(Settings.model_fields) - unset
