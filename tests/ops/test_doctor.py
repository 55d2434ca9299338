"""``gpgfilter doctor`` against a real running stack, with each fault injected in turn."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e_stack import Stack
from tests.support.mailstack import require_mail_stack
from tests.support.openpgp_tools import KeyFactory, TestKey

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
    )
    statuses = {}
    for line in done.stdout.splitlines():
        if not line.startswith(" "):
            status, _, rest = line.partition(" ")
            statuses[rest.strip().split(":")[0]] = status
    assert "Traceback" not in done.stderr
    return done.returncode, statuses


def test_a_healthy_stack_is_all_ok(stack: Stack) -> None:
    code, statuses = doctor(stack)
    assert code == 0, statuses
    assert set(statuses.values()) == {"ok"}
    assert {"config", "postfix", "filter listener", "dovecot lmtp", "gpg", "key store"} <= set(
        statuses
    )


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
        assert stack.filter.command("keys", "remove", soon.fingerprint).returncode == 0


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
