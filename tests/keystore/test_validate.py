"""Key validation and the registry (each backend): only usable public v4 keys, minimal, bound
right."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpgfilter.process.cli import main
from gpgfilter.process.config import load
from keystore.storage.open import open_store
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.store import KeyStore, KeyWasRevoked, StoreError
from keystore.validate import KeyRejected, validate_key
from tests.support.openpgp_tools import KeyFactory, TestKey, list_packets


def test_valid_key_is_minimised_and_bound_to_its_address(alice: TestKey) -> None:
    validated = validate_key(alice.public)
    assert validated.addresses == ("alice@example.test",)
    assert validated.key.fingerprint == alice.fingerprint
    assert set(validated.key.usable_encryption_keys()) == set(alice.encryption_subkeys)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("make_expired", "expired"),
        ("make_revoked", "revoked"),
        ("make_sign_only", "no valid encryption"),
        ("make_with_expired_encryption_subkey", "no valid encryption"),
    ],
)
def test_unusable_keys_are_refused(key_factory: KeyFactory, variant: str, message: str) -> None:
    key = getattr(key_factory, variant)(f"{variant}@example.test")
    with pytest.raises(KeyRejected, match=message):
        validate_key(key.public)


def test_secret_key_is_refused_without_echoing_it(alice: TestKey) -> None:
    with pytest.raises(KeyRejected, match="secret key") as caught:
        validate_key(alice.secret)
    assert alice.secret.decode()[40:80] not in str(caught.value)


def test_two_keys_and_garbage_are_refused(alice: TestKey, bob: TestKey) -> None:
    with pytest.raises(KeyRejected, match="exactly one"):
        validate_key(alice.public + bob.public)
    with pytest.raises(KeyRejected, match="not an OpenPGP public key"):
        validate_key(b"hello world")
    with pytest.raises(KeyRejected, match="larger than"):
        validate_key(b"x" * (9 * 1024 * 1024))


def test_flooded_key_is_stripped(key_factory: KeyFactory, alice: TestKey) -> None:
    """Every third-party certification is gone from what is stored; the self-signatures stay.
    (How fast: bench/flooded_key.py.)"""
    flooded = key_factory.flooded(alice, count=1500)
    validated = validate_key(flooded)
    assert len(validated.key.key_data) < 2048 < len(flooded)
    own = alice.fingerprint[-16:]
    signatures = [p for p in list_packets(validated.key.key_data) if p.tag == 2]
    assert signatures and all(p.issuer == own for p in signatures)
    assert {p.sigclass for p in signatures} == {0x13, 0x18}  # user ID and subkey binding


def test_explicit_binding_and_uid_selection(key_factory: KeyFactory) -> None:
    multi = key_factory.make_multi_uid(["one@example.test", "two@other.test"])
    assert set(validate_key(multi.public).addresses) == {"one@example.test", "two@other.test"}
    only = validate_key(multi.public, address="Two@Other.test")
    assert only.addresses == ("two@other.test",)
    assert [u for u in only.key.user_ids if "one@" in u] == []
    forced = validate_key(multi.public, address="alias@example.test")
    assert forced.addresses == ("alias@example.test",)


def test_store_binds_replaces_and_removes(store: KeyStore, alice: TestKey, bob: TestKey) -> None:
    a = validate_key(alice.public).key
    b = validate_key(bob.public, address="alice@example.test").key
    store.bind("alice@example.test", a)
    assert [k.fingerprint for k in store.keys_for("alice@example.test")] == [a.fingerprint]
    store.bind("alice@example.test", b, replace=False)
    assert len(store.keys_for("alice@example.test")) == 2
    store.bind("alice@example.test", b)
    assert [k.fingerprint for k in store.keys_for("alice@example.test")] == [b.fingerprint]
    assert store.remove(b.fingerprint) == 1
    assert store.keys_for("alice@example.test") == []
    assert store.bindings() == []


def test_revoked_key_stays_bound_and_remove_by_address(store: KeyStore, alice: TestKey) -> None:
    a = validate_key(alice.public).key
    store.bind("alice@example.test", a)
    store.bind("alias@example.test", a)
    assert store.revoke(a.fingerprint) == 2
    (stored,) = store.keys_for("alice@example.test")
    assert stored.revoked and stored.key_data == a.key_data
    with pytest.raises(KeyWasRevoked):  # nor is a stale copy bound again
        store.bind("alice@example.test", a)
    assert store.keys_for("alice@example.test")[0].revoked
    assert [b.address for b in store.bindings()] == ["alias@example.test", "alice@example.test"]
    assert store.remove("ALICE@example.test") == 1
    assert store.remove("nobody@example.test") == 0
    assert store.revoke("0" * 40) == 0
    assert [b.address for b in store.bindings()] == ["alias@example.test"]


def test_store_never_recreates_a_vanished_file(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    store = SQLiteKeyStore(path, create=True)
    path.unlink()
    with pytest.raises(StoreError):
        store.keys_for("a@example.test")
    assert not path.exists()
    with pytest.raises(StoreError):
        SQLiteKeyStore(tmp_path / "absent.sqlite")


def test_admin_commands(tmp_path: Path, alice: TestKey, keystore_yaml: str) -> None:
    runner = CliRunner()
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n{keystore_yaml}")
    key_file = tmp_path / "alice.asc"
    key_file.write_bytes(alice.public)
    secret_file = tmp_path / "secret.asc"
    secret_file.write_bytes(alice.secret)
    result = runner.invoke(main, ["-c", str(config), "keys", "import", str(key_file)])
    assert result.exit_code == 0, result.output
    assert f"{alice.fingerprint} registered for alice@example.test" in result.output
    result = runner.invoke(main, ["-c", str(config), "keys", "import", str(secret_file)])
    assert result.exit_code == 1 and "secret key" in result.output
    assert "PRIVATE KEY" not in result.output
    result = runner.invoke(main, ["-c", str(config), "keys", "list"])
    assert result.output.startswith(f"alice@example.test\t{alice.fingerprint}")
    result = runner.invoke(main, ["-c", str(config), "keys", "remove", "alice@example.test"])
    assert result.exit_code == 0 and "removed 1" in result.output
    result = runner.invoke(main, ["-c", str(config), "keys", "remove", "alice@example.test"])
    assert result.exit_code != 0
    # Both changes went through the registration rules, audited as the command line's.
    store = open_store(load(config).keystore, tmp_path / "data" / "keys.sqlite", create=False)
    try:
        audit = store.audit_log("alice@example.test")
    finally:
        store.close()
    assert [(e.action, e.actor) for e in audit] == [("withdrawn", "cli"), ("registered", "cli")]


def test_importing_a_revocation_holds_mail_instead_of_refusing(
    tmp_path: Path, key_factory: KeyFactory, keystore_yaml: str
) -> None:
    """A registered key that its owner revoked must stop being used at once — and a stale
    copy without the revocation must not bring it back."""
    key = key_factory.make("rita@example.test")
    runner = CliRunner()
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n{keystore_yaml}")
    original = tmp_path / "key.asc"
    original.write_bytes(key.public)
    assert runner.invoke(main, ["-c", str(config), "keys", "import", str(original)]).exit_code == 0
    cert = (key.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_bytes()
    subprocess.run(
        ["gpg", "--homedir", str(key.home), "--batch", "--import"],
        input=cert.replace(b"\n:-----BEGIN", b"\n-----BEGIN"),
        capture_output=True,
        check=True,
    )
    revoked = tmp_path / "revoked.asc"
    revoked.write_bytes(
        subprocess.run(
            ["gpg", "--homedir", str(key.home), "--armor", "--export", key.fingerprint],
            capture_output=True,
            check=True,
        ).stdout
    )
    result = runner.invoke(main, ["-c", str(config), "keys", "import", str(revoked)])
    assert result.exit_code == 0 and "is revoked" in result.output, result.output
    loaded = load(config)
    store = open_store(loaded.keystore, loaded.keystore_path, create=False)
    (stored,) = store.keys_for("rita@example.test")
    assert stored.revoked and stored.usable_encryption_keys() == ()
    # Re-importing the old, unrevoked copy refreshes the key but does not un-revoke it.
    assert runner.invoke(main, ["-c", str(config), "keys", "import", str(original)]).exit_code == 0
    (stored,) = store.keys_for("rita@example.test")
    assert stored.revoked
    store.close()
    # A revoked key nobody registered is simply refused.
    other = key_factory.make_revoked("nobody@example.test")
    fresh = tmp_path / "other.asc"
    fresh.write_bytes(other.public)
    result = runner.invoke(main, ["-c", str(config), "keys", "import", str(fresh)])
    assert result.exit_code == 1 and "revoked" in result.output
