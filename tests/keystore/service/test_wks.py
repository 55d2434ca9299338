"""Web Key Service against GnuPG's own client: gpg-wks-client makes the submission, answers our
confirmation request, and the key becomes active only then."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpgfilter.mail.deliver import MailClient
from gpgfilter.process.config import Endpoint, GpgConfig
from gpgfilter.process.keyserver import ThrowAwayEncryptor, start_wks_listener
from keystore.service.wks import Outgoing, ServiceKey, WksIgnored, WksRejected, WksServer
from keystore.service.wks_listener import WksHandler
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.validate import validate_key
from tests.support.debian import require_program
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import KeyFactory, TestKey

WKS_CLIENT = "/usr/lib/gnupg/gpg-wks-client"
DOMAIN = "example.test"
SUBMISSION = f"key-submission@{DOMAIN}"


def require_wks_client() -> str:
    """GnuPG's WKS client, the reference these tests hold the service to (not on PATH)."""
    return require_program(WKS_CLIENT, "gpg-wks-client")


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def service_key() -> Iterator[ServiceKey]:
    # A short path: gpg-agent's socket lives in the home when /run/user/UID is absent.
    home = Path(tempfile.mkdtemp(prefix="wks-", dir="/tmp"))
    key = ServiceKey.open(home / "home", SUBMISSION)
    yield key
    key.close()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyFactory]:
    with KeyFactory(tmp_path_factory.mktemp("wkskeys")) as keys:
        yield keys


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteKeyStore]:
    store = SQLiteKeyStore(tmp_path / "keys.sqlite", create=True)
    yield store
    store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(store: SQLiteKeyStore, service_key: ServiceKey, clock: Clock) -> WksServer:
    return WksServer(
        store=store,
        service_key=service_key,
        encryptor=ThrowAwayEncryptor(GpgConfig()),
        domains=[DOMAIN],
        token_ttl=3600,
        clock=clock,
    )


def gpg_in(key: TestKey) -> list[str]:
    return ["gpg", "--homedir", str(key.home), "--batch"]


def user(factory: KeyFactory, service_key: ServiceKey, address: str) -> TestKey:
    """A user with a fresh key whose keyring also has the submission key (as WKD gives it)."""
    key = factory.make(address)
    subprocess.run(
        ["gpg", "--homedir", str(key.home), "--batch", "--import"],
        input=service_key.public_key,
        capture_output=True,
        check=True,
    )
    return key


def wks_client(key: TestKey, *args: str, data: bytes = b"") -> bytes:
    done = subprocess.run(
        [require_wks_client(), "--fake-submission-addr", SUBMISSION, *args],
        input=data,
        capture_output=True,
        env={**os.environ, "GNUPGHOME": str(key.home)},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    assert done.stdout
    return done.stdout


def submit(server: WksServer, key: TestKey) -> Outgoing:
    submission = wks_client(key, "--create", key.fingerprint, key.address)
    assert b"multipart/encrypted" in submission  # encrypted to the submission key
    (request,) = server.handle(submission)
    assert request.recipients == (key.address,) and request.essential
    return request


def nonce_of(key: TestKey, request: Outgoing) -> str:
    """The nonce, read as the user reads it: decrypted with the user's secret key."""
    armored = re.search(
        rb"-----BEGIN PGP MESSAGE-----.*?-----END PGP MESSAGE-----", request.data, re.DOTALL
    )
    assert armored is not None
    plain = subprocess.run(
        ["gpg", "--homedir", str(key.home), "--batch", "--decrypt"],
        input=armored.group(0),
        capture_output=True,
        check=True,
    ).stdout.decode()
    found = re.search(r"^nonce: (\S+)$", plain, re.MULTILINE)
    assert found is not None
    assert f"fingerprint: {key.fingerprint}" in plain and f"sender: {SUBMISSION}" in plain
    return found.group(1)


def clear_response(address: str, nonce: str) -> bytes:
    """A confirmation response in the clear, as gpg-wks-client sends when it lacks our key."""
    return (
        f"From: {address}\r\nTo: {SUBMISSION}\r\nSubject: Key publication confirmation\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/vnd.gnupg.wks\r\n\r\n"
        f"type: confirmation-response\r\nsender: {SUBMISSION}\r\naddress: {address}\r\n"
        f"nonce: {nonce}\r\n"
    ).encode()


def test_gnupg_client_round_trip_activates_the_key(
    factory: KeyFactory, service_key: ServiceKey, server: WksServer, store: SQLiteKeyStore
) -> None:
    alice = user(factory, service_key, f"alice@{DOMAIN}")
    request = submit(server, alice)
    assert store.keys_for(alice.address) == []  # pending only
    assert [p.origin for p in store.pending_for(alice.address, int(server.clock()))] == ["wks"]
    assert b"multipart/signed" in request.data and b"application/vnd.gnupg.wks" in request.data
    assert nonce_of(alice, request).encode() not in request.data  # only inside the ciphertext

    response = wks_client(alice, "--receive", data=request.data)
    assert b"multipart/encrypted" in response  # encrypted to the submission key
    (notice,) = server.handle(response)

    (active,) = store.keys_for(alice.address)
    assert active.fingerprint == alice.fingerprint
    assert store.pending_for(alice.address, int(server.clock())) == []
    (audit,) = store.audit_log(alice.address)
    assert (audit.action, audit.actor, audit.fingerprint) == (
        "registered",
        "wks",
        alice.fingerprint,
    )
    assert notice.recipients == (alice.address,) and not notice.essential
    assert b"multipart/encrypted" in notice.data
    with pytest.raises(WksRejected, match="already used"):  # the same response again
        server.handle(response)


def test_signature_of_the_request_verifies_with_the_submission_key(
    factory: KeyFactory, service_key: ServiceKey, server: WksServer
) -> None:
    bob = user(factory, service_key, f"bob@{DOMAIN}")
    request = submit(server, bob).data
    boundary = re.search(rb'micalg=pgp-sha256; boundary="([^"]+)"', request)
    assert boundary is not None
    mark = b"--" + boundary.group(1)
    signed = request.split(mark + b"\r\n")[1].removesuffix(b"\r\n")
    signature = request.split(mark + b"\r\n")[2].split(b"\r\n\r\n", 1)[1].split(b"\r\n" + mark)[0]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        (Path(tmp) / "data").write_bytes(signed)
        (Path(tmp) / "sig.asc").write_bytes(signature)
        done = subprocess.run(
            [*gpg_in(bob), "--status-fd", "1", "--verify", f"{tmp}/sig.asc", f"{tmp}/data"],
            capture_output=True,
            text=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert f"VALIDSIG {service_key.fingerprint} " in done.stdout


def test_forged_nonce_and_another_address_are_refused_and_keep_the_real_one(
    factory: KeyFactory, service_key: ServiceKey, server: WksServer, store: SQLiteKeyStore
) -> None:
    carol = user(factory, service_key, f"carol@{DOMAIN}")
    request = submit(server, carol)
    nonce = nonce_of(carol, request)
    with pytest.raises(WksRejected, match="no pending key publication"):
        server.handle(clear_response(carol.address, "forged" + nonce[6:]))
    with pytest.raises(WksRejected, match="no pending key publication"):
        server.handle(clear_response(f"mallory@{DOMAIN}", nonce))
    assert store.keys_for(carol.address) == [] and store.keys_for(f"mallory@{DOMAIN}") == []
    # Neither attempt used the token up: the owner's own answer still works, once.
    server.handle(clear_response(carol.address, nonce))
    assert [k.fingerprint for k in store.keys_for(carol.address)] == [carol.fingerprint]
    with pytest.raises(WksRejected, match="already used"):
        server.handle(clear_response(carol.address, nonce))


def test_expired_confirmation_is_refused(
    factory: KeyFactory,
    service_key: ServiceKey,
    server: WksServer,
    store: SQLiteKeyStore,
    clock: Clock,
) -> None:
    dave = user(factory, service_key, f"dave@{DOMAIN}")
    request = submit(server, dave)
    clock.now += 3601
    response = wks_client(dave, "--receive", data=request.data)
    with pytest.raises(WksRejected, match="expired"):
        server.handle(response)
    assert store.keys_for(dave.address) == []


def test_replacement_keeps_the_current_key_until_confirmed(
    factory: KeyFactory, service_key: ServiceKey, server: WksServer, store: SQLiteKeyStore
) -> None:
    old = factory.make(f"erin@{DOMAIN}")
    validated = validate_key(old.public)
    store.bind(old.address, validated.key)
    new = user(factory, service_key, old.address)
    request = submit(server, new)
    assert [k.fingerprint for k in store.keys_for(old.address)] == [old.fingerprint]
    server.handle(wks_client(new, "--receive", data=request.data))
    assert [k.fingerprint for k in store.keys_for(old.address)] == [new.fingerprint]
    assert store.audit_log(old.address)[0].action == "replaced"


def plain_submission(sender: str, key: bytes) -> bytes:
    return (
        f"From: {sender}\r\nTo: {SUBMISSION}\r\nSubject: Key publishing request\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/pgp-keys\r\n\r\n"
    ).encode() + key.replace(b"\n", b"\r\n")


def test_submissions_that_cannot_be_published_are_refused(
    factory: KeyFactory, service_key: ServiceKey, server: WksServer, store: SQLiteKeyStore
) -> None:
    frank = factory.make(f"frank@{DOMAIN}")
    outsider = factory.make("olga@elsewhere.test")
    sign_only = factory.make_sign_only(f"sam@{DOMAIN}")
    cases = [
        (plain_submission(f"grace@{DOMAIN}", frank.public), "no user ID for grace@example.test"),
        (plain_submission(outsider.address, outsider.public), "elsewhere.test are not published"),
        (plain_submission(sign_only.address, sign_only.public), "no valid encryption"),
        (plain_submission(frank.address, b"not a key"), "the key is refused"),
        (plain_submission(SUBMISSION, frank.public), "not published here"),
    ]
    for message, reason in cases:
        with pytest.raises(WksRejected, match=reason):
            server.handle(message)
    for address in (f"grace@{DOMAIN}", frank.address, outsider.address, sign_only.address):
        assert store.keys_for(address) == []
        assert store.pending_for(address, int(server.clock())) == []
    with pytest.raises(WksIgnored):
        server.handle(b"From: spam@example.com\r\nSubject: hi\r\n\r\nbuy now\r\n")
    not_for_us = subprocess.run(
        [*gpg_in(frank), "--armor", "--encrypt", "--recipient", frank.fingerprint],
        input=b"Content-Type: application/pgp-keys\n\n" + frank.public,
        capture_output=True,
        check=True,
    ).stdout
    encrypted = (
        (
            f"From: {frank.address}\r\nTo: {SUBMISSION}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
            ' boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
            "Version: 1\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + not_for_us
        + b"\r\n--b--\r\n"
    )
    with pytest.raises(WksRejected, match=f"must be encrypted to {service_key.fingerprint}"):
        server.handle(encrypted)


def test_plain_submission_with_the_right_user_id_asks_for_confirmation(
    factory: KeyFactory, server: WksServer, store: SQLiteKeyStore
) -> None:
    ivan = factory.make(f"Ivan@{DOMAIN}")
    (request,) = server.handle(plain_submission(ivan.address, ivan.public))
    assert request.recipients == (f"ivan@{DOMAIN}",)
    assert [p.address for p in store.pending_for(f"ivan@{DOMAIN}", int(server.clock()))] == [
        f"ivan@{DOMAIN}"
    ]


async def test_listener_answers_for_what_became_of_the_mail(
    factory: KeyFactory, service_key: ServiceKey, server: WksServer, store: SQLiteKeyStore
) -> None:
    sent: list[tuple[str, list[str], bytes]] = []
    failing = False

    async def send(mail_from: str, recipients: list[str], data: bytes) -> None:
        if failing:
            raise OSError("relay down")
        sent.append((mail_from, recipients, data))

    port = free_port()
    listener = await start_wks_listener(
        WksHandler(server, send), Endpoint("127.0.0.1", port), hostname="wks.test"
    )
    client = MailClient(Endpoint("127.0.0.1", port), lmtp=True, helo="mx.test", timeout=60)
    try:
        judy = user(factory, service_key, f"judy@{DOMAIN}")
        submission = await asyncio.to_thread(
            wks_client, judy, "--create", judy.fingerprint, judy.address
        )
        (reply,) = await client.send(judy.address, [SUBMISSION], submission)
        assert reply.code == 250
        assert [(s[0], s[1]) for s in sent] == [("", [judy.address])]

        (reply,) = await client.send("x@example.com", [SUBMISSION], b"Subject: hi\r\n\r\nspam\r\n")
        assert reply.code == 250 and len(sent) == 1  # dropped, nothing sent

        bad = plain_submission(f"kim@{DOMAIN}", judy.public)
        (reply,) = await client.send(f"kim@{DOMAIN}", [SUBMISSION], bad)
        assert reply.code == 550 and "no user ID for kim@example.test" in reply.text

        (reply,) = await client.send(judy.address, [f"other@{DOMAIN}"], submission)
        assert reply.code == 550

        failing = True  # the confirmation request cannot be sent: Postfix must retry
        (reply,) = await client.send(judy.address, [SUBMISSION], submission)
        assert reply.code == 451
        failing = False

        response = await asyncio.to_thread(wks_client, judy, "--receive", data=sent[0][2])
        (reply,) = await client.send(judy.address, [SUBMISSION], response)
        # The retried submission replaced the first request: its nonce no longer works.
        assert reply.code == 550 and "no pending key publication" in reply.text
    finally:
        await client.close()
        listener.close()
        await listener.wait_closed()
    assert store.keys_for(judy.address) == []


def test_sub_addresses_are_refused_and_a_confirmed_old_copy_rolls_nothing_back(
    factory: KeyFactory, server: WksServer, store: SQLiteKeyStore
) -> None:
    tagged = factory.make(f"kim+lists@{DOMAIN}")
    with pytest.raises(WksRejected, match="not sub-addresses"):
        server.handle(plain_submission(tagged.address, tagged.public))
    assert store.pending_for(tagged.address, int(server.clock())) == []
    # The owner's old copy, submitted and confirmed after a subkey rotation, is merged.
    kim = factory.make(f"kim@{DOMAIN}")
    (first,) = kim.encryption_subkeys
    old_request = server.handle(plain_submission(kim.address, kim.public))[0]
    rotated = factory.revoke_subkey(factory.add_encryption_subkey(kim), first)
    store.bind(kim.address, validate_key(rotated.public).key)
    old_nonce = nonce_of(kim, old_request)
    with pytest.raises(WksRejected, match="no pending key publication"):  # voided by the bind
        server.handle(clear_response(kim.address, old_nonce))
    request = server.handle(plain_submission(kim.address, kim.public))[0]
    server.handle(clear_response(kim.address, nonce_of(kim, request)))
    (stored,) = store.keys_for(kim.address)
    assert stored.usable_encryption_keys() == rotated.encryption_subkeys


def test_a_key_revoked_before_it_was_replaced_is_never_published_again(
    factory: KeyFactory, server: WksServer, store: SQLiteKeyStore
) -> None:
    old = factory.make(f"lena@{DOMAIN}")
    new = factory.make(f"lena@{DOMAIN}")
    request = server.handle(plain_submission(old.address, old.public))[0]
    server.handle(clear_response(old.address, nonce_of(old, request)))
    store.revoke(old.fingerprint)
    store.bind(new.address, validate_key(new.public).key)
    assert store.key(old.fingerprint) is None
    request = server.handle(plain_submission(old.address, old.public))[0]
    with pytest.raises(WksRejected, match="revoked"):
        server.handle(clear_response(old.address, nonce_of(old, request)))
    assert [k.fingerprint for k in store.keys_for(old.address)] == [new.fingerprint]
