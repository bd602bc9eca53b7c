"""Configuration: command-line flags > `PROJECTORD_*` environment > TOML file > defaults.

Invalid configuration is reported as one line naming the key and the problem (`ConfigError`);
the CLI turns it into exit status 2 before anything starts.
"""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import ByteSize, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ConfigError(Exception):
    """A configuration problem, already phrased for an operator."""


with warnings.catch_warnings():
    # A key named `schema` is part of the contract; it shadows a deprecated pydantic method only.
    warnings.filterwarnings("ignore", message='Field name "schema"')

    class Settings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="PROJECTORD_", extra="forbid")

        database_url: SecretStr | None = None
        projections: Annotated[list[str], NoDecode] = []
        aggregates: Annotated[list[str], NoDecode] = []
        # Registries of event upcasters, "module:attr" (docs/upcasting.md).
        upcasters: Annotated[list[str], NoDecode] = []
        schema: str = "projectord"  # type: ignore[assignment]
        read_model_schema: str = "public"
        control_socket: Path | None = None
        state_dir: Path = Path(".projectord")
        batch_size: int = Field(default=2000, ge=1, le=100_000)
        # Bytes of events (payload and metadata as JSON text) in a batch and the one read ahead
        # together; an int or a size such as "32MiB" (docs/batches.md).
        batch_max_bytes: ByteSize = Field(default=ByteSize(32 * 2**20), ge=2**10, le=2**31 - 1)
        poll_interval: float = Field(default=5.0, gt=0, le=3600)
        pool_size: int = Field(default=10, ge=2, le=200)
        drain_timeout: float = Field(default=20.0, gt=0)
        log_format: Literal["auto", "json", "console"] = "auto"
        log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
        # Operations: control socket limits, health thresholds, watchdog, metrics (README,
        # "Operating projectord").
        control_idle_timeout: float = Field(default=60.0, gt=0, le=86_400)
        control_max_clients: int = Field(default=32, ge=1, le=1024)
        health_max_lag: int = Field(default=10_000, ge=0)
        health_max_lag_seconds: float = Field(default=300.0, gt=0)
        health_horizon_seconds: float = Field(default=5.0, gt=0)
        stall_timeout: float = Field(default=120.0, gt=0)
        metrics_address: str | None = None
        health_outage_seconds: float = Field(default=60.0, gt=0)
        # How long `init` (also run at the daemon's start) waits for any one lock (seconds).
        init_lock_timeout: float = Field(default=30.0, gt=0, le=3600)
        health_notify_queue_usage: float = Field(default=0.1, ge=0, le=1)
        # Faults and scale-out (README, "Errors and dead letters", "Running several instances").
        on_error: Literal["pause", "skip"] = "pause"
        max_attempts: int = Field(default=5, ge=1, le=1000)
        handler_timeout: float = Field(default=60.0, gt=0, le=86_400)
        instance_name: str | None = Field(default=None, min_length=1, max_length=200)
        # How long the tables of a projection's previous version are kept after a new version
        # is swapped in, for `projectord rollback` (seconds; docs/evolution.md).
        version_retention: float = Field(default=604_800.0, ge=0, le=31_536_000)

        @field_validator("projections", "aggregates", "upcasters", mode="before")
        @classmethod
        def _split_specs(cls, value: Any) -> Any:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            return value

        @field_validator("projections", "aggregates", "upcasters")
        @classmethod
        def _check_specs(cls, value: list[str]) -> list[str]:
            for spec in value:
                module, _, attr = spec.partition(":")
                if not module or not attr:
                    raise ValueError(f"{spec!r} is not of the form 'module:attr'")
            return value

        @field_validator("schema", "read_model_schema")
        @classmethod
        def _check_identifier(cls, value: str) -> str:
            if not _IDENTIFIER.match(value):
                raise ValueError(
                    f"{value!r} is not a plain lower-case identifier of at most 63 characters"
                    " ([a-z_][a-z0-9_]*)"
                )
            return value

        @field_validator("metrics_address")
        @classmethod
        def _check_metrics_address(cls, value: str | None) -> str | None:
            if value is None:
                return None
            host, _, port = value.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not HOST:PORT (e.g. '127.0.0.1:9187')")
            return value

        @field_validator("database_url")
        @classmethod
        def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
            # psycopg's parse errors quote pieces of the string, which may be the password: the
            # message says only that it does not parse.
            if value is not None and value.get_secret_value() != "embedded":
                try:
                    conninfo_to_dict(value.get_secret_value())
                except psycopg.ProgrammingError:
                    raise ValueError(
                        "cannot be parsed as a libpq URL or key=value connection string"
                    ) from None
            return value

        @field_validator("instance_name")
        @classmethod
        def _check_instance_name(cls, value: str | None) -> str | None:
            if value is not None and not value.isprintable():
                raise ValueError("must be printable text (it appears in status and logs)")
            return value

        @field_validator("log_level", mode="before")
        @classmethod
        def _lower_level(cls, value: Any) -> Any:
            return value.lower() if isinstance(value, str) else value

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            toml_file = settings_cls.model_config.get("toml_file")
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_file:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            return tuple(sources)

        @property
        def database_dsn(self) -> str | None:
            return self.database_url.get_secret_value() if self.database_url else None

        def socket_path(self) -> Path:
            """`control_socket`, else `$RUNTIME_DIRECTORY/control.sock` under systemd, else
            `<state_dir>/control.sock` (the contract's default). An operator's shell has no
            RUNTIME_DIRECTORY, so the example config names the unit's socket path outright: a
            command given the daemon's config file then finds the daemon's socket."""
            if self.control_socket is not None:
                return self.control_socket
            runtime = os.environ.get("RUNTIME_DIRECTORY")
            if runtime:
                return Path(runtime.split(":")[0]) / "control.sock"
            return self.state_dir / "control.sock"


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from every source; raise `ConfigError` with one readable line."""
    path = config_file or os.environ.get("PROJECTORD_CONFIG")
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:  # unreadable, or not UTF-8 (SIGHUP too)
            raise ConfigError(f"config file {path}: cannot be read: {exc}") from None
    settings_cls: type[Settings] = Settings
    if path:
        settings_cls = type(
            "FileSettings",
            (Settings,),
            {"model_config": SettingsConfigDict(**{**Settings.model_config, "toml_file": path})},
        )
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "configuration"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in error and not isinstance(error["input"], dict) and key != "database_url":
            message = f"{message} (got {error['input']!r})"
        problems.append(f"{key}: {message}")
    return "; ".join(problems)
