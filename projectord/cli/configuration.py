"""The configuration flags every subcommand accepts, and the settings and projections they give.

There is a flag for every configuration key (`--batch-max-bytes` for `batch_max_bytes`); a flag
overrides the environment (`PROJECTORD_<KEY>`), which overrides the TOML file. The rules and the
checks themselves live in `projectord.config`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from projectord.config import ConfigError, Settings, load_settings
from projectord.embedded import EMBEDDED_URL
from projectord.logs import configure_logging
from projectord.projection import Projection, load_projections
from projectord.upcasting import install, load_upcasters

# Keys whose flag says more than "the key": a help text, or a type argparse checks itself.
DESCRIBED: dict[str, dict[str, Any]] = {
    "database_url": {
        "help": 'libpq URL or DSN, or "embedded" for a private embedded Postgres',
    },
    "projections": {"help": "comma-separated module:attr list"},
    "aggregates": {"help": "comma-separated module:attr list (command side)"},
    "schema": {"help": "schema of projectord's own tables"},
    "read_model_schema": {"help": "schema of the projections' tables"},
    "control_socket": {"type": Path, "help": "default: <state_dir>/control.sock"},
    "state_dir": {"type": Path},
    "batch_size": {"type": int},
    "poll_interval": {"type": float},
    "log_format": {"choices": ["auto", "json", "console"]},
}

# Every key, in the order `Settings` declares them.
SETTING_FLAGS = tuple(Settings.model_fields)


def configuration_flags() -> argparse.ArgumentParser:
    """Flags every subcommand accepts: `--config`, `--embedded` and one per configuration key.
    The keys without a type here are passed on as text and checked by `Settings`, which names
    the key in its one-line error."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration (a flag per key; see --config)")
    group.add_argument("--config", type=Path, help="TOML configuration file")
    group.add_argument(
        "--embedded",
        action="store_true",
        help='use a private embedded Postgres in state_dir (database_url = "embedded")',
    )
    for key in SETTING_FLAGS:
        options = dict(DESCRIBED.get(key, {}))
        options.setdefault("help", _default_help(key))
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, **options)
    return parent


def _default_help(key: str) -> str:
    default = Settings.model_fields[key].default
    return f"the {key} key" if default is None else f"the {key} key (default {default})"


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {key: getattr(args, key, None) for key in SETTING_FLAGS}
    if getattr(args, "embedded", False):
        if overrides["database_url"] not in (None, EMBEDDED_URL):
            raise ConfigError("database_url: --embedded and --database-url are both given")
        overrides["database_url"] = EMBEDDED_URL
    return load_settings(args.config, **overrides)


def configured(args: argparse.Namespace) -> Settings:
    """The settings, with logging configured and the configured upcasters installed before any
    event is decoded or appended (docs/upcasting.md)."""
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    install(load_upcasters(settings.upcasters))
    return settings


def load(args: argparse.Namespace) -> tuple[Settings, list[Projection]]:
    """`configured` settings and the projections, both checked before anything starts."""
    settings = configured(args)
    return settings, load_projections(settings.projections)
