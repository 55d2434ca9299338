"""Updates of a registered key are merged, never swapped in, on both store backends; and any
change for an address voids the tokens issued for it before.

The registry runs over the ``store`` fixture (SQLite and a real PostgreSQL) with a mailer that
only records; the keys are real, made by gpg (tests.support.openpgp_tools).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpgfilter.process.cli import main
from gpgfilter.process.config import load
from keystore.model import PendingChange, StoredKey
from keystore.registration import Notice, Policy, Purpose, Refused, Registry
from keystore.storage.open import open_store
from keystore.store import KeyStore
from keystore.validate import KeyRejected, merge_key, validate_key
from tests.support.openpgp_tools import KeyFactory, TestKey


@dataclass
class RecordingMailer:
    challenges: list[tuple[str, str, str]] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)

    async def send_challenge(
        self, address: str, key: StoredKey, *, purpose: Purpose, token: str, expires: int
    ) -> None:
        self.challenges.append((address, purpose, token))

    async def send_notice(self, notice: Notice) -> None:
        self.notices.append(notice)


def registry(store: KeyStore) -> Registry:
    return Registry(store, RecordingMailer(), Policy(), domains=["example.test"])


async def test_a_revoked_subkey_stays_revoked(store: KeyStore, key_factory: KeyFactory) -> None:
    key = key_factory.make("mia@example.test")
    (first,) = key.encryption_subkeys
    reg = registry(store)
    assert (await reg.admin_bind(key.address, key.public)).action == "registered"
    rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(key), first)
    assert (await reg.upload(key.address, rotated.public)).action == "renewed"
    assert (await reg.upload(key.address, key.public)).action == "unchanged"
    assert (await reg.admin_bind(key.address, key.public)).action == "unchanged"
    (stored,) = store.keys_for(key.address)
    assert stored.usable_encryption_keys() == rotated.encryption_subkeys
    assert first not in stored.usable_encryption_keys()


async def test_an_older_expiry_is_refused(store: KeyStore, key_factory: KeyFactory) -> None:
    key = key_factory.make("max@example.test", expires="1y")
    reg = registry(store)
    await reg.admin_bind(key.address, key.public)
    extended = key_factory.set_expiry(key, "2y")
    renewed = await reg.upload(key.address, extended.public)
    assert renewed.action == "renewed"
    again = await reg.upload(key.address, key.public)
    assert (again.action, again.expires) == ("unchanged", renewed.expires)
    (stored,) = store.keys_for(key.address)
    assert stored.expires == renewed.expires


async def test_a_new_subkey_is_a_renewal_and_the_same_copy_is_unchanged(
    store: KeyStore, key_factory: KeyFactory
) -> None:
    key = key_factory.make("ned@example.test")
    reg = registry(store)
    await reg.admin_bind(key.address, key.public)
    assert (await reg.upload(key.address, key.public)).action == "unchanged"
    grown = key_factory.add_encryption_subkey(key)
    assert (await reg.upload(key.address, grown.public)).action == "renewed"
    (stored,) = store.keys_for(key.address)
    assert set(stored.usable_encryption_keys()) == set(grown.encryption_subkeys)
    assert len(grown.encryption_subkeys) == 2


def test_merge_refuses_another_key(key_factory: KeyFactory, alice: TestKey, bob: TestKey) -> None:
    stored = validate_key(alice.public).key
    with pytest.raises(KeyRejected, match="another key"):
        merge_key(stored, bob.public)


def test_merge_keeps_a_revoked_subkey_out_of_a_copy_stored_without_it(
    key_factory: KeyFactory,
) -> None:
    """Copies stored before revoked subkeys were kept lack the revocation: an old subkey the
    stored copy does not know is still not brought back."""
    key = key_factory.make("old@example.test")
    (first,) = key.encryption_subkeys
    time.sleep(1.1)  # key creation times have a resolution of a second
    rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(key), first)
    current = validate_key(rotated.public).key
    # As the former minimisation stored it: the revoked subkey dropped altogether.
    legacy = _drop_subkey(rotated, first)
    merged = merge_key(StoredKey(**{**_fields(current), "key_data": legacy}), key.public)
    assert not merged.changed


async def test_every_change_voids_the_other_tokens(
    store: KeyStore, key_factory: KeyFactory
) -> None:
    one = key_factory.make("pam@example.test")
    two = key_factory.make("pam@example.test")
    reg = registry(store)
    mailer = reg.mailer
    assert isinstance(mailer, RecordingMailer)
    await reg.upload(one.address, one.public)
    await reg.upload(two.address, two.public)
    stale, fresh = (token for _, _, token in mailer.challenges)
    assert (await reg.confirm(fresh)).action == "registered"
    with pytest.raises(Refused) as caught:
        await reg.confirm(stale)
    assert caught.value.code == "token-invalid"
    assert store.pending_for(one.address, 0) == []


def test_the_store_drops_pending_changes_with_every_change(
    store: KeyStore, alice: TestKey, bob: TestKey
) -> None:
    a = validate_key(alice.public).key
    b = validate_key(bob.public).key

    def pend(token: str, key: StoredKey) -> None:
        store.add_pending(PendingChange(token, alice.address, key, 1, 2**40, "web"))

    pend("t1", b)
    store.bind(alice.address, a)
    assert store.pending_for(alice.address, 0) == []
    pend("t2", b)
    store.revoke(a.fingerprint)
    assert store.pending_for(alice.address, 0) == []
    pend("t3", b)
    store.remove(a.fingerprint)
    assert store.pending_for(alice.address, 0) == []
    assert store.key(a.fingerprint) is None


async def test_a_revoked_key_is_not_withdrawn(store: KeyStore, key_factory: KeyFactory) -> None:
    key = key_factory.make("rex@example.test")
    reg = registry(store)
    await reg.admin_bind(key.address, key.public)
    assert (
        await reg.upload(key.address, key_factory.revocation_certificate(key))
    ).action == "revoked"
    for attempt in (reg.request_withdrawal, reg.admin_withdraw):
        with pytest.raises(Refused) as caught:
            await attempt(key.address)
        assert caught.value.code == "revoked-key-stays"
    with pytest.raises(Refused) as refused:
        await reg.admin_bind(key.address, key.public)
    assert refused.value.code == "key-revoked"
    (stored,) = store.keys_for(key.address)
    assert stored.revoked


def test_keys_import_merges_and_keys_remove_keeps_a_revocation(
    tmp_path: Path, keystore_yaml: str, key_factory: KeyFactory
) -> None:
    key = key_factory.make("cli@example.test")
    (first,) = key.encryption_subkeys
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n{keystore_yaml}")
    old = tmp_path / "old.asc"
    old.write_bytes(key.public)
    rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(key), first)
    new = tmp_path / "new.asc"
    new.write_bytes(rotated.public)
    revocation = tmp_path / "revocation.asc"
    revocation.write_bytes(key_factory.revocation_certificate(key))
    runner = CliRunner()
    for path in (old, new, old):
        result = runner.invoke(main, ["-c", str(config), "keys", "import", str(path)])
        assert result.exit_code == 0, result.output
    loaded = load(config)
    store = open_store(loaded.keystore, loaded.keystore_path, create=False)
    try:
        (stored,) = store.keys_for(key.address)
        assert stored.usable_encryption_keys() == rotated.encryption_subkeys
        store.revoke(key.fingerprint)
        result = runner.invoke(main, ["-c", str(config), "keys", "remove", key.address])
        assert result.exit_code == 1 and "--revoked-too" in result.output
        assert store.keys_for(key.address)[0].revoked
        result = runner.invoke(
            main, ["-c", str(config), "keys", "remove", "--revoked-too", key.address]
        )
        assert result.exit_code == 0 and store.keys_for(key.address) == []
    finally:
        store.close()


def _fields(key: StoredKey) -> dict[str, object]:
    return {name: getattr(key, name) for name in StoredKey.__slots__}


def _drop_subkey(key: TestKey, subkey: str) -> bytes:
    home = key.home
    done = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--export-options",
            "export-minimal",
            "--export-filter",
            "drop-subkey=fpr = " + subkey,
            "--export",
            key.fingerprint,
        ],
        capture_output=True,
        check=True,
    )
    return done.stdout
