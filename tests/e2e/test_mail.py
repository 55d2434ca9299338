"""End to end through real Postfix, real gpgfilter (its own process) and real Dovecot: mail is
sent over SMTP, fetched over IMAP, and decrypted with gpg, sq and rnp."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.e2e_stack import Stack
from tests.support.mailstack import require_mail_stack
from tests.support.openpgp_tools import (
    TestKey,
    decrypt_all,
    decrypt_gpg,
    packet_recipients,
    packet_versions,
)
from tests.support.pgpmime_check import armored_part
from tests.support.signatures import (
    inner_entity,
    load_corpus,
    verify_clearsigned,
    verify_pgp_mime_signed,
    verify_smime_signed,
)

pytestmark = pytest.mark.e2e

USERS = [
    "alice@example.test",
    "bob@example.test",
    "carol@example.test",  # no key: gets mail as it was
    "dave@example.test",
    "new@example.test",  # a Sequoia 2 key advertising SEIPDv2
    "sender@example.test",
]
CORPUS = load_corpus()
# What Postfix itself changes on the way in (mail-stack.md): it splits lines over 998 octets
# and turns a lone CR into a line break. (wire() already sends bare LF as CRLF, as SMTP does.)
TRANSPORT_CHANGED = {
    "clear-lone-cr.eml",
    "clear-long-line.eml",
    "clear-long-header-line.eml",
}


@pytest.fixture(scope="module", params=["lmtp", "content_filter"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    alice: TestKey,
    bob: TestKey,
    dave_key: TestKey,
    seipdv2_key: TestKey,
) -> Iterator[Stack]:
    """The stack as installed: the default engine (auto)."""
    require_mail_stack()
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    with Stack(root, mode=request.param, users=USERS) as running:
        assert running.filter is not None
        running.filter.import_key(alice.public)
        running.filter.import_key(bob.public)
        running.filter.import_key(dave_key.public)
        running.filter.import_key(seipdv2_key.public)
        yield running


@pytest.fixture(scope="session")
def dave_key(key_factory: object) -> TestKey:
    from tests.support.openpgp_tools import KeyFactory

    assert isinstance(key_factory, KeyFactory)
    return key_factory.make_with_two_encryption_subkeys("dave@example.test")


def send(stack: Stack, rcpts: list[str], data: bytes, **kwargs: object) -> None:
    stack.postfix.send("sender@example.test", rcpts, data, **kwargs)  # type: ignore[arg-type]


def wire(raw: bytes) -> bytes:
    """The message as SMTP carries it: CRLF line ends and a final CRLF."""
    raw = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


def fresh(stack: Stack, *users: str) -> None:
    for user in users:
        stack.dovecot.delete_all(user)


def test_corpus_round_trips_byte_for_byte(stack: Stack, alice: TestKey) -> None:
    """Every readable message arrives encrypted for alice; decrypted by gpg, sq and rnp, it is
    byte for byte what the filter received (carol's clear copy of the same transaction) and,
    where the transport changes nothing, what the sender sent. Signatures still verify."""
    fresh(stack, "alice@example.test", "carol@example.test")
    names = sorted(n for n in CORPUS if not n.startswith("encrypted-"))
    for count, name in enumerate(names, start=1):
        # One at a time, so that both mailboxes hold the messages in the same order.
        send(stack, ["alice@example.test", "carol@example.test"], wire(CORPUS[name]))
        stack.dovecot.wait_for("alice@example.test", count, timeout=30)
        stack.dovecot.wait_for("carol@example.test", count, timeout=30)
    stored = stack.dovecot.fetch_all("alice@example.test")
    clear = stack.dovecot.fetch_all("carol@example.test")
    for name, encrypted, received in zip(names, stored, clear, strict=True):
        plaintext = decrypt_all(alice, armored_part(encrypted))
        # Dovecot stores a NUL of the clear copy as 0x80; the ciphertext keeps it.
        assert plaintext.replace(b"\x00", b"\x80") == inner_entity(received), name
        if name not in TRANSPORT_CHANGED:
            assert plaintext == inner_entity(wire(CORPUS[name])), name
        if name.startswith("signed-pgp-mime"):
            verify_pgp_mime_signed(plaintext)
        elif name.startswith("signed-pgp-clearsigned"):
            verify_clearsigned(plaintext)
        elif name.startswith("signed-smime"):
            verify_smime_signed(plaintext)
    # Subjects never reach the filter's log.
    assert "Subject" not in stack.filter.log()  # type: ignore[union-attr]


def test_already_encrypted_mail_is_stored_untouched(stack: Stack) -> None:
    fresh(stack, "alice@example.test")
    names = sorted(n for n in CORPUS if n.startswith("encrypted-"))
    for name in names:
        send(stack, ["alice@example.test"], wire(CORPUS[name]))
    stored = stack.dovecot.wait_for("alice@example.test", len(names), timeout=30)
    for name in names:
        sent = wire(CORPUS[name])
        assert [m for m in stored if m.endswith(sent)], f"{name} was changed on its way"


def test_multiple_recipients_bcc_no_key_and_subaddress(
    stack: Stack, alice: TestKey, bob: TestKey, dave_key: TestKey
) -> None:
    fresh(stack, *USERS[:4])
    message = wire(
        b"From: sender@example.test\nTo: alice@example.test\nCc: bob+news@example.test\n"
        b"Bcc: dave@example.test\nSubject: quarterly numbers\nMessage-ID: <m1@example.test>\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\nThe numbers.\n"
    )
    rcpts = [
        "alice@example.test",
        "bob+news@example.test",
        "dave@example.test",
        "carol@example.test",
    ]
    send(stack, rcpts, message)
    for user, key in (
        ("alice@example.test", alice),
        ("bob@example.test", bob),
        ("dave@example.test", dave_key),
    ):
        (stored,) = stack.dovecot.wait_for(user, 1)
        armored = armored_part(stored)
        # Only this recipient's key(s): nobody learns who else (Bcc included) got it.
        assert packet_recipients(armored) == {f[-16:] for f in key.encryption_subkeys}
        assert decrypt_all(key, armored) == inner_entity(message)  # RSA and Curve25519
        assert b"quarterly numbers" in stored and b"The numbers" not in stored
        assert b"Bcc:" not in stored
    (clear,) = stack.dovecot.wait_for("carol@example.test", 1)
    assert clear.endswith(message.replace(b"Bcc: dave@example.test\r\n", b""))
    assert len(dave_key.encryption_subkeys) == 2


def test_utf8_headers_with_smtputf8(stack: Stack, alice: TestKey) -> None:
    fresh(stack, "alice@example.test")
    message = wire(CORPUS["clear-utf8-raw-headers.eml"])
    send(stack, ["alice@example.test"], message, smtputf8=True)
    (stored,) = stack.dovecot.wait_for("alice@example.test", 1)
    assert decrypt_gpg(alice, armored_part(stored)) == inner_entity(message)


def metrics_text(stack: Stack) -> str:
    assert stack.filter is not None
    url = f"http://127.0.0.1:{stack.filter.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def encryptions(stack: Stack, engine: str) -> float:
    found = re.search(rf'^gpgfilter_encryptions_total\{{engine="{engine}"\}} (\S+)$',
                      metrics_text(stack), re.M)  # fmt: skip
    assert found, f"no gpgfilter_encryptions_total for {engine}"
    return float(found.group(1))


def test_metrics_endpoint_counts_outcomes(stack: Stack) -> None:
    text = metrics_text(stack)
    assert re.search(r'^gpgfilter_messages_total\{outcome="encrypted"\} [1-9]', text, re.M)
    assert "gpgfilter_encryption_duration_seconds_bucket" in text
    assert re.search(r'^gpgfilter_keystore_lookups_total\{answered_by="store"\} [1-9]', text, re.M)
    assert re.search(r'^gpgfilter_keystore_lookups_total\{answered_by="cache"\} ', text, re.M)


def test_seipdv2_key_gets_mail_gpg_22_reads_beside_the_fast_engine(
    stack: Stack, alice: TestKey, seipdv2_key: TestKey
) -> None:
    """A Sequoia 2 key (advertising SEIPDv2) is served by gpg, in the form GnuPG 2.2, RNP and
    sq read; a common key in the same transaction by Sequoia in-process; the metrics say so."""
    fresh(stack, "alice@example.test", "new@example.test")
    before = {name: encryptions(stack, name) for name in ("sequoia", "gnupg")}
    message = wire(
        b"From: sender@example.test\nTo: new@example.test, alice@example.test\n"
        b"Subject: hello\nMessage-ID: <v2@example.test>\n\nfor new and old keys\n"
    )
    send(stack, ["new@example.test", "alice@example.test"], message)
    for user, key in (("new@example.test", seipdv2_key), ("alice@example.test", alice)):
        (stored,) = stack.dovecot.wait_for(user, 1)
        armored = armored_part(stored)
        assert packet_versions(armored) == ({3}, {1}), user
        assert decrypt_all(key, armored) == inner_entity(message), user  # gpg 2.2, sq, rnp
    assert encryptions(stack, "sequoia") == before["sequoia"] + 1
    assert encryptions(stack, "gnupg") == before["gnupg"] + 1


# -- faults (LMTP mode: the recommended wiring) ------------------------------------------------


@pytest.fixture(scope="module")
def lmtp_stack(tmp_path_factory: pytest.TempPathFactory, alice: TestKey) -> Iterator[Stack]:
    require_mail_stack()
    root = tmp_path_factory.mktemp("faults")
    # gpg for every recipient: the faults below are gpg's, injected through its wrapper.
    with Stack(root, mode="lmtp", users=USERS, gpg_yaml="  engine: gnupg\n") as running:
        assert running.filter is not None
        running.filter.import_key(alice.public)
        running.dovecot.add_user("full@example.test", quota_bytes=1)
        yield running


def _note(n: int) -> bytes:
    return wire(
        b"From: sender@example.test\nTo: alice@example.test\nSubject: note %d\n"
        b"Message-ID: <note%d@example.test>\n\nsecret body %d\n" % (n, n, n)
    )


def _settle(stack: Stack, user: str, count: int) -> list[bytes]:
    stack.postfix.flush()
    stored = stack.dovecot.wait_for(user, count, timeout=30)
    time.sleep(1)  # give a duplicate the chance to show up
    assert stack.dovecot.count(user) == count, "delivered more than once"
    return stored


@pytest.mark.parametrize("fault", ["exit-2", "empty-output"])
def test_gpg_failure_defers_and_never_stores_clear(
    lmtp_stack: Stack, alice: TestKey, fault: str
) -> None:
    stack = lmtp_stack
    assert stack.filter is not None
    fresh(stack, "alice@example.test")
    stack.filter.set_gpg_fault(fault)
    try:
        send(stack, ["alice@example.test"], _note(1))
        stack.postfix.wait_log(r"to=<alice@example.test>.*status=deferred.*4\.3\.0")
        assert stack.dovecot.count("alice@example.test") == 0
        assert stack.postfix.queue_ids()
    finally:
        stack.filter.set_gpg_fault(None)
    (stored,) = _settle(stack, "alice@example.test", 1)
    assert decrypt_gpg(alice, armored_part(stored)) == inner_entity(_note(1))
    stack.postfix.wait_queue_empty()
    _clear_log(stack)


def _clear_log(stack: Stack) -> None:
    stack.postfix.log_path.write_text("")


def test_dovecot_down_defers_then_delivers_once(lmtp_stack: Stack, alice: TestKey) -> None:
    stack = lmtp_stack
    fresh(stack, "alice@example.test")
    stack.dovecot.stop()
    try:
        send(stack, ["alice@example.test"], _note(2))
        stack.postfix.wait_log(r"to=<alice@example.test>.*status=deferred.*4\.4\.0")
    finally:
        stack.dovecot.start()
    (stored,) = _settle(stack, "alice@example.test", 1)
    assert decrypt_gpg(alice, armored_part(stored)) == inner_entity(_note(2))
    stack.postfix.wait_queue_empty()
    _clear_log(stack)


def test_per_recipient_replies_delivered_deferred_bounced(
    lmtp_stack: Stack, alice: TestKey
) -> None:
    """Dovecot answers 250 / 452 / 550 for three recipients of one message: delivered,
    deferred then delivered once, bounced — and the bounce, which quotes the message, reaches
    the enrolled sender encrypted, because it too passes the filter."""
    stack = lmtp_stack
    fresh(stack, "alice@example.test", "carol@example.test", "full@example.test")
    rcpts = ["carol@example.test", "full@example.test", "ghost@example.test"]
    stack.postfix.send("alice@example.test", rcpts, _note(3))
    stack.postfix.wait_log(r"to=<full@example.test>.*status=deferred.*452")
    stack.postfix.wait_log(r"to=<ghost@example.test>.*status=bounced")
    stack.postfix.wait_log(r"to=<carol@example.test>.*status=sent")
    (bounce,) = stack.dovecot.wait_for("alice@example.test", 1)
    report = decrypt_gpg(alice, armored_part(bounce))
    assert b"ghost@example.test" in report and b"secret body 3" in report
    assert b"secret body" not in bounce
    stack.dovecot.set_quota("full@example.test", None)
    _settle(stack, "full@example.test", 1)
    stack.postfix.wait_queue_empty()
    assert stack.dovecot.count("carol@example.test") == 1, "carol got a duplicate"
    assert stack.dovecot.count("alice@example.test") == 1, "a second bounce"
    _clear_log(stack)


def test_key_store_unreadable_defers(lmtp_stack: Stack, alice: TestKey) -> None:
    stack = lmtp_stack
    assert stack.filter is not None
    fresh(stack, "alice@example.test")
    store = stack.filter.data_dir / "keys.sqlite"
    moved = store.with_name("keys.sqlite.away")
    store.rename(moved)
    try:
        send(stack, ["alice@example.test", "carol@example.test"], _note(4))
        stack.postfix.wait_log(r"to=<alice@example.test>.*status=deferred.*4\.3\.0")
        stack.postfix.wait_log(r"to=<carol@example.test>.*status=deferred.*4\.3\.0")
        assert stack.dovecot.count("alice@example.test") == 0
    finally:
        moved.rename(store)
    (stored,) = _settle(stack, "alice@example.test", 1)
    assert decrypt_gpg(alice, armored_part(stored)) == inner_entity(_note(4))
    stack.postfix.wait_queue_empty()
    _clear_log(stack)


def test_filter_log_has_one_line_per_message_and_recipient(lmtp_stack: Stack) -> None:
    assert lmtp_stack.filter is not None
    log = lmtp_stack.filter.log()
    assert re.search(r"message queue_id=[0-9A-Za-z]+ size=\d+ recipients=\d", log)
    assert re.search(r"recipient queue_id=\S+ to=<alice@example.test> outcome=encrypted", log)
    assert "secret body" not in log and "note 1" not in log
