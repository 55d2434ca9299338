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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from keystore.model import (
    AddressKeys,
    AuditEntry,
    Binding,
    HeaderProtection,
    PendingChange,
    StoredKey,
)
from keystore.storage.migrations import MIGRATIONS, SCHEMA_VERSION, newer_schema
from keystore.storage.rows import (
    ADDRESS_KEYS_QUERY,
    KEY_COLUMNS,
    PENDING_COLUMNS,
    key_columns,
    row_to_key,
    row_to_pending,
    rows_to_address_keys,
)
from keystore.store import PRUNE_EVERY, KeyWasRevoked, StaleMerge, StoreError, scope_kind, state_of

_T = TypeVar("_T")


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

    def _read(
        self, sql: str, params: tuple[object, ...] = (), *, what: str = "lookup"
    ) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as error:
                self._drop()
                raise StoreError(f"key store {what} failed: {error}") from error

    def _transaction(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` as one transaction, committed if it returns, rolled back if it raises.
        It holds the write lock from its first statement on (BEGIN IMMEDIATE), so what its
        reads found still holds at the commit, also against other processes using the file."""
        with self._lock:
            conn = self._connection()
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    return work(conn)
            except sqlite3.Error as error:
                raise StoreError(f"key store update failed: {error}") from error

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- queries -------------------------------------------------------------------------
    def keys_for(self, address: str) -> AddressKeys:
        rows = self._read(
            ADDRESS_KEYS_QUERY + " WHERE b.address = ? ORDER BY b.created, k.fingerprint",
            (address,),
        )
        return rows_to_address_keys(rows)

    def change_token(self) -> str:
        rows = self._read("SELECT token FROM key_changes")
        return str(rows[0][0])

    def set_header_protection(self, address: str, mode: HeaderProtection | None) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO address_settings (address, header_protection) VALUES (?, ?)"
                " ON CONFLICT (address) DO UPDATE"
                " SET header_protection = excluded.header_protection",
                (address, mode),
            )

        self._transaction(work)

    def key(self, fingerprint: str) -> StoredKey | None:
        rows = self._read(
            f"SELECT {KEY_COLUMNS} FROM keys WHERE fingerprint = ?",  # noqa: S608
            (fingerprint.upper(),),
        )
        return row_to_key(rows[0]) if rows else None

    def bindings(self) -> list[Binding]:
        rows = self._read(
            "SELECT b.address, b.created, k.fingerprint, k.key_data, k.expires,"
            " k.encryption_keys, k.user_ids, k.revoked FROM bindings b"
            " JOIN keys k USING (fingerprint) ORDER BY b.address, k.fingerprint",
            what="listing",
        )
        return [Binding(str(row[0]), row_to_key(row[2:]), _int(row[1])) for row in rows]

    def bind(
        self, address: str, key: StoredKey, *, replace: bool = True, expected: str | None = None
    ) -> None:
        now = int(time.time())

        def work(conn: sqlite3.Connection) -> None:
            _check_bind(conn, key.fingerprint, expected)
            conn.execute(
                "INSERT INTO keys (fingerprint, key_data, expires, encryption_keys,"
                " user_ids, updated) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (fingerprint) DO UPDATE SET key_data = excluded.key_data,"
                " expires = excluded.expires, encryption_keys = excluded.encryption_keys,"
                " user_ids = excluded.user_ids, updated = excluded.updated",
                (*key_columns(key, json.dumps), now),
            )
            # A change landed: tokens issued against the former state are void.
            conn.execute("DELETE FROM pending WHERE address = ?", (address,))
            if replace:
                conn.execute(
                    "DELETE FROM bindings WHERE address = ? AND fingerprint != ?",
                    (address, key.fingerprint),
                )
            conn.execute(
                "INSERT OR IGNORE INTO bindings (address, fingerprint, created) VALUES (?, ?, ?)",
                (address, key.fingerprint, now),
            )
            _delete_unbound(conn)

        self._transaction(work)

    def was_revoked(self, fingerprint: str) -> bool:
        return bool(
            self._read("SELECT 1 FROM revoked WHERE fingerprint = ?", (fingerprint.upper(),))
        )

    def revoke(self, fingerprint: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
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
            return int(row[0])

        return self._transaction(work)

    def remove(self, address_or_fingerprint: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            for table in ("pending", "address_settings"):
                conn.execute(
                    f"DELETE FROM {table} WHERE address IN (SELECT address FROM bindings"  # noqa: S608
                    " WHERE address = ? OR fingerprint = ?)",
                    (address_or_fingerprint.lower(), address_or_fingerprint.upper()),
                )
            removed = conn.execute(
                "DELETE FROM bindings WHERE address = ? OR fingerprint = ?",
                (address_or_fingerprint.lower(), address_or_fingerprint.upper()),
            ).rowcount
            _delete_unbound(conn)
            return removed

        return self._transaction(work)

    # -- registration ----------------------------------------------------------------------
    def add_pending(self, pending: PendingChange) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM pending WHERE address = ? AND fingerprint = ?",
                (pending.address, pending.key.fingerprint),
            )
            conn.execute(
                "INSERT INTO pending (token_hash, address, fingerprint, key_data,"
                " expires_key, encryption_keys, user_ids, created, expires, origin,"
                " header_protection, encrypt_existing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    pending.token_hash,
                    pending.address,
                    *key_columns(pending.key, json.dumps),
                    pending.created,
                    pending.expires,
                    pending.origin,
                    pending.header_protection,
                    int(pending.encrypt_existing),
                ),
            )

        self._transaction(work)

    def take_pending(self, token_hash: str, now: int) -> PendingChange | None:
        def work(conn: sqlite3.Connection) -> tuple[object, ...] | None:
            row: tuple[object, ...] | None = conn.execute(
                f"SELECT {PENDING_COLUMNS} FROM pending WHERE token_hash = ?",  # noqa: S608
                (token_hash,),
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM pending WHERE token_hash = ?", (token_hash,))
            return row

        row = self._transaction(work)
        if row is None:
            return None
        pending = row_to_pending(row)
        return pending if pending.expires > now else None

    def pending_for(self, address: str, now: int) -> list[PendingChange]:
        rows = self._read(
            f"SELECT {PENDING_COLUMNS} FROM pending"  # noqa: S608
            " WHERE address = ? AND expires > ? ORDER BY created",
            (address, now),
        )
        return [row_to_pending(row) for row in rows]

    def purge_pending(self, now: int) -> int:
        return self._transaction(
            lambda conn: conn.execute("DELETE FROM pending WHERE expires <= ?", (now,)).rowcount
        )

    def record_audit(self, entry: AuditEntry) -> None:
        self._transaction(
            lambda conn: conn.execute(
                "INSERT INTO audit (at, address, action, fingerprint, actor)"
                " VALUES (?, ?, ?, ?, ?)",
                (entry.at, entry.address, entry.action, entry.fingerprint, entry.actor),
            )
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
        prune = now - self._pruned.get(kind, 0) >= PRUNE_EVERY

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM events WHERE scope = ? AND at <= ?", (scope, now - window))
            if prune:
                conn.execute(
                    "DELETE FROM events WHERE scope >= ? AND scope < ? AND at <= ?",
                    (kind, end, now - window),
                )
            count = int(
                conn.execute("SELECT count(*) FROM events WHERE scope = ?", (scope,)).fetchone()[0]
            )
            if count < limit:
                conn.execute("INSERT INTO events (scope, at) VALUES (?, ?)", (scope, now))
            return count + 1

        counted = self._transaction(work)
        if prune:
            self._pruned[kind] = now
        return counted

    def mark_notice(self, fingerprint: str, kind: str) -> bool:
        inserted = self._transaction(
            lambda conn: (
                conn.execute(
                    "INSERT OR IGNORE INTO notices (fingerprint, kind, sent) VALUES (?, ?, ?)",
                    (fingerprint, kind, int(time.time())),
                ).rowcount
            )
        )
        return inserted == 1


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
        for migration in MIGRATIONS[current:]:
            for statement in migration.sqlite_statements():
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


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value
