"""Tests that need a Debian package: skipped on a developer's machine without it, failed under CI.

A test run in CI (environment variable ``CI`` set, as CI services do) must never pass by
silently skipping what it was meant to prove; on a workstation, a missing package is a skip
that names the package to install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def under_ci() -> bool:
    """Whether missing requirements are errors: ``CI`` set to anything but empty/0/false/no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_unless_ci(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skip the calling test (or module) for ``reason``; fail it instead under CI."""
    if under_ci():
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def require_program(program: str, package: str, *, allow_module_level: bool = False) -> str:
    """The path of ``program`` (a name looked up on PATH, or an absolute path) that Debian's
    ``package`` installs; skips the calling test when it is missing, fails it under CI."""
    if os.path.isabs(program):
        found = program if Path(program).is_file() and os.access(program, os.X_OK) else None
    else:
        found = shutil.which(program)
    if found is None:
        skip_unless_ci(
            f"needs {program} (apt-get install {package})", allow_module_level=allow_module_level
        )
    return found
