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

from keystore.model import AuditEntry, Binding, EncryptionKey, PendingChange, StoredKey
from keystore.storage.migrations import newer_schema
from keystore.store import PRUNE_EVERY, KeyWasRevoked, StaleMerge, StoreError, scope_kind, state_of

# Each entry upgrades the schema by one version; a store is brought up to date when opened.
_MIGRATIONS = (
    """
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
    """,
    """
    CREATE TABLE pending (
        token_hash TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        key_data BLOB NOT NULL,
        expires_key INTEGER,
        encryption_keys TEXT NOT NULL,
        user_ids TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        origin TEXT NOT NULL
    );
    CREATE INDEX pending_by_address ON pending (address);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        address TEXT NOT NULL,
        action TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        actor TEXT NOT NULL
    );
    CREATE INDEX audit_by_address ON audit (address);
    CREATE TABLE events (scope TEXT NOT NULL, at INTEGER NOT NULL);
    CREATE INDEX events_by_scope ON events (scope, at);
    CREATE TABLE notices (
        fingerprint TEXT NOT NULL,
        kind TEXT NOT NULL,
        sent INTEGER NOT NULL,
        PRIMARY KEY (fingerprint, kind)
    );
    """,
    # Revoked keys are remembered after their stored copy is gone.
    """
    CREATE TABLE revoked (fingerprint TEXT PRIMARY KEY, at INTEGER NOT NULL);
    INSERT INTO revoked (fingerprint, at) SELECT fingerprint, updated FROM keys WHERE revoked;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class SQLiteKeyStore:
    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._pruned: dict[str, int] = {}  # scope kind -> when its old events were last pruned
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
            version = _migrate(conn, fresh=create)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open key store {self.path}: {error}") from error
        if version != SCHEMA_VERSION:
            conn.close()
            raise newer_schema(str(self.path), version, SCHEMA_VERSION)
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

    def key(self, fingerprint: str) -> StoredKey | None:
        rows = self._read(
            "SELECT fingerprint, key_data, expires, encryption_keys, user_ids, revoked FROM keys"
            " WHERE fingerprint = ?",
            (fingerprint.upper(),),
        )
        return _row_to_key(rows[0]) if rows else None

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

    def bind(
        self, address: str, key: StoredKey, *, replace: bool = True, expected: str | None = None
    ) -> None:
        now = int(time.time())
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    # Write-locked from the first read on: the checks hold until the commit.
                    conn.execute("BEGIN IMMEDIATE")
                    _check_bind(conn, key.fingerprint, expected)
                    conn.execute(
                        "INSERT INTO keys (fingerprint, key_data, expires, encryption_keys,"
                        " user_ids, updated) VALUES (?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (fingerprint) DO UPDATE SET key_data = excluded.key_data,"
                        " expires = excluded.expires, encryption_keys = excluded.encryption_keys,"
                        " user_ids = excluded.user_ids, updated = excluded.updated",
                        (*_key_columns(key), now),
                    )
                    # A change landed: tokens issued against the former state are void.
                    conn.execute("DELETE FROM pending WHERE address = ?", (address,))
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

    def was_revoked(self, fingerprint: str) -> bool:
        return bool(
            self._read("SELECT 1 FROM revoked WHERE fingerprint = ?", (fingerprint.upper(),))
        )

    def revoke(self, fingerprint: str) -> int:
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute(
                        "INSERT OR IGNORE INTO revoked (fingerprint, at) VALUES (?, ?)",
                        (fingerprint, int(time.time())),
                    )
                    conn.execute(
                        "UPDATE keys SET revoked = 1, updated = ? WHERE fingerprint = ?",
                        (int(time.time()), fingerprint),
                    )
                    conn.execute(
                        "DELETE FROM pending WHERE address IN"
                        " (SELECT address FROM bindings WHERE fingerprint = ?)",
                        (fingerprint,),
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
                    conn.execute(
                        "DELETE FROM pending WHERE address IN (SELECT address FROM bindings"
                        " WHERE address = ? OR fingerprint = ?)",
                        (address_or_fingerprint.lower(), address_or_fingerprint.upper()),
                    )
                    cursor = conn.execute(
                        "DELETE FROM bindings WHERE address = ? OR fingerprint = ?",
                        (address_or_fingerprint.lower(), address_or_fingerprint.upper()),
                    )
                    _delete_unbound(conn)
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error
            return cursor.rowcount

    # -- registration ----------------------------------------------------------------------
    def _write(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    return conn.execute(sql, params)
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error

    def _read(self, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as error:
                self._drop()
                raise StoreError(f"key store lookup failed: {error}") from error

    def add_pending(self, pending: PendingChange) -> None:
        key = pending.key
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute(
                        "DELETE FROM pending WHERE address = ? AND fingerprint = ?",
                        (pending.address, key.fingerprint),
                    )
                    conn.execute(
                        "INSERT INTO pending (token_hash, address, fingerprint, key_data,"
                        " expires_key, encryption_keys, user_ids, created, expires, origin)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            pending.token_hash,
                            pending.address,
                            *_key_columns(key),
                            pending.created,
                            pending.expires,
                            pending.origin,
                        ),
                    )
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error

    def take_pending(self, token_hash: str, now: int) -> PendingChange | None:
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    row = conn.execute(
                        _SELECT_PENDING + " WHERE token_hash = ?",
                        (token_hash,),
                    ).fetchone()
                    if row is None:
                        return None
                    conn.execute("DELETE FROM pending WHERE token_hash = ?", (token_hash,))
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error
        pending = _row_to_pending(row)
        return pending if pending.expires > now else None

    def pending_for(self, address: str, now: int) -> list[PendingChange]:
        rows = self._read(
            _SELECT_PENDING + " WHERE address = ? AND expires > ? ORDER BY created",
            (address, now),
        )
        return [_row_to_pending(row) for row in rows]

    def purge_pending(self, now: int) -> int:
        return self._write("DELETE FROM pending WHERE expires <= ?", (now,)).rowcount

    def record_audit(self, entry: AuditEntry) -> None:
        self._write(
            "INSERT INTO audit (at, address, action, fingerprint, actor) VALUES (?, ?, ?, ?, ?)",
            (entry.at, entry.address, entry.action, entry.fingerprint, entry.actor),
        )

    def audit_log(self, address: str | None = None, limit: int = 100) -> list[AuditEntry]:
        where = "WHERE address = ?" if address is not None else ""
        params: tuple[object, ...] = (address, limit) if address is not None else (limit,)
        rows = self._read(
            f"SELECT at, address, action, fingerprint, actor FROM audit {where}"  # noqa: S608
            " ORDER BY at DESC, id DESC LIMIT ?",
            params,
        )
        return [AuditEntry(*row) for row in rows]  # type: ignore[arg-type]

    def hit(self, scope: str, now: int, window: int, limit: int) -> int:
        kind, end = scope_kind(scope)
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute(
                        "DELETE FROM events WHERE scope = ? AND at <= ?", (scope, now - window)
                    )
                    if now - self._pruned.get(kind, 0) >= PRUNE_EVERY:
                        conn.execute(
                            "DELETE FROM events WHERE scope >= ? AND scope < ? AND at <= ?",
                            (kind, end, now - window),
                        )
                        self._pruned[kind] = now
                    row = conn.execute(
                        "SELECT count(*) FROM events WHERE scope = ?", (scope,)
                    ).fetchone()
                    count = int(row[0])
                    if count < limit:
                        conn.execute("INSERT INTO events (scope, at) VALUES (?, ?)", (scope, now))
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error
        return count + 1

    def mark_notice(self, fingerprint: str, kind: str) -> bool:
        cursor = self._write(
            "INSERT OR IGNORE INTO notices (fingerprint, kind, sent) VALUES (?, ?, ?)",
            (fingerprint, kind, int(time.time())),
        )
        return cursor.rowcount == 1

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _migrate(conn: sqlite3.Connection, *, fresh: bool) -> int:
    """Bring the schema up to date in one transaction; returns the version found or reached."""
    if fresh:
        current = 0
    else:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        current = int(row[0]) if row else -1
        if current < 1:
            raise sqlite3.DatabaseError("not a gpgfilter key store (no schema version)")
    if current >= SCHEMA_VERSION:
        return current
    conn.execute("BEGIN IMMEDIATE")
    try:
        for script in _MIGRATIONS[current:]:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def _check_bind(conn: sqlite3.Connection, fingerprint: str, expected: str | None) -> None:
    """Refuse a key ever revoked, and a merge made against a copy that has changed since."""
    if conn.execute("SELECT 1 FROM revoked WHERE fingerprint = ?", (fingerprint,)).fetchone():
        raise KeyWasRevoked(fingerprint)
    if expected is None:
        return
    row = conn.execute("SELECT key_data FROM keys WHERE fingerprint = ?", (fingerprint,)).fetchone()
    if state_of(None if row is None else row[0]) != expected:
        raise StaleMerge(f"the stored copy of {fingerprint} changed during the update")


def _delete_unbound(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM keys WHERE fingerprint NOT IN (SELECT fingerprint FROM bindings)")


_SELECT_PENDING = (
    "SELECT fingerprint, key_data, expires_key, encryption_keys, user_ids, 0,"
    " token_hash, address, created, expires, origin FROM pending"
)


def _key_columns(key: StoredKey) -> tuple[object, ...]:
    return (
        key.fingerprint,
        key.key_data,
        key.expires,
        json.dumps([[k.fingerprint, k.expires] for k in key.encryption_keys]),
        json.dumps(list(key.user_ids)),
    )


def _row_to_pending(row: tuple[object, ...]) -> PendingChange:
    token_hash, address, created, expires, origin = row[6:]
    assert isinstance(token_hash, str) and isinstance(address, str) and isinstance(origin, str)
    assert isinstance(created, int) and isinstance(expires, int)
    return PendingChange(token_hash, address, _row_to_key(row[:6]), created, expires, origin)


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
