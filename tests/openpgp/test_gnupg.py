"""The gpg engine with real gpg: interop output, every valid subkey, and no trust in exit codes."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.engine import EngineError, Recipient
from gpgfilter.openpgp.gnupg import GnuPGEngine
from keystore.validate import validate_key
from tests.support.openpgp_tools import (
    KeyFactory,
    TestKey,
    decrypt_all,
    decrypt_gpg,
    packet_recipients,
    packet_versions,
)


def encrypt(engine: GnuPGEngine, plaintext: bytes, recipient: Recipient) -> bytes:
    armored = asyncio.run(engine.encrypt(plaintext, recipient))
    check_ciphertext(armored, recipient)
    return armored


def recipient_of(key: TestKey) -> Recipient:
    stored = validate_key(key.public).key
    return Recipient(stored.key_data, stored.usable_encryption_keys())


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> GnuPGEngine:
    return GnuPGEngine(home=tmp_path_factory.mktemp("engine"))


@pytest.mark.parametrize("which", ["alice", "bob"], ids=["curve25519", "rsa"])
def test_every_implementation_decrypts_byte_for_byte(
    engine: GnuPGEngine, which: str, request: pytest.FixtureRequest
) -> None:
    key: TestKey = request.getfixturevalue(which)
    plaintext = b"Content-Type: text/plain\r\n\r\nline\r\nbare lf\nlone\rcr \x00\xff\x80\r\n"
    armored = encrypt(engine, plaintext, recipient_of(key))
    assert decrypt_all(key, armored) == plaintext
    pkesk, seipd = packet_versions(armored)
    assert pkesk == {3} and seipd == {1}, "GnuPG 2.2 and RNP read PKESK v3 + SEIPD v1 only"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plaintext=st.binary(min_size=1, max_size=4096))
def test_round_trip_arbitrary_bytes(engine: GnuPGEngine, alice: TestKey, plaintext: bytes) -> None:
    assert decrypt_gpg(alice, encrypt(engine, plaintext, recipient_of(alice))) == plaintext


def test_all_valid_encryption_subkeys_and_no_expired_one(
    engine: GnuPGEngine, key_factory: KeyFactory
) -> None:
    two = key_factory.make_with_two_encryption_subkeys("two@example.test")
    armored = encrypt(engine, b"x", recipient_of(two))
    assert packet_recipients(armored) == {f[-16:] for f in two.encryption_subkeys}
    assert len(two.encryption_subkeys) == 2
    rotated = key_factory.make_with_old_expired_and_new_valid_subkey("rot@example.test")
    armored = encrypt(engine, b"x", recipient_of(rotated))
    assert packet_recipients(armored) == {f[-16:] for f in rotated.encryption_subkeys}
    assert len(rotated.encryption_subkeys) == 1
    revoked = key_factory.make_with_revoked_subkey_and_new_valid("rev@example.test")
    armored = encrypt(engine, b"x", recipient_of(revoked))
    assert packet_recipients(armored) == {f[-16:] for f in revoked.encryption_subkeys}


def _fake_gpg(tmp_path: Path, behaviour: str) -> str:
    """A gpg that answers --version like gpg but misbehaves when asked to encrypt."""
    script = tmp_path / "gpg"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --encrypt) break;; --list-config|--version|--import)'
        ' exec gpg "$@";; esac; done\n'
        'case " $* " in *" --encrypt "*) ;; *) exec gpg "$@";; esac\n'
        f"{behaviour}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize(
    "behaviour",
    [
        "cat >/dev/null; echo 'gpg: fatal' >&2; exit 2",
        "cat >/dev/null; exit 0",
        "cat; exit 0",  # "encrypts" to the plaintext itself
        "cat >/dev/null; printf -- '-----BEGIN PGP MESSAGE-----\\n\\n-----END PGP MESSAGE-----\\n'",
    ],
    ids=["exit-2", "exit-0-empty", "echoes-plaintext", "empty-armor"],
)
def test_misbehaving_gpg_is_an_error_never_output(
    tmp_path: Path, alice: TestKey, behaviour: str
) -> None:
    engine = GnuPGEngine(home=tmp_path / "home", binary=_fake_gpg(tmp_path, behaviour))
    with pytest.raises(EngineError) as caught:
        encrypt(engine, b"secret plan", recipient_of(alice))
    assert "secret plan" not in str(caught.value)


def test_keyset_home_is_rebuilt_when_missing(tmp_path: Path, alice: TestKey) -> None:
    engine = GnuPGEngine(home=tmp_path / "home")
    recipient = recipient_of(alice)
    encrypt(engine, b"x", recipient)
    for child in (tmp_path / "home" / "keysets").iterdir():
        for item in sorted(child.rglob("*"), reverse=True):
            item.unlink() if item.is_file() or item.is_socket() else item.rmdir()
        child.rmdir()
    assert decrypt_gpg(alice, encrypt(engine, b"again", recipient)) == b"again"


def test_damaged_keyring_defers_once_then_heals(tmp_path: Path, alice: TestKey) -> None:
    engine = GnuPGEngine(home=tmp_path / "home")
    recipient = recipient_of(alice)
    encrypt(engine, b"x", recipient)
    (home,) = (tmp_path / "home" / "keysets").iterdir()
    (home / "pubring.kbx").write_bytes(b"garbage" * 100)
    with pytest.raises(EngineError):
        encrypt(engine, b"x", recipient)
    assert decrypt_gpg(alice, encrypt(engine, b"healed", recipient)) == b"healed"


def test_corrupt_stored_key_is_an_error(tmp_path: Path, alice: TestKey) -> None:
    engine = GnuPGEngine(home=tmp_path / "home")
    good = recipient_of(alice)
    broken = Recipient(good.key_data[: len(good.key_data) // 2], good.encryption_keys)
    with pytest.raises(EngineError, match="could not import"):
        encrypt(engine, b"x", broken)
