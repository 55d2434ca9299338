"""What an administrator installs beside the code: the sample configuration and the systemd
units."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpgfilter.process.config import Config, load
from tests.process.test_config import _keys
from tests.support.debian import require_program

DIST = Path(__file__).resolve().parent.parent / "dist"


def test_sample_config_loads_and_shows_every_key(tmp_path: Path) -> None:
    sample = DIST / "gpgfilter.yaml"
    assert load(sample) == load(None)  # everything commented out: the defaults
    text = sample.read_text()
    for dotted in _keys(Config):
        name = dotted.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*#{name}:", text, re.M), f"{dotted} missing from the sample"
    # Each shown value is valid as written (the DSN needs backend: postgresql, so it stays out).
    uncommented = re.sub(r"^(\s*)#(\w+:)", r"\1\2", text, flags=re.M)
    uncommented = re.sub(r"^\s*dsn:.*$", "", uncommented, flags=re.M)
    check = tmp_path / "uncommented.yaml"
    check.write_text(uncommented)
    assert load(check).publication.domains == ("example.org",)


@pytest.mark.parametrize("unit", ["gpgfilter.service", "gpgfilter-keyserver.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    text = (DIST / "systemd" / unit).read_text()
    assert "ProtectSystem=strict" in text and "NoNewPrivileges=yes" in text
    assert "PrivateTmp=yes" in text and "User=gpgfilter" in text
    command = Path(sys.executable).parent / "gpgfilter"
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/gpgfilter", str(command)))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, check=False
    )
    problems = [
        line
        for line in done.stderr.splitlines()
        if unit in line and "Failed to resolve" not in line and "user" not in line.lower()
    ]
    assert not problems, done.stderr
