"""The one place an OpenPGP engine is chosen, from the configuration's ``gpg`` section.

``auto`` (the default) serves each recipient with Sequoia in this process where it writes what
the mail clients read, and with gpg for the rest (keys advertising SEIPDv2, messages over
1 MiB); ``sequoia`` is the same without the size limit; ``gnupg`` starts one gpg per copy. A
compression level other than 0 means gpg for every recipient: Sequoia does not compress.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gpgfilter.openpgp.engine import Engine, EngineError, EngineName, Plaintext, Recipient
from gpgfilter.openpgp.gnupg import GnuPGEngine

Served = Callable[[EngineName], None]


class EngineSettings(Protocol):
    """What the factory reads of the configuration (``gpgfilter.process.config.GpgConfig``);
    named here so that this layer does not import the process layer above it."""

    @property
    def engine(self) -> str: ...

    @property
    def binary(self) -> str: ...

    @property
    def compress_level(self) -> int: ...


def uses_sequoia(settings: EngineSettings) -> bool:
    """Whether the configuration puts Sequoia in the mail path (so pysequoia must import)."""
    return settings.engine in ("auto", "sequoia") and settings.compress_level == 0


def engine_summary(settings: EngineSettings) -> str:
    """What serves what, in a few words: for the start-up log line and ``doctor``."""
    if not uses_sequoia(settings):
        why = " (compress_level is not 0)" if settings.engine != "gnupg" else ""
        return f"{settings.engine}: gpg for every recipient{why}"
    if settings.engine == "sequoia":
        return "sequoia: Sequoia for every key it writes readably for, gpg for the others"
    return "auto: Sequoia for keys it writes readably for up to 1 MiB, gpg for the rest"


class _Counted:
    """gpg alone, telling ``served`` of each encryption as the mixed engine does."""

    def __init__(self, engine: Engine, served: Served | None) -> None:
        self.engine = engine
        self.served = served

    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        armored = await self.engine.encrypt(plaintext, recipient)
        if self.served is not None:
            self.served("gnupg")
        return armored


def make_engine(settings: EngineSettings, *, home: Path, served: Served | None = None) -> Engine:
    """The engine the configuration names, keeping its state under ``home``; ``served`` is
    told which engine served each encryption (for the metrics). Raises EngineError when it
    cannot run — pysequoia that does not import included, so that a broken install stops
    the filter at start rather than quietly sending every message to gpg."""
    gnupg = GnuPGEngine(home=home, binary=settings.binary, compress_level=settings.compress_level)
    if not uses_sequoia(settings):
        return _Counted(gnupg, served)
    try:
        from gpgfilter.openpgp.choice import LARGE, AutoEngine  # noqa: PLC0415  # only when used
        from gpgfilter.openpgp.sequoia import SequoiaEngine  # noqa: PLC0415
    except ImportError as error:
        raise EngineError(
            f"gpg.engine {settings.engine} needs pysequoia, which does not import ({error});"
            " reinstall gpgfilter, or set gpg.engine: gnupg"
        ) from None
    large = None if settings.engine == "sequoia" else LARGE
    return AutoEngine(SequoiaEngine(), gnupg, large=large, served=served)
