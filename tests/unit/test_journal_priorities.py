"""Log lines carry their syslog priority when stderr is the journal (issue 15 §5), so that
`journalctl -p err` shows the errors; anywhere else the lines are unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.harness import ROOT

# Logs one line per level through structlog, and one through the stdlib (how libraries log).
SCRIPT = """
import logging
from projectord.logs import configure_logging, get_logger
configure_logging("json", "debug")
log = get_logger("t")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e"); log.critical("c")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("x")
logging.getLogger("library").error("stdlib")
"""


def run_logging(tmp_path: Path, journal: str | None) -> list[str]:
    """The lines written to stderr, a file; `journal` is what JOURNAL_STREAM says, where
    "match" stands for that file's own DEVICE:INODE."""
    out = tmp_path / "stderr"
    with out.open("w") as stderr:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal is not None:
            info = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = (
                f"{info.st_dev}:{info.st_ino}" if journal == "match" else journal
            )
        subprocess.run(
            [sys.executable, "-c", SCRIPT], stderr=stderr, env={**env, "PYTHONPATH": str(ROOT)},
            check=True, timeout=60,
        )  # fmt: skip
    return out.read_text().splitlines()


def test_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, "match")
    prefixes = [line[:3] for line in lines if line.startswith("<")]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>", "<3>"], lines
    assert all(line[3] == "{" for line in lines if line.startswith("<")), "prefix then JSON"


def test_no_prefix_elsewhere(tmp_path: Path) -> None:
    """No JOURNAL_STREAM, or one naming another stream (stderr was redirected since)."""
    for journal in (None, "1:2", "junk"):
        lines = run_logging(tmp_path, journal)
        assert len(lines) >= 7 and not any(line.startswith("<") for line in lines), lines
