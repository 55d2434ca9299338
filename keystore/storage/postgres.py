"""PostgreSQL backend: one database shared by the filters of several hosts and the admin tools.

Every call asks the database; nothing is cached, so a key confirmed through one host is used
by the filter on every host from its next lookup on. Every database error becomes
``StoreError``: a store that cannot answer defers mail, it never reads as "no key".

One connection per store object, used under a lock: the filter's lookups are few and short
(they run in a small thread pool of the filter's own, see ``gpgfilter.mail.lookup``), and a single
connection keeps failure handling simple. A connection
found broken is dropped and the next call opens a new one; a read that fails on a connection
that was idle is retried once on a fresh one, so a database restart does not defer the next
message. Writes are not retried: a commit whose answer was lost may or may not have happened.

The schema is created in an empty database when the store is opened with ``create`` (the
filter at start, ``keys import``) and upgraded when opened by a newer gpgfilter, under an
advisory lock so hosts starting together do not race. It is never created on a reconnect: a
database that lost its tables must defer mail, not come back empty.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

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
from keystore.store import (
    PRUNE_EVERY,
    KeyWasRevoked,
    StaleMerge,
    StoreError,
    StoreUnavailable,
    scope_kind,
    state_of,
)

# Advisory locks (transaction-scoped). The single 64-bit key and the (class, id) pairs are
# separate key spaces in PostgreSQL, so they cannot collide with each other.
_SCHEMA_LOCK = 0x6770_6766_696C_7472  # "gpgfiltr": one host migrates at a time
_LOCK_CLASS = 0x6770_6766  # "gpgf"
_REGISTRY_LOCK = 1  # (class, 1): changes to keys, bindings and pending changes
_RATE_LOCK_CLASS = _LOCK_CLASS + 1  # (class + 1, hashtext(scope)): one rate count at a time

# Used unless the DSN says otherwise. A database that stops answering must turn into an error
# within seconds rather than hold a thread of the filter's lookup pool (which gives up waiting
# after keystore.lookup_timeout, but cannot free the thread). A frozen server still holds it:
# the kernel keeps acknowledging, so no TCP timeout fires and statement_timeout runs in the
# frozen server itself.
_CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "gpgfilter",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
    "options": "-c statement_timeout=10000",
}

_T = TypeVar("_T")
_Conn = psycopg.Connection[TupleRow]


class PostgresKeyStore:
    def __init__(self, dsn: str, *, create: bool = False) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's message may quote the string, password included.
            raise StoreError("keystore.dsn is not a valid PostgreSQL connection string") from None
        self.where = _describe(params)
        self._pruned: dict[str, int] = {}  # scope kind -> when its old events were last pruned
        for name, value in _CONNECT_DEFAULTS.items():
            params.setdefault(name, value)
        self._conninfo = make_conninfo("", **params)
        self._lock = threading.Lock()
        self._conn: _Conn | None = None
        with self._lock:
            try:
                self._connect(create=create)
            except psycopg.Error as error:
                kind = _error_kind(error)
                raise kind(f"cannot open key store {self.where}: {_message(error)}") from None

    # -- connection handling -------------------------------------------------------------
    def _connect(self, *, create: bool) -> _Conn:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            _migrate(conn, create=create, where=self.where)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _connection(self) -> _Conn:
        if self._conn is None or self._conn.closed:
            return self._connect(create=False)
        return self._conn

    def _drop_if_broken(self) -> bool:
        """Forget a connection that can no longer be used; True when there was one."""
        conn = self._conn
        if conn is not None and (conn.broken or conn.closed):
            conn.close()
            self._conn = None
            return True
        return False

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _read(self, what: str, sql: LiteralString, params: Sequence[Any]) -> list[TupleRow]:
        with self._lock:
            retry = True
            while True:
                reused = self._conn is not None
                try:
                    return self._connection().execute(sql, params).fetchall()
                except psycopg.Error as error:
                    if self._drop_if_broken() and reused and retry:
                        retry = False
                        continue
                    kind = _error_kind(error)
                    raise kind(f"key store {what} failed: {_message(error)}") from None

    def _transaction(self, work: Callable[[_Conn], _T]) -> _T:
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    return work(conn)
            except psycopg.Error as error:
                self._drop_if_broken()
                raise StoreError(f"key store update failed: {_message(error)}") from None

    # -- queries -------------------------------------------------------------------------
    def keys_for(self, address: str) -> AddressKeys:
        rows = self._read(
            "lookup",
            ADDRESS_KEYS_QUERY
            + ' WHERE b.address = %s ORDER BY b.created, k.fingerprint COLLATE "C"',
            (address,),
        )
        return rows_to_address_keys(rows)

    def change_token(self) -> str:
        rows = self._read("lookup", "SELECT token FROM key_changes", ())
        return str(rows[0][0])

    def set_header_protection(self, address: str, mode: HeaderProtection | None) -> None:
        def work(conn: _Conn) -> None:
            conn.execute(
                "INSERT INTO address_settings (address, header_protection) VALUES (%s, %s)"
                " ON CONFLICT (address) DO UPDATE"
                " SET header_protection = excluded.header_protection",
                (address, mode),
            )

        self._transaction(work)

    def key(self, fingerprint: str) -> StoredKey | None:
        rows = self._read(
            "lookup",
            "SELECT " + KEY_COLUMNS + " FROM keys WHERE fingerprint = %s",  # noqa: S608
            (fingerprint.upper(),),
        )
        return row_to_key(rows[0]) if rows else None

    def bindings(self) -> list[Binding]:
        rows = self._read(
            "listing",
            "SELECT b.address, b.created, k.fingerprint, k.key_data, k.expires,"
            " k.encryption_keys, k.user_ids, k.revoked FROM bindings b"
            " JOIN keys k USING (fingerprint)"
            ' ORDER BY b.address COLLATE "C", k.fingerprint COLLATE "C"',
            (),
        )
        return [Binding(row[0], row_to_key(row[2:]), row[1]) for row in rows]

    def bind(
        self, address: str, key: StoredKey, *, replace: bool = True, expected: str | None = None
    ) -> None:
        now = int(time.time())

        def work(conn: _Conn) -> None:
            _lock_registry(conn)  # every host's change waits: the checks hold until the commit
            _check_bind(conn, key.fingerprint, expected)
            conn.execute(
                "INSERT INTO keys (fingerprint, key_data, expires, encryption_keys, user_ids,"
                " updated) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (fingerprint) DO UPDATE SET key_data = excluded.key_data,"
                " expires = excluded.expires, encryption_keys = excluded.encryption_keys,"
                " user_ids = excluded.user_ids, updated = excluded.updated",
                (*key_columns(key, Jsonb), now),
            )
            # A change landed: tokens issued against the former state are void.
            conn.execute("DELETE FROM pending WHERE address = %s", (address,))
            if replace:
                conn.execute(
                    "DELETE FROM bindings WHERE address = %s AND fingerprint <> %s",
                    (address, key.fingerprint),
                )
            conn.execute(
                "INSERT INTO bindings (address, fingerprint, created) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (address, key.fingerprint, now),
            )
            _delete_unbound(conn)

        self._transaction(work)

    def was_revoked(self, fingerprint: str) -> bool:
        return bool(
            self._read(
                "lookup",
                "SELECT 1 FROM revoked WHERE fingerprint = %s",
                (fingerprint.upper(),),
            )
        )

    def revoke(self, fingerprint: str) -> int:
        def work(conn: _Conn) -> int:
            _lock_registry(conn)
            conn.execute(
                "INSERT INTO revoked (fingerprint, at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (fingerprint, int(time.time())),
            )
            conn.execute(
                "UPDATE keys SET revoked = true, updated = %s WHERE fingerprint = %s",
                (int(time.time()), fingerprint),
            )
            conn.execute(
                "DELETE FROM pending WHERE address IN"
                " (SELECT address FROM bindings WHERE fingerprint = %s)",
                (fingerprint,),
            )
            row = conn.execute(
                "SELECT count(*) FROM bindings WHERE fingerprint = %s", (fingerprint,)
            ).fetchone()
            return int(row[0]) if row else 0

        return self._transaction(work)

    def remove(self, address_or_fingerprint: str) -> int:
        def work(conn: _Conn) -> int:
            _lock_registry(conn)
            for statement in (
                "DELETE FROM pending WHERE address IN (SELECT address FROM bindings"
                " WHERE address = %s OR fingerprint = %s)",
                "DELETE FROM address_settings WHERE address IN (SELECT address FROM bindings"
                " WHERE address = %s OR fingerprint = %s)",
            ):
                conn.execute(
                    statement, (address_or_fingerprint.lower(), address_or_fingerprint.upper())
                )
            cursor = conn.execute(
                "DELETE FROM bindings WHERE address = %s OR fingerprint = %s",
                (address_or_fingerprint.lower(), address_or_fingerprint.upper()),
            )
            removed = cursor.rowcount
            _delete_unbound(conn)
            return removed

        return self._transaction(work)

    # -- registration ----------------------------------------------------------------------
    def add_pending(self, pending: PendingChange) -> None:
        def work(conn: _Conn) -> None:
            _lock_registry(conn)
            conn.execute(
                "DELETE FROM pending WHERE address = %s AND fingerprint = %s",
                (pending.address, pending.key.fingerprint),
            )
            conn.execute(
                "INSERT INTO pending (token_hash, address, fingerprint, key_data, expires_key,"
                " encryption_keys, user_ids, created, expires, origin, header_protection,"
                " encrypt_existing) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    pending.token_hash,
                    pending.address,
                    *key_columns(pending.key, Jsonb),
                    pending.created,
                    pending.expires,
                    pending.origin,
                    pending.header_protection,
                    pending.encrypt_existing,
                ),
            )

        self._transaction(work)

    def take_pending(self, token_hash: str, now: int) -> PendingChange | None:
        # One statement: of two hosts taking the same token at once, exactly one gets the row.
        def work(conn: _Conn) -> TupleRow | None:
            return conn.execute(
                "DELETE FROM pending WHERE token_hash = %s RETURNING " + PENDING_COLUMNS,  # noqa: S608
                (token_hash,),
            ).fetchone()

        row = self._transaction(work)
        if row is None:
            return None
        pending = row_to_pending(row)
        return pending if pending.expires > now else None

    def pending_for(self, address: str, now: int) -> list[PendingChange]:
        rows = self._read(
            "lookup",
            "SELECT " + PENDING_COLUMNS + " FROM pending"  # noqa: S608
            " WHERE address = %s AND expires > %s ORDER BY created, token_hash",
            (address, now),
        )
        return [row_to_pending(row) for row in rows]

    def purge_pending(self, now: int) -> int:
        def work(conn: _Conn) -> int:
            return conn.execute("DELETE FROM pending WHERE expires <= %s", (now,)).rowcount

        return self._transaction(work)

    def record_audit(self, entry: AuditEntry) -> None:
        def work(conn: _Conn) -> None:
            conn.execute(
                "INSERT INTO audit (at, address, action, fingerprint, actor)"
                " VALUES (%s, %s, %s, %s, %s)",
                (entry.at, entry.address, entry.action, entry.fingerprint, entry.actor),
            )

        self._transaction(work)

    def audit_log(self, address: str | None = None, limit: int = 100) -> list[AuditEntry]:
        columns = "SELECT at, address, action, fingerprint, actor FROM audit"
        order = " ORDER BY at DESC, id DESC LIMIT %s"
        if address is None:
            rows = self._read("lookup", columns + order, (limit,))
        else:
            rows = self._read("lookup", columns + " WHERE address = %s" + order, (address, limit))
        return [AuditEntry(*row) for row in rows]

    def hit(self, scope: str, now: int, window: int, limit: int) -> int:
        kind, end = scope_kind(scope)
        prune = now - self._pruned.get(kind, 0) >= PRUNE_EVERY

        # Serialised per scope, so two hosts counting at once both see each other's event.
        def work(conn: _Conn) -> int:
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_RATE_LOCK_CLASS, scope)
            )
            conn.execute("DELETE FROM events WHERE scope = %s AND at <= %s", (scope, now - window))
            if prune:
                conn.execute(
                    "DELETE FROM events WHERE scope >= %s AND scope < %s AND at <= %s",
                    (kind, end, now - window),
                )
            row = conn.execute("SELECT count(*) FROM events WHERE scope = %s", (scope,)).fetchone()
            count = int(row[0]) if row else 0
            if count < limit:
                conn.execute("INSERT INTO events (scope, at) VALUES (%s, %s)", (scope, now))
            return count + 1

        counted = self._transaction(work)
        if prune:
            self._pruned[kind] = now
        return counted

    def mark_notice(self, fingerprint: str, kind: str) -> bool:
        def work(conn: _Conn) -> int:
            return conn.execute(
                "INSERT INTO notices (fingerprint, kind, sent) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (fingerprint, kind, int(time.time())),
            ).rowcount

        return self._transaction(work) == 1


def _migrate(conn: _Conn, *, create: bool, where: str) -> None:
    """Bring the schema up to date in one transaction, or refuse a store that is not ours,
    or newer than this program. Only ``create`` may start from an empty database."""
    with conn.transaction():
        # A long upgrade on another host is waited for, not mistaken for a dead database.
        conn.execute("SET LOCAL statement_timeout = '5min'")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        current = _schema_version(conn)
        if current is None:
            if not create:
                raise StoreError(f"{where} is not a gpgfilter key store (no schema version)")
            current = 0
        if current > SCHEMA_VERSION:
            raise newer_schema(where, current, SCHEMA_VERSION)
        if current == SCHEMA_VERSION:
            return
        for migration in MIGRATIONS[current:]:
            conn.execute(migration.postgresql)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )


def _schema_version(conn: _Conn) -> int | None:
    """The recorded schema version; None for a database without gpgfilter's tables."""
    row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def _lock_registry(conn: _Conn) -> None:
    """Serialise changes to keys, bindings and pending changes across hosts: with two hosts
    replacing an address's key at once, one must see the other's binding to drop it."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _REGISTRY_LOCK))


def _check_bind(conn: _Conn, fingerprint: str, expected: str | None) -> None:
    """Refuse a key ever revoked, and a merge made against a copy that has changed since."""
    if conn.execute("SELECT 1 FROM revoked WHERE fingerprint = %s", (fingerprint,)).fetchone():
        raise KeyWasRevoked(fingerprint)
    if expected is None:
        return
    row = conn.execute(
        "SELECT key_data FROM keys WHERE fingerprint = %s", (fingerprint,)
    ).fetchone()
    if state_of(None if row is None else bytes(row[0])) != expected:
        raise StaleMerge(f"the stored copy of {fingerprint} changed during the update")


def _delete_unbound(conn: _Conn) -> None:
    conn.execute(
        "DELETE FROM keys k WHERE NOT EXISTS"
        " (SELECT 1 FROM bindings b WHERE b.fingerprint = k.fingerprint)"
    )


def _describe(params: dict[str, Any]) -> str:
    """Name the database for messages: never the password, whatever the DSN holds."""
    dbname = params.get("dbname") or params.get("user") or "(default database)"
    host = params.get("host") or params.get("hostaddr") or "(default host)"
    port = params.get("port")
    return f"postgresql {dbname} on {host}" + (f":{port}" if port else "")


def _error_kind(error: psycopg.Error) -> type[StoreError]:
    """Connection failures and timeouts mean the database did not answer; anything else
    (a missing table, a refused statement) means it answered and something is wrong."""
    return StoreUnavailable if isinstance(error, psycopg.OperationalError) else StoreError


def _message(error: psycopg.Error) -> str:
    """The first line of a database error (libpq adds hints and context on further lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
