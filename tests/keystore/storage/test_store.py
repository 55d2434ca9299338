"""The registration side of the store (each backend): single-use tokens, audit trail, rate
counts, notices."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from gpgfilter.process.config import KeystoreConfig
from keystore.model import AddressSettings, AuditEntry, PendingChange
from keystore.storage.migrations import SCHEMA_VERSION
from keystore.storage.open import open_store
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.store import PRUNE_EVERY, KeyStore, KeyWasRevoked, StoreError
from keystore.validate import validate_key
from tests.support.openpgp_tools import TestKey


def _pending(alice: TestKey, token_hash: str, *, expires: int = 2000) -> PendingChange:
    key = validate_key(alice.public).key
    return PendingChange(token_hash, "alice@example.test", key, 1000, expires, "web")


def test_a_token_works_once_and_not_after_it_expired(store: KeyStore, alice: TestKey) -> None:
    store.add_pending(_pending(alice, "a" * 64))
    assert [p.token_hash for p in store.pending_for("alice@example.test", 1500)] == ["a" * 64]
    taken = store.take_pending("a" * 64, 1500)
    assert taken is not None and taken.key.fingerprint == alice.fingerprint
    assert taken.key.key_data == validate_key(alice.public).key.key_data
    assert store.take_pending("a" * 64, 1500) is None  # single use

    store.add_pending(_pending(alice, "b" * 64))
    assert store.pending_for("alice@example.test", 2500) == []
    assert store.take_pending("b" * 64, 2500) is None  # expired, and now gone
    assert store.take_pending("b" * 64, 1500) is None


def test_a_new_upload_of_the_same_key_replaces_the_pending_one(
    store: KeyStore, alice: TestKey
) -> None:
    store.add_pending(_pending(alice, "a" * 64))
    store.add_pending(_pending(alice, "b" * 64))
    assert store.take_pending("a" * 64, 1500) is None
    assert store.take_pending("b" * 64, 1500) is not None
    store.add_pending(_pending(alice, "c" * 64, expires=1100))
    assert store.purge_pending(1200) == 1


def test_audit_rate_counts_and_notices(store: KeyStore) -> None:
    store.record_audit(AuditEntry(1, "a@x.test", "registered", "F1", "self-service"))
    store.record_audit(AuditEntry(2, "b@x.test", "registered", "F2", "admin-api"))
    store.record_audit(AuditEntry(3, "a@x.test", "withdrawn", "F1", "self-service"))
    assert [e.action for e in store.audit_log("a@x.test")] == ["withdrawn", "registered"]
    assert [e.at for e in store.audit_log()] == [3, 2, 1]

    assert [store.hit("client:1", t, 60, 10) for t in (100, 110, 120)] == [1, 2, 3]
    assert store.hit("client:1", 175, 60, 10) == 2  # 100 and 110 fell out of the window
    assert store.hit("client:2", 175, 60, 10) == 1

    assert store.mark_notice("F1", "expiring")
    assert not store.mark_notice("F1", "expiring")
    assert store.mark_notice("F1", "expired")


def test_a_version_2_sqlite_store_keeps_its_revocations_forever(
    tmp_path: Path, alice: TestKey
) -> None:
    path = tmp_path / "k.sqlite"
    store = SQLiteKeyStore(path, create=True)
    key = validate_key(alice.public).key
    store.bind(alice.address, key)
    store.close()
    with sqlite3.connect(path) as conn:  # a revocation as version 2 stored it
        conn.execute("DROP TABLE revoked")
        conn.execute("DROP TABLE address_settings")  # and what later versions added
        conn.execute("ALTER TABLE pending DROP COLUMN header_protection")
        conn.execute("ALTER TABLE pending DROP COLUMN encrypt_existing")
        _drop_change_token(conn)
        conn.execute("UPDATE keys SET revoked = 1")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store = SQLiteKeyStore(path)
    assert store.remove(alice.address) == 1  # the stored copy is gone ...
    assert store.key(key.fingerprint) is None
    assert store.was_revoked(key.fingerprint)  # ... the revocation is not
    with pytest.raises(KeyWasRevoked):
        store.bind(alice.address, key)
    store.close()


def _drop_change_token(conn: sqlite3.Connection) -> None:
    """Undo version 6: the change token and the triggers that keep it."""
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    assert ("keys_insert_changes",) in triggers
    for (name,) in triggers:
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE key_changes")


def test_an_older_sqlite_store_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    SQLiteKeyStore(path, create=True).close()
    with sqlite3.connect(path) as conn:
        for table in ("pending", "audit", "events", "notices", "revoked", "address_settings"):
            conn.execute(f"DROP TABLE {table}")
        _drop_change_token(conn)
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = SQLiteKeyStore(path)
    assert store.pending_for("a@x.test", 0) == []
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer than this"):
        SQLiteKeyStore(path)


def _event_rows(store: KeyStore, config: KeystoreConfig) -> int:
    if isinstance(store, SQLiteKeyStore):
        with closing(sqlite3.connect(store.path)) as db:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    with psycopg.connect(config.dsn) as db:
        row = db.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0]) if row else 0


def test_a_flood_writes_at_most_the_limit_and_old_rows_are_pruned(
    store: KeyStore, keystore_config: KeystoreConfig
) -> None:
    answers = [store.hit("client:flood", 1000 + i // 100, 3600, 20) for i in range(2000)]
    assert answers[:20] == list(range(1, 21)) and set(answers[20:]) == {21}
    assert _event_rows(store, keystore_config) == 20
    # One-off clients each leave a row while the window lasts, then nothing.
    for n in range(100):
        assert store.hit(f"client:{n}", 2000, 3600, 20) == 1
    store.hit("wks-request:a@example.test", 2000, 7200, 3)  # another kind, another window
    assert _event_rows(store, keystore_config) == 20 + 100 + 1
    assert store.hit("client:late", 2000 + 3600 + PRUNE_EVERY, 3600, 20) == 1
    assert _event_rows(store, keystore_config) == 1 + 1


def test_header_protection_is_per_address_survives_a_new_key_and_goes_with_the_address(
    store: KeyStore, alice: TestKey, bob: TestKey
) -> None:
    alice_key = validate_key(alice.public).key
    store.bind("alice@example.test", alice_key)
    assert store.keys_for("alice@example.test").settings == AddressSettings(None)
    store.set_header_protection("alice@example.test", "hide-subject")
    found = store.keys_for("alice@example.test")
    assert [k.fingerprint for k in found] == [alice.fingerprint]
    assert found.settings.header_protection == "hide-subject"
    assert store.keys_for("bob@example.test").settings == AddressSettings(None)
    store.bind("alice@example.test", validate_key(bob.public).key)  # a replacement key
    assert store.keys_for("alice@example.test").settings.header_protection == "hide-subject"
    store.set_header_protection("alice@example.test", "copy")
    assert store.keys_for("alice@example.test").settings.header_protection == "copy"
    store.set_header_protection("alice@example.test", None)
    assert store.keys_for("alice@example.test").settings.header_protection is None
    store.set_header_protection("alice@example.test", "off")
    assert store.remove("alice@example.test") == 1
    store.bind("alice@example.test", alice_key)
    assert store.keys_for("alice@example.test").settings.header_protection is None


def test_a_pending_change_carries_the_owners_choice(store: KeyStore, alice: TestKey) -> None:
    pending = replace(_pending(alice, "a" * 64), header_protection="hide-subject")
    store.add_pending(pending)
    assert store.pending_for("alice@example.test", 1500)[0].header_protection == "hide-subject"
    taken = store.take_pending("a" * 64, 1500)
    assert taken is not None and taken.header_protection == "hide-subject"


def test_every_write_a_lookup_can_see_changes_the_token_and_nothing_else_does(
    store: KeyStore, keystore_config: KeystoreConfig, tmp_path: Path, alice: TestKey, bob: TestKey
) -> None:
    """The filter keeps lookups while the token stands still: a write that changes what
    ``keys_for`` returns and leaves the token alone would keep mail going to an old key."""
    alice_key = validate_key(alice.public).key
    # Another process writing (the key service): the token is the database's, not a count
    # of this object's own writes.
    writer = open_store(keystore_config, tmp_path / "k.sqlite", create=False)
    seen = [store.change_token()]

    def changed() -> bool:
        token = store.change_token()
        fresh = token not in seen
        seen.append(token)
        return fresh

    assert store.change_token() == seen[0], "reading changes nothing"
    writer.bind("alice@example.test", alice_key)
    assert changed()
    writer.bind("bob@example.test", validate_key(bob.public).key, replace=False)
    assert changed()
    writer.set_header_protection("alice@example.test", "copy")
    assert changed()
    writer.revoke(alice.fingerprint)
    assert changed()
    assert writer.remove("bob@example.test") == 1
    assert changed()
    # What the filter never reads leaves the token alone.
    writer.add_pending(_pending(alice, "b" * 64))
    writer.record_audit(
        AuditEntry(
            at=1000,
            address="alice@example.test",
            action="registered",
            fingerprint=alice.fingerprint,
            actor="cli",
        )
    )
    writer.hit("address:alice@example.test", 1000, 3600, 10)
    assert not changed()
    writer.close()
