"""Issue 15 §2: a command given the daemon's config file reaches the daemon's socket, wherever it
runs, although the daemon runs under systemd (RUNTIME_DIRECTORY set) and the operator's shell
does not. The example config names the unit's socket path, as the config here does."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.harness import DaemonProcess, TestDatabase, run_cli

LEDGER = "tests.support.projections:ledger_only"


def test_status_with_the_daemons_config_finds_its_socket(
    db: TestDatabase, state_dir: Path, tmp_path: Path
) -> None:
    db.init(LEDGER)
    runtime = tmp_path / "run"
    runtime.mkdir()
    config = tmp_path / "projectord.toml"
    config.write_text(
        f'state_dir = "{state_dir}"\ncontrol_socket = "{runtime / "control.sock"}"\n'
        f'projections = ["{LEDGER}"]\n'
    )
    systemd_like = {"PROJECTORD_CONFIG": str(config), "RUNTIME_DIRECTORY": str(runtime)}
    with DaemonProcess(db.url, LEDGER, state_dir, extra_env=systemd_like) as daemon:
        assert (runtime / "control.sock").is_socket()
        result = run_cli("status", "--json", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert [p["name"] for p in json.loads(result.stdout)["projections"]] == ["ledger"]
        assert daemon.stop() == 0
