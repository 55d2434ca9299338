"""``gpgfilter setup --sweep-timer``: the sweep's units written with this installation's paths
(to a directory of the test's: no systemd here), shown by --dry-run, removed by --undo."""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from gpgfilter.ops.sweeptimer import SERVICE, TIMER, units
from gpgfilter.process.cli import main

DIST = Path(__file__).resolve().parents[2] / "dist" / "systemd"


def test_install_dry_run_and_undo(tmp_path: Path) -> None:
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    units_dir = tmp_path / "units"
    command = ["-c", str(config), "setup", "--sweep-timer", "--systemd-dir", str(units_dir)]
    runner = CliRunner()

    dry = runner.invoke(main, [*command, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"write {units_dir / SERVICE}" in dry.output and "OnUnitInactiveSec=" in dry.output
    assert not units_dir.exists()

    done = runner.invoke(main, command)
    assert done.exit_code == 0, done.output
    service = (units_dir / SERVICE).read_text()
    [exec_start] = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(program).is_absolute() and Path(program).name in (
        "gpgfilter",
        Path(sys.argv[0]).name,
    )
    assert exec_start.endswith(f"--config {config} mailbox encrypt --all --since-last --queued"), (
        exec_start
    )
    assert "User=root" in service
    assert "WantedBy=timers.target" in (units_dir / TIMER).read_text()
    again = runner.invoke(main, command)  # idempotent
    assert again.exit_code == 0 and (units_dir / SERVICE).read_text() == service

    # An admin's own unit of that name is never overwritten nor removed.
    (units_dir / TIMER).write_text("[Timer]\nOnCalendar=daily\n")
    refused = runner.invoke(main, command)
    assert refused.exit_code == 1 and "not written by gpgfilter" in refused.output
    undone = runner.invoke(main, [*command, "--undo"])
    assert undone.exit_code == 0, undone.output
    assert sorted(p.name for p in units_dir.iterdir()) == [TIMER]
    nothing = runner.invoke(main, [*command, "--undo"])
    assert "nothing to undo" in nothing.output


def test_the_shipped_units_are_what_setup_writes() -> None:
    written = units("/usr/local/bin/gpgfilter", "/etc/gpgfilter/gpgfilter.yaml")
    for name, text in written.items():
        assert (DIST / name).read_text() == text
