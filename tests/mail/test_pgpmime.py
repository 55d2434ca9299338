"""Whatever the input, the encrypted message is RFC 3156, keeps every outer field verbatim,
decrypts to exactly the inner entity, and is recognised as already encrypted next time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpgfilter.mail import pgpmime
from gpgfilter.mail.classify import Verdict, classify
from gpgfilter.mail.rawmessage import split
from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.engine import Recipient
from gpgfilter.openpgp.gnupg import GnuPGEngine
from keystore.validate import validate_key
from tests.mail.test_rawmessage import messages
from tests.support.openpgp_tools import TestKey, decrypt_gpg
from tests.support.pgpmime_check import armored_part


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> GnuPGEngine:
    return GnuPGEngine(home=tmp_path_factory.mktemp("pgpmime"))


def encrypt_message(engine: GnuPGEngine, key: TestKey, raw: bytes) -> bytes:
    stored = validate_key(key.public).key
    recipient = Recipient(stored.key_data, stored.usable_encryption_keys())
    message = split(raw)
    armored = asyncio.run(engine.encrypt(message.inner_entity(), recipient))
    check_ciphertext(armored, recipient)
    return b"".join(pgpmime.assemble(message, armored))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.one_of(messages(), st.binary(max_size=3000)))
def test_any_message_round_trips(engine: GnuPGEngine, alice: TestKey, raw: bytes) -> None:
    original = split(raw)
    encrypted = encrypt_message(engine, alice, raw)
    outer = split(encrypted)
    kept = [f.terminated for f in original.outer_fields]
    assert [f.terminated for f in outer.fields[: len(kept)]] == kept
    assert [f.name for f in outer.fields[len(kept) :]] == ["mime-version", "content-type"]
    assert classify(outer) is Verdict.PGP_MIME, "our own output must pass through next time"
    start = encrypted.index(b"-----BEGIN PGP MESSAGE-----")
    end = encrypted.index(b"-----END PGP MESSAGE-----") + len(b"-----END PGP MESSAGE-----")
    assert decrypt_gpg(alice, encrypted[start:end]) == original.inner_entity()


def test_structure_as_a_mail_client_reads_it(engine: GnuPGEngine, alice: TestKey) -> None:
    raw = (
        Path(__file__).parents[1] / "corpus" / "clear-multipart-mixed-attachment.eml"
    ).read_bytes()
    encrypted = encrypt_message(engine, alice, raw)
    assert decrypt_gpg(alice, armored_part(encrypted)) == split(raw).inner_entity()
    assert b"Content-Transfer-Encoding" not in encrypted.split(b"\r\n\r\n", 1)[0]
