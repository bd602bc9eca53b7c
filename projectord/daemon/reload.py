"""Which settings SIGHUP may change in a running daemon, and what a reload changed.

Runtime-changeable: the log level, batch size and byte bound, poll interval, drain timeout,
control-socket limits, health thresholds and the watchdog's stall timeout. Everything else
(database, projections, schemas, socket path, pool size, metrics address, log format) needs a
restart: a reload names those keys and leaves them as they were. Values are never logged for
those keys, so the database URL cannot leak.
"""

from __future__ import annotations

from typing import Any

from projectord.config import Settings

RUNTIME_KEYS = (
    "log_level",
    "batch_size",
    "batch_max_bytes",
    "poll_interval",
    "drain_timeout",
    "control_idle_timeout",
    "control_max_clients",
    "health_max_lag",
    "health_max_lag_seconds",
    "health_horizon_seconds",
    "stall_timeout",
    "health_outage_seconds",
    "health_notify_queue_usage",
    "version_retention",
)


def compare_settings(old: Settings, new: Settings) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """(runtime keys that changed: old and new value, other keys that changed: names only)."""
    changed = {
        key: (getattr(old, key), getattr(new, key))
        for key in RUNTIME_KEYS
        if getattr(old, key) != getattr(new, key)
    }
    needs_restart = [
        key
        for key in type(old).model_fields
        if key not in RUNTIME_KEYS and getattr(old, key) != getattr(new, key)
    ]
    return changed, needs_restart
