"""The configuration flags every subcommand accepts, and the settings and projections they give.

A flag overrides the environment (`PROJECTORD_<KEY>`), which overrides the TOML file; the rules
themselves live in `projectord.config`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from projectord.config import ConfigError, Settings, load_settings
from projectord.embedded import EMBEDDED_URL
from projectord.logs import configure_logging
from projectord.projection import Projection, load_projections


def configuration_flags() -> argparse.ArgumentParser:
    """Flags every subcommand accepts; each overrides the environment and the TOML file."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration")
    group.add_argument("--config", type=Path, help="TOML configuration file")
    group.add_argument(
        "--database-url", help='libpq URL or DSN, or "embedded" for a private embedded Postgres'
    )
    group.add_argument(
        "--embedded",
        action="store_true",
        help='use a private embedded Postgres in state_dir (database_url = "embedded")',
    )
    group.add_argument("--projections", help="comma-separated module:attr list")
    group.add_argument("--aggregates", help="comma-separated module:attr list (command side)")
    group.add_argument("--schema", help="schema of projectord's own tables")
    group.add_argument("--read-model-schema", help="schema of the projections' tables")
    group.add_argument("--control-socket", type=Path)
    group.add_argument("--state-dir", type=Path)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--poll-interval", type=float)
    group.add_argument("--log-format", choices=["auto", "json", "console"])
    group.add_argument("--log-level")
    return parent


SETTING_FLAGS = (
    "database_url",
    "projections",
    "aggregates",
    "schema",
    "read_model_schema",
    "control_socket",
    "state_dir",
    "batch_size",
    "poll_interval",
    "log_format",
    "log_level",
)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {key: getattr(args, key, None) for key in SETTING_FLAGS}
    if getattr(args, "embedded", False):
        if overrides["database_url"] not in (None, EMBEDDED_URL):
            raise ConfigError("database_url: --embedded and --database-url are both given")
        overrides["database_url"] = EMBEDDED_URL
    return load_settings(args.config, **overrides)


def load(args: argparse.Namespace) -> tuple[Settings, list[Projection]]:
    """Settings and projections, both checked before anything starts; logging configured."""
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    return settings, load_projections(settings.projections)
