"""``gpgfilter setup --route enrolled`` against a real Postfix and Dovecot: Postfix asks the key
store itself which recipients go through the filter, so unenrolled mail flows while the filter
is down, enrolled mail waits for it, and a key bound later routes the next message."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpgfilter.ops.postfix import ROUTE_MAP
from tests.support.e2e_stack import FilterProcess, Stack
from tests.support.mailstack import free_port, require_mail_stack
from tests.support.openpgp_tools import TestKey, decrypt_gpg
from tests.support.pgpmime_check import armored_part

ALICE = "alice@example.test"
BOB = "bob@example.test"


def _message(to: str, n: int) -> bytes:
    return (
        f"From: sender@example.test\r\nTo: {to}\r\nSubject: route {n}\r\n"
        f"Message-ID: <route-{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def _setup(stack: Stack, gpgfilter: FilterProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gpgfilter", "setup", "--config", str(gpgfilter.config_path)]
    command += ["--postfix-dir", str(stack.postfix.config_dir)]
    command += ["--dovecot-config", str(stack.dovecot.config_path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _readable_by_postfix(path: Path) -> None:
    """The store as an administrator shares it with Postfix's user (docs/install.md)."""
    for part in [path, *path.parents]:
        if part == Path("/"):
            break
        part.chmod(part.stat().st_mode | 0o005)
    for file in path.glob("keys.sqlite*"):
        file.chmod(0o644)


@pytest.fixture
def routed(tmp_path: Path, alice: TestKey) -> Iterator[tuple[Stack, FilterProcess]]:
    """Postfix → Dovecot directly, a running filter with alice enrolled, wired by route."""
    require_mail_stack()
    with Stack(tmp_path / "stack", mode="direct", users=[ALICE, BOB]) as stack:
        gpgfilter = FilterProcess(
            tmp_path / "filter",
            mode="lmtp",
            port=free_port(),
            deliver_port=stack.dovecot.lmtp_port,
            extra_yaml="route: enrolled\ndomains: [example.test]\n",
        )
        gpgfilter.import_key(alice.public)
        gpgfilter.start()
        try:
            yield stack, gpgfilter
        finally:
            gpgfilter.stop()


@pytest.mark.e2e
def test_only_enrolled_mail_waits_for_the_filter_and_a_new_key_routes_the_next_message(
    routed: tuple[Stack, FilterProcess], alice: TestKey, bob: TestKey
) -> None:
    stack, gpgfilter = routed
    gpgfilter.data_dir.chmod(0o700)  # as the filter's installation leaves it
    refused = _setup(stack, gpgfilter)
    assert refused.returncode != 0
    assert "cannot query" in refused.stderr  # the store is private to the filter's user yet
    assert not (stack.postfix.config_dir / ROUTE_MAP).exists()

    _readable_by_postfix(gpgfilter.data_dir)
    dry = _setup(stack, gpgfilter, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "transport_maps: (not set) -> proxy:sqlite:" in dry.stdout
    assert not (stack.postfix.config_dir / ROUTE_MAP).exists()
    done = _setup(stack, gpgfilter)
    assert done.returncode == 0, done.stderr
    assert "nothing to change" in _setup(stack, gpgfilter).stdout
    doctor = gpgfilter.command("doctor", "--postfix-dir", str(stack.postfix.config_dir))
    assert "ok   postfix route: enrolled recipients via proxy:sqlite:" in doctor.stdout

    # Sub-address and case find the owner's binding, as the filter's own lookup does.
    for n, to in enumerate(["alice+tag@example.test", "ALICE@Example.TEST"], start=1):
        stack.postfix.send("sender@example.test", [to], _message(to, n))
        stored = stack.dovecot.wait_for(ALICE, n)[-1]
        assert b"multipart/encrypted" in stored
        assert f"body {n}".encode() in decrypt_gpg(alice, armored_part(stored))

    gpgfilter.stop()
    stack.postfix.send("sender@example.test", [BOB], _message(BOB, 3))
    assert b"body 3" in stack.dovecot.wait_for(BOB, 1)[0]  # not enrolled: straight to Dovecot
    stack.postfix.send("sender@example.test", [ALICE], _message(ALICE, 4))
    stack.postfix.wait_log(r"status=deferred")
    assert stack.postfix.queue_ids()  # enrolled: waits in the queue for the filter
    assert stack.dovecot.count(ALICE) == 2

    gpgfilter.start()
    stack.postfix.flush()
    stored = stack.dovecot.wait_for(ALICE, 3)[-1]
    assert b"body 4" in decrypt_gpg(alice, armored_part(stored))

    # bob's key bound now routes his next message through the filter, without a reload.
    done_import = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpgfilter",
            "-c",
            str(gpgfilter.config_path),
            "keys",
            "import",
            "-",
        ],
        input=bob.public.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done_import.returncode == 0, done_import.stderr
    stack.postfix.send("sender@example.test", [BOB], _message(BOB, 5))
    stored = stack.dovecot.wait_for(BOB, 2)[-1]
    assert b"multipart/encrypted" in stored
    assert b"body 5" in decrypt_gpg(bob, armored_part(stored))

    undone = _setup(stack, gpgfilter, "--undo")
    assert undone.returncode == 0, undone.stderr
    assert not (stack.postfix.config_dir / ROUTE_MAP).exists()


@pytest.mark.e2e
def test_a_store_postfix_cannot_read_never_lets_mail_past_the_filter(
    routed: tuple[Stack, FilterProcess],
) -> None:
    """A failing lookup is never read as "no key": Postfix does not accept the recipient (its
    table client retries, the sender gets a 4xx or no answer) and delivers nothing; once the
    store is back the same message goes through."""
    stack, gpgfilter = routed
    _readable_by_postfix(gpgfilter.data_dir)
    assert _setup(stack, gpgfilter).returncode == 0
    store = gpgfilter.data_dir / "keys.sqlite"
    moved = store.with_name("elsewhere.sqlite")
    gpgfilter.stop()
    store.rename(moved)
    try:
        with pytest.raises((smtplib.SMTPException, OSError)):
            stack.postfix.send("sender@example.test", [ALICE], _message(ALICE, 6))
        assert stack.dovecot.count(ALICE) == 0
    finally:
        moved.rename(store)
    gpgfilter.start()
    stack.postfix.send("sender@example.test", [ALICE], _message(ALICE, 6))
    assert b"multipart/encrypted" in stack.dovecot.wait_for(ALICE, 1, timeout=60)[0]


def test_route_and_no_key_defer_exclude_each_other(tmp_path: Path) -> None:
    config = tmp_path / "gpgfilter.yaml"
    config.write_text("route: enrolled\npolicy:\n  no_key: defer\n")
    done = subprocess.run(
        [sys.executable, "-m", "gpgfilter", "-c", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "policy.no_key: defer" in done.stderr
    config.write_text("mode: smtp\nroute: enrolled\n")
    done = subprocess.run(
        [sys.executable, "-m", "gpgfilter", "-c", str(config), "setup", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "route: enrolled needs mode: lmtp" in done.stderr


def test_the_route_query_finds_bindings_by_lower_case_and_nothing_else(tmp_path: Path) -> None:
    """The query as Postfix runs it, against the store's own schema (SQLite)."""
    from gpgfilter.ops.postfix import route_query
    from gpgfilter.process.config import load
    from keystore.storage.open import open_store

    config = load(None, {"data_dir": str(tmp_path), "route": "enrolled"})
    open_store(config.keystore, config.keystore_path, create=True).close()
    with sqlite3.connect(config.keystore_path) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("INSERT INTO bindings VALUES ('alice@example.test', 'F', 0)")
        conn.execute("INSERT INTO bindings VALUES ('alice@example.test', 'G', 0)")
    query = route_query(config)
    with sqlite3.connect(config.keystore_path) as conn:

        def ask(key: str) -> list[tuple[str]]:
            return conn.execute(query.replace("%s", key.replace("'", "''"))).fetchall()

        assert ask("ALICE@example.TEST") == [("lmtp:inet:127.0.0.1:10025",)]
        assert ask("alice+tag@example.test") == []  # Postfix asks again without +tag
        assert ask("bob@example.test") == []
        assert ask("x' OR '1'='1") == []
    assert os.path.exists(config.keystore_path)


def test_the_pgsql_route_table_answers_through_postfix(tmp_path: Path, postgres_dsn: str) -> None:
    """The map file setup writes for a PostgreSQL store, asked by Postfix's own pgsql client
    (postmap) against a real server: a bound address in any case gets the filter's
    transport, others nothing, and a quote in the address stays data."""
    from gpgfilter.ops.postfix import route_map_text
    from gpgfilter.process.config import load
    from keystore.storage.open import open_store
    from tests.support.debian import require_program

    postmap = require_program("postmap", "postfix")
    config = load(
        None,
        {
            "data_dir": str(tmp_path),
            "route": "enrolled",
            "keystore.backend": "postgresql",
            "keystore.dsn": postgres_dsn,
        },
    )
    store = open_store(config.keystore, config.keystore_path, create=True)
    store.close()
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no key row needed
        conn.execute("INSERT INTO bindings VALUES ('alice@example.test', 'F', 0)")
    text, _mode = route_map_text(config, "example.test")
    postfix_dir = tmp_path / "postfix"
    postfix_dir.mkdir()
    (postfix_dir / "main.cf").write_text("compatibility_level = 3.6\n")
    table = tmp_path / "route.cf"
    table.write_text(text)

    def ask(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [postmap, "-c", str(postfix_dir), "-q", address, f"pgsql:{table}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    found = ask("ALICE@Example.test")
    assert (found.returncode, found.stdout.strip()) == (0, "lmtp:inet:127.0.0.1:10025"), found
    for other in ("bob@example.test", "x' OR '1'='1@example.test", "alice@elsewhere.test"):
        missing = ask(other)
        assert (missing.returncode, missing.stdout) == (1, ""), (other, missing)
        assert "warning" not in missing.stderr and "fatal" not in missing.stderr, missing.stderr
