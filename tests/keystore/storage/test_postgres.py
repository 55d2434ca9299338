"""What only a shared PostgreSQL store has to get right: several hosts on one database, schema
migrations under concurrency, and a database that goes away and comes back."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from keystore.model import PendingChange
from keystore.storage.migrations import MIGRATIONS, SCHEMA_VERSION
from keystore.storage.postgres import PostgresKeyStore
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.store import StoreError
from keystore.validate import validate_key
from tests.support.openpgp_tools import TestKey
from tests.support.postgres_server import PostgresServer, require_postgres, running_postgres


@pytest.fixture
def hosts(postgres_dsn: str) -> Iterator[tuple[PostgresKeyStore, PostgresKeyStore]]:
    """Two store objects on one database, as the filters of two hosts would have."""
    one = PostgresKeyStore(postgres_dsn, create=True)
    two = PostgresKeyStore(postgres_dsn)
    yield one, two
    one.close()
    two.close()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, which it may stop without disturbing the others."""
    require_postgres()
    with running_postgres() as server:
        yield server


def _sql(dsn: str, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def test_a_change_on_one_host_is_seen_on_the_other_at_once(
    hosts: tuple[PostgresKeyStore, PostgresKeyStore], alice: TestKey, bob: TestKey
) -> None:
    one, two = hosts
    a = validate_key(alice.public).key
    b = validate_key(bob.public, address="alice@example.test").key
    assert two.keys_for("alice@example.test") == []
    one.bind("alice@example.test", a)
    assert [k.fingerprint for k in two.keys_for("alice@example.test")] == [a.fingerprint]
    two.bind("alice@example.test", b)
    assert [k.fingerprint for k in one.keys_for("alice@example.test")] == [b.fingerprint]
    one.revoke(b.fingerprint)
    assert two.keys_for("alice@example.test")[0].revoked
    assert two.remove("alice@example.test") == 1
    assert one.keys_for("alice@example.test") == []
    assert [one.hit("client:1", 100, 60, 10), two.hit("client:1", 101, 60, 10)] == [1, 2]
    assert one.mark_notice("F1", "expiring") and not two.mark_notice("F1", "expiring")


def test_a_token_is_taken_by_one_host_only(
    hosts: tuple[PostgresKeyStore, PostgresKeyStore], alice: TestKey
) -> None:
    one, two = hosts
    key = validate_key(alice.public).key
    tokens = [f"{n:064x}" for n in range(20)]
    for n, token in enumerate(tokens):
        one.add_pending(PendingChange(token, f"u{n}@example.test", key, 1000, 2000, "web"))
    taken: list[list[str]] = [[], []]

    def take_all(store: PostgresKeyStore, into: list[str]) -> None:
        for token in tokens:
            if store.take_pending(token, 1500) is not None:
                into.append(token)

    threads = [
        threading.Thread(target=take_all, args=(store, into))
        for store, into in zip(hosts, taken, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken[0] + taken[1]) == tokens  # each exactly once
    assert two.take_pending(tokens[0], 1500) is None


def test_hosts_starting_together_create_the_schema_once(postgres_dsn: str) -> None:
    errors: list[BaseException] = []
    stores: list[PostgresKeyStore] = []

    def start() -> None:
        try:
            stores.append(PostgresKeyStore(postgres_dsn, create=True))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _sql(postgres_dsn, "SELECT value FROM meta") == [(str(SCHEMA_VERSION),)]
    for store in stores:
        assert store.keys_for("a@example.test") == []
        store.close()


def test_an_empty_database_is_given_a_schema_only_when_asked(postgres_dsn: str) -> None:
    with pytest.raises(StoreError, match="not a gpgfilter key store"):
        PostgresKeyStore(postgres_dsn)
    assert _sql(postgres_dsn, "SELECT to_regclass('meta')") == [(None,)]
    PostgresKeyStore(postgres_dsn, create=True).close()
    assert _sql(postgres_dsn, "SELECT value FROM meta") == [(str(SCHEMA_VERSION),)]


def test_a_version_1_store_is_upgraded_and_keeps_its_keys(
    postgres_dsn: str, alice: TestKey
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(MIGRATIONS[0].postgresql)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO keys VALUES ('F1', '\\x00', NULL, '[]', '[\"a <a@x.test>\"]', false, 1)"
        )
        conn.execute("INSERT INTO bindings VALUES ('a@x.test', 'F1', 1)")
    store = PostgresKeyStore(postgres_dsn)  # upgrading is not creating: allowed for readers
    assert [k.fingerprint for k in store.keys_for("a@x.test")] == ["F1"]
    key = validate_key(alice.public).key
    store.add_pending(PendingChange("a" * 64, "alice@example.test", key, 1000, 2000, "web"))
    assert store.take_pending("a" * 64, 1500) is not None
    store.close()
    assert _sql(postgres_dsn, "SELECT value FROM meta") == [(str(SCHEMA_VERSION),)]


def test_a_version_2_store_keeps_its_revocations_forever(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(MIGRATIONS[0].postgresql)
        conn.execute(MIGRATIONS[1].postgresql)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        conn.execute("INSERT INTO keys VALUES ('F1', '\\x00', NULL, '[]', '[]', true, 1)")
        conn.execute("INSERT INTO keys VALUES ('F2', '\\x00', NULL, '[]', '[]', false, 1)")
        conn.execute("INSERT INTO bindings VALUES ('a@x.test', 'F1', 1), ('b@x.test', 'F2', 1)")
    store = PostgresKeyStore(postgres_dsn)
    try:
        assert store.remove("a@x.test") == 1 and store.key("F1") is None
        assert store.was_revoked("F1") and not store.was_revoked("F2")
    finally:
        store.close()


def test_a_newer_schema_is_refused(postgres_dsn: str) -> None:
    PostgresKeyStore(postgres_dsn, create=True).close()
    _sql(postgres_dsn, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match=r"newer than this gpgfilter.*upgrade gpgfilter"):
        PostgresKeyStore(postgres_dsn, create=True)


def test_a_stopped_database_is_an_error_until_it_is_back(
    own_server: PostgresServer, alice: TestKey
) -> None:
    dsn = own_server.create_database()
    with_password = dsn.replace("postgres@", "postgres:s3cret-pw@")
    store = PostgresKeyStore(with_password, create=True)
    key = validate_key(alice.public).key
    store.bind("alice@example.test", key)
    own_server.stop()
    for attempt in (
        lambda: store.keys_for("alice@example.test"),
        store.bindings,
        lambda: store.bind("alice@example.test", key),
        lambda: store.take_pending("a" * 64, 0),
        lambda: store.hit("client:1", 0, 60, 10),
    ):
        with pytest.raises(StoreError) as caught:
            attempt()
        assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(StoreError) as caught:
        PostgresKeyStore(with_password)
    assert "s3cret-pw" not in str(caught.value)
    own_server.start()
    assert [k.fingerprint for k in store.keys_for("alice@example.test")] == [key.fingerprint]
    store.close()


def test_a_dropped_connection_does_not_defer_the_next_lookup(
    postgres_dsn: str, alice: TestKey
) -> None:
    """A database restart or failover closes idle connections; the next lookup reconnects."""
    store = PostgresKeyStore(postgres_dsn, create=True)
    store.bind("alice@example.test", validate_key(alice.public).key)
    _sql(
        postgres_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'gpgfilter' AND pid <> pg_backend_pid()",
    )
    assert len(store.keys_for("alice@example.test")) == 1
    store.close()


def test_a_database_that_lost_its_tables_is_not_recreated(postgres_dsn: str) -> None:
    store = PostgresKeyStore(postgres_dsn, create=True)
    _sql(postgres_dsn, "DROP TABLE meta, keys, bindings, pending, audit, events, notices")
    with pytest.raises(StoreError):
        store.keys_for("a@example.test")
    _sql(
        postgres_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'gpgfilter' AND pid <> pg_backend_pid()",
    )
    with pytest.raises(StoreError, match="not a gpgfilter key store"):
        store.keys_for("a@example.test")
    assert _sql(postgres_dsn, "SELECT to_regclass('keys')") == [(None,)]
    store.close()


def test_an_invalid_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(StoreError, match="not a valid PostgreSQL") as caught:
        PostgresKeyStore("postgresql://u:s3cret-pw@host:notaport/db?bogus")
    assert "s3cret-pw" not in str(caught.value)


def test_both_backends_build_the_same_tables(postgres_dsn: str, tmp_path: Path) -> None:
    """Each schema step gives SQLite and PostgreSQL the same tables and columns, so a store can
    move between them and a new step cannot be written for one backend only."""
    SQLiteKeyStore(tmp_path / "k.sqlite", create=True).close()
    PostgresKeyStore(postgres_dsn, create=True).close()
    with closing(sqlite3.connect(tmp_path / "k.sqlite")) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type='table'")]
        in_sqlite = {
            (table, column[1])
            for table in tables
            if table != "sqlite_sequence"
            for column in db.execute(f"PRAGMA table_info({table})")
        }
    in_postgres = set(
        _sql(
            postgres_dsn,
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema()",
        )
    )
    assert in_sqlite == in_postgres
    assert len(in_sqlite) > 30 and all(m.why for m in MIGRATIONS)
