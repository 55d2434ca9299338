"""The one place an OpenPGP engine is chosen, from the configuration's ``gpg`` section."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gpgfilter.openpgp.engine import Engine
from gpgfilter.openpgp.gnupg import GnuPGEngine


class EngineSettings(Protocol):
    """What the factory reads of the configuration (``gpgfilter.process.config.GpgConfig``);
    named here so that this layer does not import the process layer above it."""

    @property
    def binary(self) -> str: ...

    @property
    def compress_level(self) -> int: ...


def make_engine(settings: EngineSettings, *, home: Path) -> Engine:
    """The engine the configuration names, keeping its state under ``home``; raises
    EngineError when it cannot run."""
    return GnuPGEngine(home=home, binary=settings.binary, compress_level=settings.compress_level)
