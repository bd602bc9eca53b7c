"""Plain-text tables for the command line: aligned columns, the last one free-running, each line
cut at the terminal's width.

Kept rather than rich's tables because scripts read these (`status`, `dead-letters list`) with
`grep` and `awk`: one row per line, no box characters, the same in a pipe as on a terminal; what
only a person reads (the live views, the progress bar) is drawn by rich.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence


def render_table(rows: Sequence[Sequence[str]], *, default_width: int = 120) -> list[str]:
    """`rows[0]` is the header. Every column but the last is padded to its widest cell; the last
    (an error message, say) runs on to the edge of the terminal."""
    columns = len(rows[0])
    widths = [max(len(row[i]) for row in rows) for i in range(columns - 1)]
    width = shutil.get_terminal_size((default_width, 24)).columns
    lines = []
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        lines.append((line + "  " + row[-1]).rstrip()[:width])
    return lines
