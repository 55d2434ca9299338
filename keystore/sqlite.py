"""SQLite backend: one file, created on first use, shared by the filter and the admin commands.

The filter only reads. It reopens the file when it was replaced, and never creates it after
start-up: a store that vanished must read as an error (mail deferred), not as an empty store
(mail stored in clear).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from keystore.model import Binding, EncryptionKey, StoredKey
from keystore.store import StoreError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    fingerprint TEXT PRIMARY KEY,
    key_data BLOB NOT NULL,
    expires INTEGER,
    encryption_keys TEXT NOT NULL,
    user_ids TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bindings (
    address TEXT NOT NULL,
    fingerprint TEXT NOT NULL REFERENCES keys (fingerprint),
    created INTEGER NOT NULL,
    PRIMARY KEY (address, fingerprint)
);
CREATE INDEX IF NOT EXISTS bindings_by_fingerprint ON bindings (fingerprint);
"""


class SQLiteKeyStore:
    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._connect(create=True)
        self._connect(create=False)

    # -- connection handling -------------------------------------------------------------
    def _connect(self, *, create: bool) -> sqlite3.Connection:
        mode = "rwc" if create else "rw"
        try:
            conn = sqlite3.connect(
                f"file:{self.path}?mode={mode}", uri=True, check_same_thread=False, timeout=5
            )
            conn.execute("PRAGMA busy_timeout = 5000")
            if create:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                conn.commit()
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"cannot open key store {self.path}: {error}") from error
        if version is None or int(version[0]) != SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"key store {self.path} has an unknown schema version")
        if self._conn is not None:
            self._conn.close()
        self._conn = conn
        self._identity = self._file_identity()
        return conn

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def _connection(self) -> sqlite3.Connection:
        identity = self._file_identity()
        if identity is None:
            raise StoreError(f"key store {self.path} is missing")
        if self._conn is None or identity != self._identity:
            return self._connect(create=False)
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- queries -------------------------------------------------------------------------
    def keys_for(self, address: str) -> list[StoredKey]:
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute(
                        "SELECT k.fingerprint, k.key_data, k.expires, k.encryption_keys,"
                        " k.user_ids, k.revoked FROM bindings b JOIN keys k USING (fingerprint)"
                        " WHERE b.address = ? ORDER BY b.created, k.fingerprint",
                        (address,),
                    )
                    .fetchall()
                )
            except sqlite3.Error as error:
                self._drop()
                raise StoreError(f"key store lookup failed: {error}") from error
        return [_row_to_key(row) for row in rows]

    def bindings(self) -> list[Binding]:
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute(
                        "SELECT b.address, b.created, k.fingerprint, k.key_data, k.expires,"
                        " k.encryption_keys, k.user_ids, k.revoked FROM bindings b"
                        " JOIN keys k USING (fingerprint) ORDER BY b.address, k.fingerprint"
                    )
                    .fetchall()
                )
            except sqlite3.Error as error:
                self._drop()
                raise StoreError(f"key store listing failed: {error}") from error
        return [Binding(row[0], _row_to_key(row[2:]), row[1]) for row in rows]

    def bind(self, address: str, key: StoredKey, *, replace: bool = True) -> None:
        now = int(time.time())
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute(
                        "INSERT INTO keys (fingerprint, key_data, expires, encryption_keys,"
                        " user_ids, updated) VALUES (?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (fingerprint) DO UPDATE SET key_data = excluded.key_data,"
                        " expires = excluded.expires, encryption_keys = excluded.encryption_keys,"
                        " user_ids = excluded.user_ids, updated = excluded.updated",
                        (
                            key.fingerprint,
                            key.key_data,
                            key.expires,
                            json.dumps([[k.fingerprint, k.expires] for k in key.encryption_keys]),
                            json.dumps(list(key.user_ids)),
                            now,
                        ),
                    )
                    if replace:
                        conn.execute(
                            "DELETE FROM bindings WHERE address = ? AND fingerprint != ?",
                            (address, key.fingerprint),
                        )
                    conn.execute(
                        "INSERT OR IGNORE INTO bindings (address, fingerprint, created)"
                        " VALUES (?, ?, ?)",
                        (address, key.fingerprint, now),
                    )
                    _delete_unbound(conn)
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error

    def revoke(self, fingerprint: str) -> int:
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute(
                        "UPDATE keys SET revoked = 1, updated = ? WHERE fingerprint = ?",
                        (int(time.time()), fingerprint),
                    )
                    row = conn.execute(
                        "SELECT count(*) FROM bindings WHERE fingerprint = ?", (fingerprint,)
                    ).fetchone()
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error
            return int(row[0])

    def remove(self, address_or_fingerprint: str) -> int:
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    cursor = conn.execute(
                        "DELETE FROM bindings WHERE address = ? OR fingerprint = ?",
                        (address_or_fingerprint.lower(), address_or_fingerprint.upper()),
                    )
                    _delete_unbound(conn)
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error
            return cursor.rowcount

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _delete_unbound(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM keys WHERE fingerprint NOT IN (SELECT fingerprint FROM bindings)")


def _row_to_key(row: tuple[object, ...] | list[object]) -> StoredKey:
    fingerprint, key_data, expires, encryption_keys, user_ids, revoked = row
    assert isinstance(fingerprint, str) and isinstance(key_data, bytes)
    assert isinstance(encryption_keys, str) and isinstance(user_ids, str)
    return StoredKey(
        fingerprint=fingerprint,
        key_data=key_data,
        expires=expires if isinstance(expires, int) else None,
        encryption_keys=tuple(EncryptionKey(f, e) for f, e in json.loads(encryption_keys)),
        user_ids=tuple(json.loads(user_ids)),
        revoked=bool(revoked),
    )
