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
