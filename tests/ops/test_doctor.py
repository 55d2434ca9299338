"""``gpgfilter doctor`` against a real running stack, with each fault injected in turn."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpgfilter.ops.doctor import STORE_TIMEOUT, Check, check_keystore
from gpgfilter.process.config import load
from keystore.storage.config import KeystoreConfig
from keystore.storage.open import open_store
from tests.support.e2e_stack import Stack
from tests.support.mailstack import free_port, require_mail_stack
from tests.support.openpgp_tools import KeyFactory, TestKey
from tests.support.postgres_server import PostgresServer

pytestmark = pytest.mark.e2e

USERS = ["alice@example.test", "bob@example.test"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, alice: TestKey) -> Iterator[Stack]:
    require_mail_stack()
    with Stack(tmp_path_factory.mktemp("doctor"), mode="lmtp", users=USERS) as running:
        assert running.filter is not None
        running.filter.import_key(alice.public)
        yield running


def doctor(stack: Stack, *extra: str, config: Path | None = None) -> tuple[int, dict[str, str]]:
    """Exit status and {check: status} of a doctor run."""
    code, statuses, _ = doctor_output(stack, *extra, config=config)
    return code, statuses


def doctor_output(
    stack: Stack, *extra: str, config: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """Exit status, {check: status} and the report of a doctor run."""
    assert stack.filter is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpgfilter",
            "doctor",
            "--config",
            str(config or stack.filter.config_path),
            "--postfix-dir",
            str(stack.postfix.config_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    statuses = {}
    for line in done.stdout.splitlines():
        if not line.startswith(" "):
            status, _, rest = line.partition(" ")
            statuses[rest.strip().split(":")[0]] = status
    assert "Traceback" not in done.stderr
    return done.returncode, statuses, done.stdout


def test_a_healthy_stack_is_all_ok(stack: Stack) -> None:
    code, statuses = doctor(stack)
    assert code == 0, statuses
    assert set(statuses.values()) == {"ok"}
    assert {"config", "postfix", "filter listener", "dovecot lmtp", "gpg", "key store"} <= set(
        statuses
    )


def test_engine_and_what_serves_which_key(
    stack: Stack, seipdv2_key: TestKey, tmp_path: Path
) -> None:
    assert stack.filter is not None
    stack.filter.import_key(seipdv2_key.public)
    try:
        _engine_checks(stack, tmp_path)
    finally:
        assert stack.filter.command("keys", "remove", "new@example.test").returncode == 0


def _engine_checks(stack: Stack, tmp_path: Path) -> None:
    assert stack.filter is not None
    code, statuses, report = doctor_output(stack)
    assert code == 0 and statuses["engine"] == statuses["engine per key"] == "ok", report
    assert "auto: Sequoia for keys" in report and "(pysequoia 0.1.35; gpg as above)" in report
    assert "1 key(s) by Sequoia, 1 by gpg (new@example.test:" in report
    # The configured engine needs pysequoia: one that does not import is a failure.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pysequoia.py").write_text("raise ImportError('simulated broken install')\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow}:{Path.cwd()}"}
    code, statuses, report = doctor_output(stack, env=env)
    assert (code, statuses["engine"]) == (1, "fail"), report
    assert "needs pysequoia" in report and "gpg.engine: gnupg" in report
    gnupg = tmp_path / "gnupg.yaml"
    gnupg.write_text(
        stack.filter.config_path.read_text().replace("gpg:\n", "gpg:\n  engine: gnupg\n")
    )
    code, statuses, report = doctor_output(stack, config=gnupg, env=env)
    assert statuses["engine"] == "ok" and "gnupg: gpg for every recipient" in report, report


def test_bad_config_and_missing_gpg_fail(stack: Stack, tmp_path: Path) -> None:
    assert stack.filter is not None
    broken = tmp_path / "broken.yaml"
    broken.write_text("mode: carrier-pigeon\n")
    assert doctor(stack, config=broken) == (1, {"config": "fail"})
    no_gpg = tmp_path / "no-gpg.yaml"
    no_gpg.write_text(
        stack.filter.config_path.read_text().replace(
            f"binary: {stack.filter.gpg_wrapper}", "binary: /nonexistent/gpg"
        )
    )
    code, statuses = doctor(stack, config=no_gpg)
    assert (code, statuses["gpg"]) == (1, "fail")


def test_gpg_home_open_to_others_fails(stack: Stack, alice: TestKey) -> None:
    assert stack.filter is not None
    stack.postfix.send("bob@example.test", ["alice@example.test"], b"Subject: x\r\n\r\nx\r\n")
    stack.dovecot.wait_for("alice@example.test", 1)  # the gpg home now exists
    home = stack.filter.data_dir / "gnupg"
    home.chmod(0o755)
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["gpg home"]) == (1, "fail")
    finally:
        home.chmod(0o700)
    (home / "gpg.conf").write_text("auto-key-retrieve\n")
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["gpg options"]) == (0, "warn")
    finally:
        (home / "gpg.conf").unlink()


def test_key_store_missing_or_inconsistent_fails(stack: Stack) -> None:
    assert stack.filter is not None
    path = stack.filter.data_dir / "keys.sqlite"
    path.rename(path.with_suffix(".moved"))
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["key store"]) == (1, "fail")
        assert statuses["metrics and health"] == "fail"  # the filter itself sees it
    finally:
        path.with_suffix(".moved").rename(path)
    with sqlite3.connect(path) as conn:
        (saved,) = conn.execute("SELECT encryption_keys FROM keys").fetchone()
        conn.execute("UPDATE keys SET encryption_keys = ?", ('[["' + "AB" * 20 + '", null]]',))
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["store and gpg agree"]) == (1, "fail")
    finally:
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE keys SET encryption_keys = ?", (saved,))


def test_expiring_and_unusable_keys_warn(stack: Stack, key_factory: KeyFactory) -> None:
    assert stack.filter is not None
    soon = key_factory.make("bob@example.test", expires="5d")
    stack.filter.import_key(soon.public)
    code, statuses = doctor(stack)
    assert (code, statuses["expiring keys"], statuses["unusable keys"]) == (0, "warn", "ok")
    assert doctor(stack, "--days", "3")[1]["expiring keys"] == "ok"
    store = stack.filter.data_dir / "keys.sqlite"
    with sqlite3.connect(store) as conn:  # as `keys import` of its revocation would
        conn.execute("UPDATE keys SET revoked = 1 WHERE fingerprint = ?", (soon.fingerprint,))
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["unusable keys"], statuses["expiring keys"]) == (0, "warn", "ok")
    finally:
        assert (
            stack.filter.command("keys", "remove", "--revoked-too", soon.fingerprint).returncode
            == 0
        )


def test_postfix_not_routing_to_the_filter_fails(stack: Stack) -> None:
    postconf = ["postconf", "-c", str(stack.postfix.config_dir)]
    before = subprocess.run(
        [*postconf, "-h", "virtual_transport"], capture_output=True, text=True, check=True
    )
    subprocess.run([*postconf, "-e", "virtual_transport=lmtp:inet:127.0.0.1:24"], check=True)
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["postfix"]) == (1, "fail")
        assert doctor(stack, "--no-postfix")[0] == 0
    finally:
        subprocess.run([*postconf, "-e", f"virtual_transport={before.stdout.strip()}"], check=True)


def test_stopped_dovecot_and_filter_fail(stack: Stack) -> None:
    assert stack.filter is not None
    stack.dovecot.stop()
    try:
        code, statuses = doctor(stack)
        assert (code, statuses["dovecot lmtp"]) == (1, "fail")
    finally:
        stack.dovecot.start()
    stack.filter.stop()
    try:
        code, statuses = doctor(stack)
        assert code == 1
        assert statuses["filter listener"] == statuses["metrics and health"] == "fail"
    finally:
        stack.filter.start()
    assert doctor(stack)[0] == 0


# -- a database that is down is not a store that is lost ------------------------------------


def _keystore_check(config_text: str, tmp_path: Path) -> tuple[Check, float]:
    """doctor's key store line for a configuration, and how long it took."""
    config_file = tmp_path / "gpgfilter.yaml"
    config_file.write_text(f"data_dir: {tmp_path / 'data'}\n{config_text}")
    started = time.monotonic()
    first = next(check_keystore(load(config_file), 14))
    return first, time.monotonic() - started


def test_a_missing_sqlite_store_is_restored_from_backup(tmp_path: Path) -> None:
    check, _ = _keystore_check("", tmp_path)
    assert (check.status, check.what) == ("fail", "key store")
    assert check.detail == f"{tmp_path / 'data' / 'keys.sqlite'} is missing"
    assert "restore the store from backup" in check.fix


def test_a_refused_database_connection_means_check_postgresql(tmp_path: Path) -> None:
    dsn = f"postgresql://gpgfilter@127.0.0.1:{free_port()}/gpgfilter"
    config_text = f"keystore:\n  backend: postgresql\n  dsn: {dsn}\n"
    check, _ = _keystore_check(config_text, tmp_path)
    assert check.status == "fail"
    assert check.detail.startswith("the key store's database does not answer (")
    assert "refused" in check.detail
    assert check.fix.startswith("check PostgreSQL") and "backup" not in check.fix
    # The same through the command an admin runs.
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(config_text)
    done = subprocess.run(
        [sys.executable, "-m", "gpgfilter", "doctor", "--no-postfix", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "fail key store: the key store's database does not answer" in done.stdout
    assert "fix: check PostgreSQL" in done.stdout


def test_a_frozen_database_means_check_postgresql(
    tmp_path: Path, postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    config_text = f"keystore:\n  backend: postgresql\n  dsn: {postgres_dsn}\n"
    config = KeystoreConfig(backend="postgresql", dsn=postgres_dsn)
    open_store(config, tmp_path / "unused", create=True).close()  # a store, and then:
    with postgres_server.frozen():  # continued when the block ends, however it ends
        check, took = _keystore_check(config_text, tmp_path)
    assert check.status == "fail"
    assert check.detail.startswith("the key store's database does not answer (")
    assert check.fix.startswith("check PostgreSQL") and "backup" not in check.fix
    assert took < STORE_TIMEOUT + 5  # doctor finishes its report
    assert _keystore_check(config_text, tmp_path)[0].status == "ok"  # and once it runs again


def test_a_database_without_the_store_is_restored_from_backup(
    tmp_path: Path, postgres_dsn: str
) -> None:
    check, _ = _keystore_check(
        f"keystore:\n  backend: postgresql\n  dsn: {postgres_dsn}\n", tmp_path
    )
    assert check.status == "fail" and "not a gpgfilter key store" in check.detail
    assert "restore the store from backup" in check.fix
