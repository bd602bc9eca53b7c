"""Log configuration: structlog, JSON lines off a TTY (journald), readable lines on one.

Event names are stable (`batch.applied`, `projection.failed`, `listener.reconnected`, …) and the
context travels as key-value pairs, so logs can be grepped and parsed.

Under systemd, when stderr is the journal (`$JOURNAL_STREAM` names its device and inode), each
line starts with its syslog priority, `<3>` for an error and so on (sd-daemon(3)): journald
stores the line at that priority without the prefix, so `journalctl -p err` finds the errors.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_METHOD_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_METHOD_LEVELS.update(msg=20, warn=30, exception=40, fatal=50)
_threshold = {"level": logging.INFO}
# syslog priorities (sd-daemon(3)) by the method structlog was called with, or the lower-cased
# level name of a stdlib record.
_PRIORITIES = {"debug": 7, "info": 6, "msg": 6, "warning": 4, "warn": 4, "error": 3}
_PRIORITIES.update(exception=3, critical=2, fatal=2)


def _drop_below_level(_logger: object, method_name: str, event_dict: dict) -> dict:  # type: ignore
    """Level filtering as a processor that reads a mutable threshold, so a new level (SIGHUP)
    also applies to loggers bound before it; a filtering wrapper class would be fixed at bind."""
    if _METHOD_LEVELS.get(method_name, logging.INFO) < _threshold["level"]:
        raise structlog.DropEvent
    return event_dict


def set_level(level: str) -> None:
    """The level of every logger, ours and the stdlib's, from now on."""
    _threshold["level"] = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(level.upper())


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal: `$JOURNAL_STREAM` is `DEVICE:INODE` of
    that stream, and stderr is still it (not redirected by whoever started us)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JournalPriority:
    """Wraps a renderer: the rendered line gets the `<N>` syslog-priority prefix journald reads."""

    def __init__(self, renderer: structlog.types.Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        line = self.renderer(logger, method_name, event_dict)
        return f"<{_PRIORITIES.get(method_name, 6)}>{line}"


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    set_level(level)
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    if stderr_is_journal():
        renderer = JournalPriority(renderer)
    stamp: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    _route_stdlib_logging(renderer, stamp, level)
    structlog.configure(
        processors=[
            _drop_below_level,
            structlog.contextvars.merge_contextvars,
            *stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _route_stdlib_logging(
    renderer: structlog.types.Processor, stamp: list[structlog.types.Processor], level: str
) -> None:
    """Libraries log through the stdlib; render their records like ours (JSON off a TTY).

    psycopg's pool logs every failed reconnection attempt as a warning; projectord logs one line
    per state change itself (`listener.disconnected`, `projection.database_unavailable`), so the
    pool is kept to errors.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("psycopg").setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
