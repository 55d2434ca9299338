"""Running the mail system's own tools (``postconf``, ``doveconf``, ``postfix``) for setup
and doctor, and the one error they raise."""

from __future__ import annotations

import subprocess
from collections.abc import Callable


class SetupError(RuntimeError):
    """Setup cannot proceed; the message says why and what to do."""


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def run_command(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
