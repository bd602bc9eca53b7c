"""The status table: one row per projection, as `projectord status` prints it.

Plain aligned text (`projectord.cli.text_table`), not rich: it is the same on a terminal and in a
pipe, so scripts that `grep` or `awk` it read what an operator sees; the live view
(`status --watch`), which only a person reads, is drawn by rich.
"""

from __future__ import annotations

from typing import Any

from projectord.cli.text_table import render_table

COLUMNS = ("NAME", "STATE", "OWNER", "LAG", "LAG_S", "CAUGHT_UP", "APPLIED", "EV/S", "LAST ERROR")


def render_status(result: dict[str, Any]) -> str:
    lines = render_table([COLUMNS] + [status_row(p) for p in result["projections"]])
    return "\n".join(lines + status_notes(result))


def status_notes(result: dict[str, Any]) -> list[str]:
    """What the table does not show: the daemon's own state, as lines under it."""
    notes = [f"* runs in this daemon ({result['instance']})"]
    if not result["database"]["reachable"]:
        notes.append(f"database unreachable: {result['database']['error']}")
    if not result["listener"]["connected"]:
        notes.append("listener disconnected: projections only poll")
    if result.get("stopping"):
        notes.append("the daemon is stopping")
    notes += [line for p in result["projections"] if (line := version_note(p))]
    return notes


def version_note(p: dict[str, Any]) -> str | None:
    """A line for a projection whose versions differ: a build, or code older than the serving
    version (docs/evolution.md)."""
    versions = p.get("versions")
    if not versions:
        return None
    build, serving = versions.get("build"), versions.get("serving_version")
    if build:
        rebuild = build["version"] == serving  # a versioned drift repair, or its rollback
        return (
            f"{p['name']}: {'rebuild of ' if rebuild else ''}version {build['version']}"
            f" {build['state']} (applied {_cell(build['applied_total'])}, lag"
            f" {_cell(build['lag'])}, owner {build['owner'] or '-'}) while"
            + (" its current tables serve" if rebuild else f" version {serving} serves")
        )
    if serving is not None and serving != versions["version"]:
        mine = versions["version"]
        return f"{p['name']}: version {serving} serves; this daemon runs version {mine}"
    return None


def status_row(p: dict[str, Any]) -> tuple[str, ...]:
    error = p["last_error"]
    error_text = ""
    if error:
        where = (
            f"event {error['event_id']} ({error['event_type']}): " if error.get("event_id") else ""
        )
        attempts = f" [attempt {error['attempts']}]" if error.get("attempts") else ""
        error_text = f"{where}{error['message']}{attempts}"
    state = p["state"]
    if p.get("rebuild") and not p["rebuild"]["done"]:
        state += f" {rebuild_percent(p['rebuild'])}%"
    owner = f"{p['owner'] or '-'}{' *' if p.get('local') else ''}"
    return (
        p["name"],
        state,
        owner,
        _cell(p["lag"]),
        _cell(p["lag_seconds"]),
        "yes" if p["caught_up"] else "no",
        _cell(p["applied_total"]),
        _cell(p["events_per_second"]),
        error_text,
    )


def _cell(value: Any) -> str:
    return "?" if value is None else str(value)


def rebuild_percent(progress: dict[str, Any]) -> int:
    total = progress["total"]
    return 100 if not total else min(100, int(100 * progress["applied"] / total))
