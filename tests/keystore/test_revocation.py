"""A revocation is forever, and two hosts' updates of one key never overwrite each other.

On both store backends (the ``store`` fixture: SQLite and a real PostgreSQL), with real keys
made by gpg: a revoked key stays refused after another key replaced it and its stored copy was
deleted, on every path that binds a key; and a merge made against a stored copy that another
host changed meanwhile is refused by the store and merged again by the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from click.testing import CliRunner

from gpgfilter.process.cli import main
from gpgfilter.process.config import KeystoreConfig, load
from keystore.model import StoredKey
from keystore.registration import Refused
from keystore.storage.open import open_store
from keystore.store import (
    MERGE_ATTEMPTS,
    NOTHING_STORED,
    KeyStore,
    KeyWasRevoked,
    StaleMerge,
    stored_state,
)
from keystore.validate import merge_key, validate_key
from tests.keystore.test_merge import RecordingMailer, _drop_subkey, registry
from tests.support.openpgp_tools import KeyFactory


def second_host(config: KeystoreConfig, tmp_path: Path) -> KeyStore:
    """Another store object on the ``store`` fixture's database, as another host has."""
    return open_store(config, tmp_path / "k.sqlite", create=False)


def test_the_store_remembers_a_revocation_after_the_key_is_replaced(
    store: KeyStore, key_factory: KeyFactory
) -> None:
    old = validate_key(key_factory.make("rita@example.test").public).key
    new = validate_key(key_factory.make("rita@example.test").public).key
    store.bind("rita@example.test", old)
    assert not store.was_revoked(old.fingerprint)
    store.revoke(old.fingerprint)
    store.bind("rita@example.test", new)
    assert store.key(old.fingerprint) is None  # the copy is gone, the revocation is not
    assert store.was_revoked(old.fingerprint.lower())
    for address in ("rita@example.test", "other@example.test"):
        with pytest.raises(KeyWasRevoked):
            store.bind(address, old)
    assert [k.fingerprint for k in store.keys_for("rita@example.test")] == [new.fingerprint]
    # A revocation of a key never stored is remembered too (e.g. an uploaded revoked copy).
    assert store.revoke("0" * 40) == 0 and store.was_revoked("0" * 40)


async def test_no_path_binds_a_key_revoked_before_it_was_replaced(
    store: KeyStore, key_factory: KeyFactory
) -> None:
    kate = key_factory.make_multi_uid(["kate@example.test", "kb@example.test"])
    successor = key_factory.make("kate@example.test")
    reg = registry(store)
    mailer = reg.mailer
    assert isinstance(mailer, RecordingMailer)
    await reg.admin_bind(kate.address, kate.public)
    # A token for another address of the key, mailed before the revocation ...
    assert (await reg.upload("kb@example.test", kate.public)).action == "pending"
    early_token = mailer.challenges[-1][2]
    await reg.upload(kate.address, key_factory.revocation_certificate(kate))
    assert (await reg.admin_bind(kate.address, successor.public)).action == "replaced"
    assert store.key(kate.fingerprint) is None
    # ... is refused, as is every new attempt to bind the old copy.
    with pytest.raises(Refused) as refused:
        await reg.confirm(early_token)
    assert refused.value.code == "key-revoked"
    challenges = len(mailer.challenges)
    for attempt in (
        lambda: reg.upload(kate.address, kate.public),
        lambda: reg.upload("kb@example.test", kate.public),
        lambda: reg.admin_bind(kate.address, kate.public),
    ):
        with pytest.raises(Refused) as refused:
            await attempt()
        assert refused.value.code == "key-revoked"
        assert "revoked" in str(refused.value)
    assert len(mailer.challenges) == challenges  # no challenge for a revoked key
    assert [k.fingerprint for k in store.keys_for(kate.address)] == [successor.fingerprint]
    assert store.keys_for("kb@example.test") == []


async def test_an_uploaded_revoked_copy_is_remembered(
    store: KeyStore, key_factory: KeyFactory
) -> None:
    """The holder uploads the revoked key for an address it is not bound to: the revocation is
    proven by the key itself, so it is kept, and the key is never registered afterwards."""
    lost = key_factory.make_revoked("lost@example.test")
    reg = registry(store)
    with pytest.raises(Refused) as refused:
        await reg.upload(lost.address, lost.public)
    assert refused.value.code == "key-rejected"
    assert store.was_revoked(lost.fingerprint)


def test_keys_import_refuses_a_key_revoked_before_it_was_replaced(
    tmp_path: Path, keystore_yaml: str, key_factory: KeyFactory
) -> None:
    old = key_factory.make("ivan@example.test")
    new = key_factory.make("ivan@example.test")
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n{keystore_yaml}")
    files = {}
    for name, data in (
        ("old", old.public),
        ("new", new.public),
        ("revocation", key_factory.revocation_certificate(old)),
    ):
        files[name] = tmp_path / f"{name}.asc"
        files[name].write_bytes(data)
    runner = CliRunner()

    def run(name: str) -> tuple[int, str]:
        result = runner.invoke(main, ["-c", str(config), "keys", "import", str(files[name])])
        return result.exit_code, result.output

    assert run("old")[0] == 0
    loaded = load(config)
    store = open_store(loaded.keystore, loaded.keystore_path, create=False)
    try:
        store.revoke(old.fingerprint)
        assert run("new")[0] == 0
        assert store.key(old.fingerprint) is None
        code, output = run("old")
        assert code == 1 and "was revoked" in output, output
        assert [k.fingerprint for k in store.keys_for(old.address)] == [new.fingerprint]
    finally:
        store.close()


def test_the_store_refuses_a_merge_against_a_copy_changed_meanwhile(
    store: KeyStore, keystore_config: KeystoreConfig, tmp_path: Path, key_factory: KeyFactory
) -> None:
    key = key_factory.make("hugo@example.test")
    (first,) = key.encryption_subkeys
    base = validate_key(key.public).key
    with pytest.raises(StaleMerge):  # nothing stored, but a copy was claimed
        store.bind(key.address, base, expected=stored_state(base))
    store.bind(key.address, base, expected=NOTHING_STORED)
    other = second_host(keystore_config, tmp_path)
    try:
        # Both hosts read the same stored copy and merge their own update into it.
        seen_one, seen_two = store.key(key.fingerprint), other.key(key.fingerprint)
        assert seen_one is not None and seen_two is not None
        rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(key), first)
        key_factory.set_expiry(key, "5y")
        one = merge_key(seen_one, rotated.public).key
        two = merge_key(seen_two, _drop_subkey(key, first)).key
        other.bind(key.address, two, replace=False, expected=stored_state(seen_two))
        with pytest.raises(StaleMerge):
            store.bind(key.address, one, replace=False, expected=stored_state(seen_one))
        (kept,) = store.keys_for(key.address)
        assert kept.key_data == two.key_data  # the later write did not overwrite the earlier
        with pytest.raises(StaleMerge):  # a copy stored meanwhile, where none was
            store.bind("new@example.test", base, expected=NOTHING_STORED)
    finally:
        other.close()


async def test_the_registry_merges_again_when_another_host_stored_an_update(
    store: KeyStore, keystore_config: KeystoreConfig, tmp_path: Path, key_factory: KeyFactory
) -> None:
    """Host 2 stores a longer expiry right after host 1 read the stored copy to merge a subkey
    revocation into it; host 1's store refuses, and the merge done again keeps both."""
    key = key_factory.make("ines@example.test", expires="1y")
    (first,) = key.encryption_subkeys
    original = validate_key(key.public).key
    reg = registry(store)
    await reg.admin_bind(key.address, key.public)
    other = second_host(keystore_config, tmp_path)
    rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(key), first).public
    key_factory.set_expiry(key, "5y")
    extended = _drop_subkey(key, first)  # the new expiry, without the subkey's revocation
    later = merge_key(original, extended).key.expires
    assert later is not None and original.expires is not None and later > original.expires
    try:
        reg.store = cast(
            KeyStore,
            _Interleaved(store, lambda: _update(other, key.fingerprint, key.address, extended), 1),
        )
        outcome = await reg.upload(key.address, rotated)
        assert outcome.action == "renewed"
        (stored,) = store.keys_for(key.address)
        assert first not in stored.usable_encryption_keys()  # host 1's subkey revocation ...
        assert stored.expires == later  # ... and host 2's new expiry
    finally:
        other.close()


async def test_the_registry_gives_up_with_a_reason_when_updates_keep_colliding(
    store: KeyStore, keystore_config: KeystoreConfig, tmp_path: Path, key_factory: KeyFactory
) -> None:
    key = key_factory.make("jon@example.test", expires="1y")
    (first,) = key.encryption_subkeys
    reg = registry(store)
    await reg.admin_bind(key.address, key.public)
    other = second_host(keystore_config, tmp_path)
    updates = [key_factory.set_expiry(key, f"{years}y").public for years in (2, 3, 4)]
    last = validate_key(updates[-1]).key.expires
    rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(key), first).public
    try:
        reg.store = cast(
            KeyStore,
            _Interleaved(
                store,
                lambda: _update(other, key.fingerprint, key.address, updates.pop(0)),
                MERGE_ATTEMPTS,
            ),
        )
        with pytest.raises(Refused) as refused:
            await reg.upload(key.address, rotated)
        assert refused.value.code == "stale" and "try again" in str(refused.value)
        assert updates == []
        (stored,) = store.keys_for(key.address)
        assert stored.expires == last  # every write of the other host was kept
        assert stored.usable_encryption_keys() == (first,)  # this one's was not made
    finally:
        other.close()


def _update(store: KeyStore, fingerprint: str, address: str, data: bytes) -> None:
    """What another host's registry does for an update: merge with the stored copy, store."""
    stored = store.key(fingerprint)
    assert stored is not None
    merged = merge_key(stored, data).key
    store.bind(address, merged, replace=False, expected=stored_state(stored))


class _Interleaved:
    """The registry's store, with another host's write landing right after each of the first
    ``times`` reads of a stored copy: between the registry's read and its write."""

    def __init__(self, store: KeyStore, write: Callable[[], None], times: int) -> None:
        self._store = store
        self._write = write
        self._left = times

    def key(self, fingerprint: str) -> StoredKey | None:
        found = self._store.key(fingerprint)
        if self._left:
            self._left -= 1
            self._write()
        return found

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)
