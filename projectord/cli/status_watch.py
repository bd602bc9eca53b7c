"""`projectord status --watch`: the status table, refreshed until Ctrl-C.

On a terminal rich draws it in place (colour, the terminal's width, resizes, any terminal rich
supports); anywhere else each refresh is printed as plain text after the last, like a log, so a
pipe or a file gets every table whole.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from projectord.cli.daemon_requests import ask
from projectord.cli.exits import EXIT_OK
from projectord.cli.status_table import COLUMNS, render_status, status_notes, status_row
from projectord.control.client import ControlClient, ControlError, NoDaemon

STATE_STYLES = {"running": "green", "paused": "yellow", "retrying": "yellow", "failed": "bold red"}


def watch_status(client: ControlClient, interval: float, out: TextIO) -> int:
    """Refresh every `interval` until interrupted; a daemon that goes away is shown and retried,
    not fatal (the first request still exits 3 when no daemon answers)."""
    ask(client, "status")
    # Ctrl-C is how a watch ends, so it takes SIGINT even when started with it ignored: a
    # script's `cmd &` starts it so, and the watch then ran on after the SIGINT (the cause of
    # test_status_watch_refreshes_until_interrupted's failures).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if out.isatty():
            _watch_live(client, interval, out)
        else:
            _watch_plain(client, interval, out)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _header(interval: float) -> str:
    return f"{datetime.now():%H:%M:%S}  (every {interval:g}s, Ctrl-C to stop)"


def _watch_plain(client: ControlClient, interval: float, out: TextIO) -> None:
    while True:
        try:
            text = render_status(client.request("status"))
        except (NoDaemon, ControlError) as exc:
            text = f"projectord: {exc}"
        out.write(f"{_header(interval)}\n{text}\n")
        out.flush()
        time.sleep(interval)


def _watch_live(client: ControlClient, interval: float, out: TextIO) -> None:
    with Live(console=Console(file=out), auto_refresh=False) as live:
        while True:
            live.update(_frame(client, interval), refresh=True)
            time.sleep(interval)


def _frame(client: ControlClient, interval: float) -> Group:
    header = Text(_header(interval), style="dim")
    try:
        result = client.request("status")
    except (NoDaemon, ControlError) as exc:
        return Group(header, Text(f"projectord: {exc}", style="bold red"))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for projection in result["projections"]:
        cells = status_row(projection)
        style = STATE_STYLES.get(projection["state"], "cyan")
        table.add_row(cells[0], Text(cells[1], style=style), *cells[2:])
    return Group(header, table, *(Text(note) for note in status_notes(result)))
