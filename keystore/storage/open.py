"""Opening the configured key store, whichever backend the configuration names."""

from __future__ import annotations

from pathlib import Path

from keystore.storage.config import KeystoreConfig
from keystore.storage.postgres import PostgresKeyStore
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.store import KeyStore, StoreError


def open_store(config: KeystoreConfig, default_sqlite_path: Path, *, create: bool) -> KeyStore:
    """The store ``config`` (the ``keystore`` section) names. ``create`` lets an absent store
    (SQLite file, empty PostgreSQL database) be made; the filter passes it only at start, so a
    store that vanishes later reads as an error, never as an empty registry."""
    if config.backend == "postgresql":
        if not config.dsn:
            raise StoreError("keystore.dsn is required with keystore.backend: postgresql")
        return PostgresKeyStore(config.dsn, create=create)
    return SQLiteKeyStore(config.path or default_sqlite_path, create=create)
