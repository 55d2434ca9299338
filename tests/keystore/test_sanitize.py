"""Self-service key uploads: every refusal has a precise reason, floods and photo IDs are cut
out at the packet level, revocations are believed only when gpg verifies them, and hostile
input only ever yields KeyRejected.

Keys are real (made by gpg through KeyFactory); what a packet is and who issued it is judged
by ``gpg --list-packets``, not by the parser under test.
"""

from __future__ import annotations

import contextlib
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystore import packets as openpgp
from keystore import sanitize
from keystore.sanitize import StrippedKey, UnfitKey, parse_signature, strip_key
from keystore.validate import (
    KeyRejected,
    check_revocation,
    looks_like_revocation,
    validate_key,
)
from tests.support.forgery import forged_self_signatures
from tests.support.openpgp_tools import KeyFactory, ListedPacket, TestKey, list_packets

# RFC 9580 appendix A.3: the sample version 6 certificate.
V6_CERTIFICATE = b"""-----BEGIN PGP PUBLIC KEY BLOCK-----

xioGY4d/4xsAAAAg+U2nu0jWCmHlZ3BqZYfQMxmZu52JGggkLq2EVD34laPCsQYf
GwoAAABCBYJjh3/jAwsJBwUVCg4IDAIWAAKbAwIeCSIhBssYbE8GCaaX5NUt+mxy
KwwfHifBilZwj2Ul7Ce62azJBScJAgcCAAAAAK0oIBA+LX0ifsDm185Ecds2v8lw
gyU2kCcUmKfvBXbAf6rhRYWzuQOwEn7E/aLwIwRaLsdry0+VcallHhSu4RN6HWaE
QsiPlR4zxP/TP7mhfVEe7XWPxtnMUMtf15OyA51YBM4qBmOHf+MZAAAAIIaTJINn
+eUBXbki+PSAld2nhJh/LVmFsS+60WyvXkQ1wpsGGBsKAAAALAWCY4d/4wKbDCIh
BssYbE8GCaaX5NUt+mxyKwwfHifBilZwj2Ul7Ce62azJAAAAAAQBIKbpGG2dWTX8
j+VjFM21J0hqWlEg+bdiojWnKfA5AQpWUWtnNwDEM0g12vYxoWM8Y81W+bHBw805
I8kWVkXU6vFOi+HWvv/ira7ofJu16NnoUkhclkUrk0mXubZvyl4GBg==
-----END PGP PUBLIC KEY BLOCK-----
"""

_DAY = 86400
_USER_ATTRIBUTE = 17
_SIGNATURE = 2
# gpg runs for most examples: no deadline, and few enough examples for a shared machine.
_GPG_EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def dearmor(armored: bytes) -> bytes:
    return subprocess.run(
        ["gpg", "--dearmor"], input=armored, capture_output=True, check=True
    ).stdout


def third_party(packets: list[ListedPacket], fingerprint: str) -> list[ListedPacket]:
    return [p for p in packets if p.tag == _SIGNATURE and p.issuer != openpgp.key_id(fingerprint)]


@pytest.fixture(scope="module")
def photo_key(key_factory: KeyFactory) -> TestKey:
    return key_factory.make_with_photo("photo@example.test")


@pytest.fixture(scope="module")
def flooded_photo(key_factory: KeyFactory, photo_key: TestKey) -> bytes:
    """The photo key with 200 third-party certifications of its user ID, binary."""
    return dearmor(key_factory.flooded(photo_key, count=200))


# -- refusals, one reason each ----------------------------------------------------------------


def test_garbage_and_damaged_armor_are_refused(alice: TestKey) -> None:
    with pytest.raises(KeyRejected, match=r"^not an OpenPGP public key"):
        validate_key(b"hello world")
    damaged = alice.public.replace(b"\n", b"\n!", 3)
    with pytest.raises(KeyRejected, match=r"^the ASCII armor is damaged"):
        validate_key(damaged)
    with pytest.raises(KeyRejected, match=r"^malformed OpenPGP data"):
        validate_key(dearmor(alice.public)[:-7])


def test_more_than_one_primary_key_is_refused(alice: TestKey, bob: TestKey) -> None:
    with pytest.raises(KeyRejected, match=r"^expected exactly one public key, found 2$"):
        validate_key(dearmor(alice.public) + dearmor(bob.public))


def test_secret_key_is_refused_and_never_echoed(alice: TestKey) -> None:
    binary = dearmor(alice.secret)
    for upload in (alice.secret, binary):
        with pytest.raises(KeyRejected) as caught:
            validate_key(upload, address="alice@example.test", require_uid=True)
        assert str(caught.value) == "this is a secret key: export and upload the public key only"


def test_v6_key_is_refused() -> None:
    with pytest.raises(KeyRejected, match=r"^v6 keys \(RFC 9580\) cannot be read"):
        validate_key(V6_CERTIFICATE)


def test_key_without_encryption_is_refused(key_factory: KeyFactory) -> None:
    key = key_factory.make_sign_only("signer@example.test")
    with pytest.raises(KeyRejected, match=r"^the key has no valid encryption key or subkey$"):
        validate_key(key.public)


def test_key_expiring_within_the_window_is_refused(key_factory: KeyFactory) -> None:
    key = key_factory.make("soon@example.test", expires="3d")
    assert validate_key(key.public).key.expires is not None  # no window: accepted
    with pytest.raises(KeyRejected) as caught:
        validate_key(key.public, min_valid_days=7)
    message = str(caught.value)
    assert message.startswith("the key expires on 20")
    assert "within 7 days: extend its expiry date" in message
    validate_key(key.public, min_valid_days=2)


def test_encryption_subkey_expiring_within_the_window_is_refused(key_factory: KeyFactory) -> None:
    key = key_factory.make_with_expiring_encryption_subkey("subsoon@example.test", "3d")
    stored = validate_key(key.public, min_valid_days=2).key
    assert stored.expires is None
    (subkey,) = stored.encryption_keys
    assert subkey.expires is not None
    with pytest.raises(KeyRejected) as caught:
        validate_key(key.public, min_valid_days=7)
    expiry = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(subkey.expires))
    assert str(caught.value).startswith(f"its encryption subkey expires on {expiry}, within 7 days")


def test_window_counts_from_now(key_factory: KeyFactory) -> None:
    key = key_factory.make("later@example.test", expires="1y")
    validate_key(key.public, min_valid_days=30)
    with pytest.raises(KeyRejected, match="within 30 days"):
        validate_key(key.public, min_valid_days=30, now=time.time() + 350 * _DAY)


def test_self_service_needs_a_user_id_for_the_address(alice: TestKey) -> None:
    with pytest.raises(KeyRejected, match=r"^the key has no user ID for carol@example\.test$"):
        validate_key(alice.public, address="Carol@Example.test", require_uid=True)
    mine = validate_key(alice.public, address="alice@example.test", require_uid=True)
    assert mine.addresses == ("alice@example.test",)
    # An administrator's explicit binding still works without one.
    assert validate_key(alice.public, address="carol@example.test").addresses == (
        "carol@example.test",
    )


def test_size_cap_comes_before_any_parsing(alice: TestKey) -> None:
    with pytest.raises(KeyRejected, match=r"^the key file is larger than 64 KiB$"):
        validate_key(b"\x00" * (64 * 1024 + 1), max_bytes=64 * 1024)
    with pytest.raises(KeyRejected, match=r"^the key file is larger than 100 bytes$"):
        validate_key(alice.public, max_bytes=100)
    with pytest.raises(KeyRejected, match=r"larger than 8 MiB"):
        validate_key(b"x" * (8 * 1024 * 1024 + 1))
    assert validate_key(alice.public, max_bytes=len(alice.public)).key


# -- what is kept -----------------------------------------------------------------------------


def test_flood_and_photo_are_cut_out(photo_key: TestKey, flooded_photo: bytes) -> None:
    listed = list_packets(flooded_photo)
    assert len(third_party(listed, photo_key.fingerprint)) == 200
    validated = validate_key(flooded_photo, address="photo@example.test", require_uid=True)
    stored = list_packets(validated.key.key_data)
    assert third_party(stored, photo_key.fingerprint) == []
    assert _USER_ATTRIBUTE not in [p.tag for p in stored]
    # Not even an explicit binding (which keeps the key's user IDs) brings the photo back.
    forced = validate_key(flooded_photo, address="alias@example.test")
    assert _USER_ATTRIBUTE not in [p.tag for p in list_packets(forced.key.key_data)]


def test_renewal_newest_self_signature_wins(key_factory: KeyFactory) -> None:
    key = key_factory.make("renew@example.test", expires="1y")
    before = validate_key(key.public).key
    renewed = key_factory.renew(key, "3y")
    # The upload carries the old and the new self-signatures of the user ID.
    uid_self_sigs = [p for p in list_packets(dearmor(renewed.public)) if p.sigclass == 0x13]
    assert len(uid_self_sigs) == 2
    after = validate_key(renewed.public, address="renew@example.test", require_uid=True).key
    assert after.fingerprint == before.fingerprint
    assert before.expires is not None and after.expires is not None
    assert after.expires - before.expires > 700 * _DAY
    assert all(k.expires and k.expires > before.expires + 700 * _DAY for k in after.encryption_keys)
    validate_key(renewed.public, min_valid_days=400)


# -- work per upload ----------------------------------------------------------------------------


def test_thousands_of_forged_self_signatures_are_refused_before_gpg(alice: TestKey) -> None:
    """7,000 copies of the user ID's self-signature, dated after it: a plain gpg import spends
    ~5 s verifying them; the packet-level check refuses them, naming what is wrong."""
    forged = forged_self_signatures(dearmor(alice.public), 7000)
    assert len(forged) < 1024 * 1024
    started = time.perf_counter()
    with pytest.raises(KeyRejected, match=r"^user ID number 1 carries 7001 signatures that"):
        validate_key(forged)
    assert time.perf_counter() - started < 2  # no gpg run at all (a generous bound)


def test_only_the_newest_self_signatures_reach_gpg(alice: TestKey) -> None:
    limit = sanitize.MAX_SIGNATURES_PER_COMPONENT
    older = forged_self_signatures(dearmor(alice.public), 50, newer=False)
    stripped = strip_key(older)
    assert stripped.trimmed_signatures == 50 - limit + 1
    kept = [p for p in list_packets(stripped.data) if p.sigclass == 0x13]
    genuine = next(p for p in list_packets(older) if p.sigclass == 0x13)
    assert len(kept) == limit and kept[0] == genuine  # the newest
    assert validate_key(older).key.fingerprint == alice.fingerprint
    # Forgeries dated after the genuine one push it out: the forger's own upload fails.
    with pytest.raises(KeyRejected, match="gpg could not import the key"):
        validate_key(forged_self_signatures(dearmor(alice.public), 50))


def test_absurd_numbers_of_user_ids_or_subkeys_are_refused(alice: TestKey) -> None:
    listed = list_packets(dearmor(alice.public))
    uid = next(p.raw for p in listed if p.tag == openpgp.TAG_USER_ID)
    subkey = next(p.raw for p in listed if p.tag == openpgp.TAG_PUBLIC_SUBKEY)
    head = listed[0].raw
    with pytest.raises(UnfitKey, match=r"^the key has 65 user IDs; at most 64 are accepted$"):
        strip_key(head + uid * 65)
    with pytest.raises(UnfitKey, match=r"^the key has 65 subkeys; at most 64 are accepted$"):
        strip_key(head + uid + subkey * 65)
    assert strip_key(head + uid * 64 + subkey * 64).data == head + uid * 64 + subkey * 64


# -- revocations ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def revocable(key_factory: KeyFactory) -> tuple[TestKey, bytes]:
    key = key_factory.make("rev@example.test")
    return key, key_factory.revocation_certificate(key)


def test_revocation_certificate_is_recognised_and_believed(
    revocable: tuple[TestKey, bytes],
) -> None:
    key, certificate = revocable
    assert b"BEGIN PGP PUBLIC KEY BLOCK" in certificate
    current = validate_key(key.public).key
    binary = dearmor(certificate)
    masked = certificate.replace(b"-----BEGIN", b":-----BEGIN", 1)  # as openpgp-revocs.d has it
    for upload in (certificate, binary, masked):
        assert looks_like_revocation(upload)
        assert check_revocation(upload, current) is True
    for other in (key.public, b"", b"hello", dearmor(key.public)):
        assert not looks_like_revocation(other)


def test_revocation_for_another_key_is_refused(
    revocable: tuple[TestKey, bytes], alice: TestKey
) -> None:
    _key, certificate = revocable
    current = validate_key(alice.public).key
    with pytest.raises(KeyRejected, match=r"^this revocation certificate is for another key"):
        check_revocation(certificate, current)


@pytest.mark.parametrize("offset", [-3, -20, 34])
def test_forged_revocation_is_not_believed(revocable: tuple[TestKey, bytes], offset: int) -> None:
    """A byte changed in the signature value (-3, -20) or in the signed creation time (34)."""
    key, certificate = revocable
    current = validate_key(key.public).key
    forged = bytearray(dearmor(certificate))
    forged[offset] ^= 0x55
    assert looks_like_revocation(bytes(forged))  # still shaped like one: routing is cheap
    with pytest.raises(KeyRejected, match=r"^the revocation certificate does not verify"):
        check_revocation(bytes(forged), current)


def test_other_lone_signatures_are_not_revocations(
    revocable: tuple[TestKey, bytes], alice: TestKey
) -> None:
    key, certificate = revocable
    current = validate_key(key.public).key
    # The user ID's self-signature (type 0x13) cut out of the key: a signature, not a revocation.
    (certification,) = [p.raw for p in list_packets(dearmor(key.public)) if p.sigclass == 0x13]
    assert not looks_like_revocation(certification)
    with pytest.raises(KeyRejected, match=r"^this is a signature of type 0x13, not a key revoc"):
        check_revocation(certification, current)
    truncated = dearmor(certificate)
    truncated = bytes([truncated[0], 8]) + truncated[2:10]  # framing intact, body cut short
    assert not looks_like_revocation(truncated)
    with pytest.raises(KeyRejected, match=r"^the revocation certificate is malformed$"):
        check_revocation(truncated, current)


def test_full_key_carrying_its_revocation(key_factory: KeyFactory, alice: TestKey) -> None:
    revoked = key_factory.make_revoked("gone@example.test")
    # The registered copy was made before the revocation: rebuild it without the revocation.
    packets = list_packets(dearmor(revoked.public))
    assert any(_is_key_revocation(p) for p in packets)
    unrevoked = b"".join(p.raw for p in packets if not _is_key_revocation(p))
    current = validate_key(unrevoked).key
    assert not looks_like_revocation(revoked.public)
    assert check_revocation(revoked.public, current) is True
    assert check_revocation(unrevoked, current) is False
    with pytest.raises(KeyRejected, match=r"^this is another key \("):
        check_revocation(alice.public, current)
    with pytest.raises(KeyRejected, match="not an OpenPGP public key"):
        check_revocation(b"garbage", current)


def _is_key_revocation(packet: ListedPacket) -> bool:
    return packet.tag == _SIGNATURE and packet.sigclass == 0x20


# -- the packet-level stripper ----------------------------------------------------------------


def test_signature_without_issuer_is_dropped(alice: TestKey) -> None:
    binary = dearmor(alice.public)
    listed = list_packets(binary)
    creation = b"\x05\x02" + int(time.time()).to_bytes(4, "big")
    body = b"\x04\x10\x16\x08" + len(creation).to_bytes(2, "big") + creation + b"\x00\x00"
    body += b"\x12\x34" + b"\x00\x08\xff"  # hash prefix and a token MPI: never verified here
    anonymous = bytes([0x88, len(body)]) + body
    assert parse_signature(body) is not None
    spliced = listed[0].raw + listed[1].raw + anonymous + b"".join(p.raw for p in listed[2:])
    stripped = strip_key(spliced)
    assert stripped.data == binary and stripped.dropped_signatures == 1


@settings(max_examples=60, deadline=None)
@given(drop=st.sets(st.integers(min_value=0, max_value=300)))
def test_stripper_keeps_exactly_the_self_signatures(
    photo_key: TestKey, flooded_photo: bytes, drop: set[int]
) -> None:
    """Whatever subset of signatures an upload carries, the stripper keeps each self-signature
    and no third-party one; photo IDs go with their signatures."""
    listed = list_packets(flooded_photo)
    own = openpgp.key_id(photo_key.fingerprint)
    chosen = [p for i, p in enumerate(listed) if p.tag != _SIGNATURE or i not in drop]
    expected: list[bytes] = []
    in_attribute = False
    for packet in chosen:
        if packet.tag == _SIGNATURE:
            if packet.issuer == own and not in_attribute:
                expected.append(packet.raw)
            continue
        in_attribute = packet.tag == _USER_ATTRIBUTE
        if not in_attribute:
            expected.append(packet.raw)
    stripped = strip_key(b"".join(p.raw for p in chosen))
    assert isinstance(stripped, StrippedKey)
    assert stripped.fingerprint == photo_key.fingerprint
    assert stripped.data == b"".join(expected)


# -- hostile input ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_stripper_only_raises_unfit_key(data: bytes) -> None:
    with contextlib.suppress(UnfitKey):
        strip_key(data)


@settings(max_examples=200, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1))
def test_stripper_on_mutated_flood_only_raises_unfit_key(
    flooded_photo: bytes, edits: list[tuple[int, int]]
) -> None:
    mutated = bytearray(flooded_photo)
    for index, value in edits:
        mutated[index % len(mutated)] = value
    with contextlib.suppress(UnfitKey):
        strip_key(bytes(mutated))


@_GPG_EXAMPLES
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=400).map(lambda b: b"\x99" + b),  # looks like an old-format key
        st.text(max_size=300).map(
            lambda t: (
                b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n"
                + t.encode()
                + b"\n-----END PGP PUBLIC KEY BLOCK-----\n"
            )
        ),
    )
)
def test_random_bytes_only_raise_key_rejected(data: bytes) -> None:
    with pytest.raises(KeyRejected):
        validate_key(data, address="x@example.test", require_uid=True)
    assert looks_like_revocation(data) in (True, False)


@_GPG_EXAMPLES
@given(cut=st.integers(min_value=0))
def test_truncated_keys_only_raise_key_rejected(alice: TestKey, cut: int) -> None:
    binary = dearmor(alice.public)
    for data in (binary[: cut % len(binary)], alice.public[: cut % len(alice.public)]):
        with pytest.raises(KeyRejected):
            validate_key(data)


@_GPG_EXAMPLES
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1))
def test_mutated_keys_validate_or_raise_key_rejected(
    alice: TestKey, edits: list[tuple[int, int]]
) -> None:
    mutated = bytearray(dearmor(alice.public))
    for index, value in edits:
        mutated[index % len(mutated)] = value
    try:
        validated = validate_key(bytes(mutated))
    except KeyRejected:
        return
    # A change gpg does not care about (an unhashed subpacket, say): still alice's key.
    assert validated.key.fingerprint == alice.fingerprint


@_GPG_EXAMPLES
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1))
def test_mutated_revocations_only_raise_key_rejected(
    revocable: tuple[TestKey, bytes], edits: list[tuple[int, int]]
) -> None:
    key, certificate = revocable
    current = validate_key(key.public).key
    mutated = bytearray(dearmor(certificate))
    for index, value in edits:
        mutated[index % len(mutated)] = value
    with contextlib.suppress(KeyRejected):
        check_revocation(bytes(mutated), current)
