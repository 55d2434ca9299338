"""The ``keystore:`` section of the configuration: which store holds the keys.

It lives with the storage it describes, so the registry opens its store without importing the
filter; gpgfilter's configuration loads it like its other sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, slots=True)
class KeystoreConfig:
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # SQLite only. Default: DATA_DIR/keys.sqlite
    path: Path | None = None
    # PostgreSQL only, e.g. postgresql://gpgfilter@db.example.org/gpgfilter; a password is
    # better kept in ~/.pgpass or PGPASSFILE than here.
    dsn: str | None = None
    # Seconds the filter waits for one key lookup before deferring that recipient (451).
    lookup_timeout: float = 5.0
    # Seconds a change to a registered key (a new key, a revocation, a setting) may take to
    # reach a running filter, which keeps the keys it looked up while the store reports no
    # change. An address without a key is always asked afresh. 0 asks the store every time.
    lookup_cache: float = 1.0

    def check(self, prefix: str) -> None:
        """Combinations the types allow but that make no sense; a ValueError naming the key
        (under ``prefix``, where the section sits) for the configuration loader to report."""
        # A DSN beside the default backend would quietly give each host its own registry.
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError(f"{prefix}dsn: required when {prefix}backend is postgresql")
        if self.backend != "postgresql" and self.dsn is not None:
            raise ValueError(f"{prefix}dsn: only used when {prefix}backend is postgresql")
        if self.backend != "sqlite" and self.path is not None:
            raise ValueError(f"{prefix}path: only used when {prefix}backend is sqlite")
        if not 0 < self.lookup_timeout <= 300:
            raise ValueError(f"{prefix}lookup_timeout: must be between 0 and 300 seconds")
        if not 0 <= self.lookup_cache <= 60:
            raise ValueError(f"{prefix}lookup_cache: must be between 0 and 60 seconds")
