"""Header protection end to end: real Postfix, the gpgfilter process, real Dovecot, in both
modes and for each setting; every copy decrypted with gpg, sq and rnp and read as a client
would, signatures checked inside."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from keystore.storage.config import KeystoreConfig
from tests.e2e.test_mail import TRANSPORT_CHANGED, USERS, fresh, send, wire
from tests.support.e2e_stack import Stack
from tests.support.mailstack import require_mail_stack
from tests.support.openpgp_tools import TestKey, decrypt_all
from tests.support.pgpmime_check import armored_part
from tests.support.protected_check import check_protected
from tests.support.signatures import (
    inner_entity,
    load_corpus,
    verify_clearsigned,
    verify_pgp_mime_signed,
    verify_smime_signed,
)

pytestmark = pytest.mark.e2e

CORPUS = load_corpus()
# Left as the original entity whatever the setting: nothing to copy, or an ambiguous type.
UNPROTECTABLE = {"clear-no-headers.eml", "clear-duplicate-content-type.eml"}

LOOKUP_CACHE = KeystoreConfig().lookup_cache


@pytest.fixture(scope="module", params=["lmtp", "content_filter"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    alice: TestKey,
    bob: TestKey,
) -> Iterator[Stack]:
    require_mail_stack()
    root = tmp_path_factory.mktemp(f"hp-{request.param}")
    with Stack(root, mode=request.param, users=USERS) as running:
        assert running.filter is not None
        running.filter.import_key(alice.public)
        running.filter.import_key(bob.public)
        yield running


def set_default(stack: Stack, setting: str) -> None:
    """Restart the filter with ``policy.header_protection: setting``."""
    assert stack.filter is not None
    path = stack.filter.config_path
    text = re.sub(r"policy:\n  header_protection: \S+\n", "", path.read_text())
    path.write_text(text + f"policy:\n  header_protection: {setting}\n")
    stack.filter.stop()
    stack.filter.start()


def verify_signature(name: str, entity: bytes) -> None:
    if name.startswith("signed-pgp-mime"):
        verify_pgp_mime_signed(entity)
    elif name.startswith("signed-pgp-clearsigned"):
        verify_clearsigned(entity)
    elif name.startswith("signed-smime"):
        verify_smime_signed(entity)


@pytest.mark.parametrize("setting", ["off", "copy", "hide-subject"])
def test_corpus_through_each_setting(stack: Stack, alice: TestKey, setting: str) -> None:
    set_default(stack, setting)
    fresh(stack, "alice@example.test", "carol@example.test")
    names = sorted(n for n in CORPUS if not n.startswith("encrypted-"))
    for count, name in enumerate(names, start=1):
        send(stack, ["alice@example.test", "carol@example.test"], wire(CORPUS[name]))
        stack.dovecot.wait_for("alice@example.test", count, timeout=30)
        stack.dovecot.wait_for("carol@example.test", count, timeout=30)
    stored = stack.dovecot.fetch_all("alice@example.test")
    clear = stack.dovecot.fetch_all("carol@example.test")
    with_legacy = set()
    for name, encrypted, received in zip(names, stored, clear, strict=True):
        plaintext = decrypt_all(alice, armored_part(encrypted))
        # Dovecot stores a NUL of the clear copy as 0x80; the ciphertext keeps it.
        as_stored = plaintext.replace(b"\x00", b"\x80")
        if setting == "off" or name in UNPROTECTABLE:
            assert as_stored == inner_entity(received), name
            if name not in TRANSPORT_CHANGED:
                assert plaintext == inner_entity(wire(CORPUS[name])), name
        elif check_protected(as_stored, received, encrypted, setting):
            with_legacy.add(name)
        verify_signature(name, plaintext)
    if setting == "hide-subject":
        assert "clear-plain-ascii.eml" in with_legacy
        assert not {n for n in with_legacy if n.startswith("signed-")}
        assert "clear-multipart-mixed-attachment.eml" not in with_legacy
    else:
        assert not with_legacy
    log = stack.filter.log()  # type: ignore[union-attr]
    assert "Subject" not in log and "Lunch on Friday" not in log


def test_a_message_already_protected_by_its_sender_is_encrypted_as_it_came(
    stack: Stack, alice: TestKey
) -> None:
    set_default(stack, "hide-subject")
    fresh(stack, "alice@example.test")
    message = wire(
        b"From: sender@example.test\nTo: alice@example.test\nSubject: own protection\n"
        b"Message-ID: <hp1@example.test>\nMIME-Version: 1.0\n"
        b'Content-Type: text/plain; charset=us-ascii; hp="clear"\n\nText.\n'
    )
    send(stack, ["alice@example.test"], message)
    (stored,) = stack.dovecot.wait_for("alice@example.test", 1)
    assert b"Subject: own protection" in stored
    assert decrypt_all(alice, armored_part(stored)) == inner_entity(message)


def test_each_address_gets_its_own_choice_set_by_the_admin_command(
    stack: Stack, alice: TestKey, bob: TestKey
) -> None:
    """One message to three recipients: alice chose hide-subject, bob copy, dave (no choice)
    gets the default, off. Set with ``gpgfilter keys protect`` while the filter runs."""
    assert stack.filter is not None
    set_default(stack, "off")
    for address, setting in (("alice@example.test", "hide-subject"), ("bob@example.test", "copy")):
        done = stack.filter.command("keys", "protect", address, setting)
        assert done.returncode == 0, done.stderr
    refused = stack.filter.command("keys", "protect", "nobody@example.test", "copy")
    assert refused.returncode != 0 and "nothing registered" in refused.stderr
    fresh(stack, "alice@example.test", "bob@example.test", "carol@example.test")
    message = wire(
        b"From: sender@example.test\nTo: alice@example.test, bob@example.test\n"
        b"Subject: quarterly numbers\nMessage-ID: <hp2@example.test>\nMIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=us-ascii\n\nThe numbers.\n"
    )
    send(stack, ["alice@example.test", "bob@example.test", "carol@example.test"], message)
    (clear,) = stack.dovecot.wait_for("carol@example.test", 1)
    (hidden,) = stack.dovecot.wait_for("alice@example.test", 1)
    (copied,) = stack.dovecot.wait_for("bob@example.test", 1)
    assert check_protected(decrypt_all(alice, armored_part(hidden)), clear, hidden, "hide-subject")
    assert b"quarterly numbers" not in hidden
    assert not check_protected(decrypt_all(bob, armored_part(copied)), clear, copied, "copy")
    assert b"Subject: quarterly numbers" in copied
    done = stack.filter.command("keys", "protect", "alice@example.test", "default")
    assert done.returncode == 0 and "off (the default)" in done.stdout
    # The running filter kept Alice's keys and setting; the change reaches it within
    # keystore.lookup_cache (1 s by default).
    time.sleep(LOOKUP_CACHE + 0.1)
    fresh(stack, "alice@example.test")
    send(stack, ["alice@example.test"], message)
    (stored,) = stack.dovecot.wait_for("alice@example.test", 1)
    assert decrypt_all(alice, armored_part(stored)) == inner_entity(message)
