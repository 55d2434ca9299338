"""The schema's history, one entry per version, for both backends side by side.

A store is brought up to date when opened, in one transaction: every step from the version it
records to ``SCHEMA_VERSION``. Keeping both dialects of a step in one entry keeps the two
backends at the same version by construction; a new step is one more entry at the end.

A store written by a newer gpgfilter is refused rather than used: an older filter could
misread it, and misreading a key store may store mail in clear.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import LiteralString

from keystore.store import StoreError


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: why it exists, and its statements in each backend's dialect (same
    tables and columns; SQLite's script is run statement by statement)."""

    why: str
    sqlite: str
    postgresql: LiteralString

    def sqlite_statements(self) -> list[str]:
        """The SQLite script, one complete statement each (a trigger's body has ``;`` of
        its own, so splitting at every ``;`` would cut it)."""
        statements: list[str] = []
        current = ""
        for piece in self.sqlite.split(";"):
            current += piece + ";"
            if sqlite3.complete_statement(current):
                if current.strip(" \n;"):
                    statements.append(current.strip())
                current = ""
        if current.strip(" \n;"):
            statements.append(current.strip())
        return statements


# Version 6 in SQLite, which has no statement-level triggers: one per table and kind of write.
_SQLITE_KEY_CHANGES = """
    CREATE TABLE key_changes (id INTEGER PRIMARY KEY CHECK (id = 1), token TEXT NOT NULL);
    INSERT INTO key_changes (id, token) VALUES (1, lower(hex(randomblob(16))));
    CREATE TRIGGER keys_insert_changes AFTER INSERT ON keys
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER keys_update_changes AFTER UPDATE ON keys
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER keys_delete_changes AFTER DELETE ON keys
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER bindings_insert_changes AFTER INSERT ON bindings
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER bindings_update_changes AFTER UPDATE ON bindings
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER bindings_delete_changes AFTER DELETE ON bindings
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER address_settings_insert_changes AFTER INSERT ON address_settings
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER address_settings_update_changes AFTER UPDATE ON address_settings
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
    CREATE TRIGGER address_settings_delete_changes AFTER DELETE ON address_settings
        BEGIN UPDATE key_changes SET token = lower(hex(randomblob(16))); END;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        why="keys and the addresses bound to them",
        sqlite="""
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
        postgresql="""
        CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE keys (
            fingerprint text PRIMARY KEY,
            key_data bytea NOT NULL,
            expires bigint,
            encryption_keys jsonb NOT NULL,
            user_ids jsonb NOT NULL,
            revoked boolean NOT NULL DEFAULT false,
            updated bigint NOT NULL
        );
        CREATE TABLE bindings (
            address text NOT NULL,
            fingerprint text NOT NULL REFERENCES keys (fingerprint),
            created bigint NOT NULL,
            PRIMARY KEY (address, fingerprint)
        );
        CREATE INDEX bindings_by_fingerprint ON bindings (fingerprint);
        """,
    ),
    Migration(
        why="registration: pending changes, audit log, rate-limit events, notices sent",
        sqlite="""
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
        postgresql="""
        CREATE TABLE pending (
            token_hash text PRIMARY KEY,
            address text NOT NULL,
            fingerprint text NOT NULL,
            key_data bytea NOT NULL,
            expires_key bigint,
            encryption_keys jsonb NOT NULL,
            user_ids jsonb NOT NULL,
            created bigint NOT NULL,
            expires bigint NOT NULL,
            origin text NOT NULL
        );
        CREATE INDEX pending_by_address ON pending (address);
        CREATE TABLE audit (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at bigint NOT NULL,
            address text NOT NULL,
            action text NOT NULL,
            fingerprint text NOT NULL,
            actor text NOT NULL
        );
        CREATE INDEX audit_by_address ON audit (address);
        CREATE TABLE events (scope text NOT NULL, at bigint NOT NULL);
        CREATE INDEX events_by_scope ON events (scope, at);
        CREATE TABLE notices (
            fingerprint text NOT NULL,
            kind text NOT NULL,
            sent bigint NOT NULL,
            PRIMARY KEY (fingerprint, kind)
        );
        """,
    ),
    Migration(
        why="revoked keys are remembered after their stored copy is gone",
        sqlite="""
        CREATE TABLE revoked (fingerprint TEXT PRIMARY KEY, at INTEGER NOT NULL);
        INSERT INTO revoked (fingerprint, at) SELECT fingerprint, updated FROM keys WHERE revoked;
        """,
        postgresql="""
        CREATE TABLE revoked (fingerprint text PRIMARY KEY, at bigint NOT NULL);
        INSERT INTO revoked (fingerprint, at) SELECT fingerprint, updated FROM keys WHERE revoked;
        """,
    ),
    Migration(
        why="per-address settings (header protection), and the choice a pending change carries",
        sqlite="""
        CREATE TABLE address_settings (address TEXT PRIMARY KEY, header_protection TEXT);
        ALTER TABLE pending ADD COLUMN header_protection TEXT;
        """,
        postgresql="""
        CREATE TABLE address_settings (address text PRIMARY KEY, header_protection text);
        ALTER TABLE pending ADD COLUMN header_protection text;
        """,
    ),
    Migration(
        why="the owner's request, carried by a pending change, to encrypt the mail already stored",
        sqlite="ALTER TABLE pending ADD COLUMN encrypt_existing INTEGER NOT NULL DEFAULT 0;",
        postgresql=(
            "ALTER TABLE pending ADD COLUMN encrypt_existing boolean NOT NULL DEFAULT false;"
        ),
    ),
    Migration(
        why="a token that changes with every write to what a lookup reads, so the filter can"
        " keep what it looked up for as long as nothing changed (see store.KeyStore.change_token)",
        sqlite=_SQLITE_KEY_CHANGES,
        postgresql="""
        CREATE TABLE key_changes (id integer PRIMARY KEY CHECK (id = 1), token text NOT NULL);
        INSERT INTO key_changes (id, token)
            VALUES (1, md5(random()::text || clock_timestamp()::text));
        CREATE FUNCTION gpgfilter_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE key_changes SET token = md5(random()::text || clock_timestamp()::text);
            RETURN NULL;
        END $$;
        CREATE TRIGGER keys_changes AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keys
            FOR EACH STATEMENT EXECUTE FUNCTION gpgfilter_key_changed();
        CREATE TRIGGER bindings_changes AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON bindings
            FOR EACH STATEMENT EXECUTE FUNCTION gpgfilter_key_changed();
        CREATE TRIGGER address_settings_changes
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON address_settings
            FOR EACH STATEMENT EXECUTE FUNCTION gpgfilter_key_changed();
        """,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def newer_schema(where: str, found: int, supported: int) -> StoreError:
    """The error for a store whose schema is newer than this program understands."""
    return StoreError(
        f"key store {where} has schema version {found}, newer than this"
        f" gpgfilter ({supported}): upgrade gpgfilter"
    )
