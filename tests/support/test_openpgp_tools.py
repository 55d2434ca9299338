"""The test helpers themselves: keys have the properties claimed, decryptors are faithful.

Ciphertexts here are made by plain ``gpg --encrypt``, never by product code, so a failure points
at the helpers (or the tools), not at the filter.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.openpgp_tools import (
    KeyFactory,
    TestKey,
    ToolError,
    decrypt_all,
    decrypt_gpg,
    decrypt_rnp,
    decrypt_sq,
    literal_format,
    packet_recipients,
    packet_versions,
)

DECRYPTORS = [decrypt_gpg, decrypt_sq, decrypt_rnp, decrypt_all]


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyFactory]:
    with KeyFactory(tmp_path_factory.mktemp("tool-keys")) as made:
        yield made


@pytest.fixture(scope="module")
def carol(factory: KeyFactory) -> TestKey:
    return factory.make("carol@example.test")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty gpg homedir for dry-run imports and packet listings."""
    home = tmp_path_factory.mktemp("scratch")
    home.chmod(0o700)
    yield home
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, timeout=30)


def gpg_encrypt(key: TestKey, plaintext: bytes, recipient: str | None = None, *extra: str) -> bytes:
    """Plain gpg encryption. A bare primary fingerprint lets gpg pick the encryption subkey;
    ``FPR!`` would force the (sign-only) primary itself and fail."""
    argv = ["gpg", "--homedir", str(key.home), "--batch", "--no-tty", "--trust-model", "always"]
    argv += ["--armor", "--encrypt", "--recipient", recipient or key.fingerprint, *extra]
    proc = subprocess.run(argv, input=plaintext, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def colons(home: Path, *args: str, data: bytes = b"") -> list[list[str]]:
    argv = ["gpg", "--homedir", str(home), "--batch", "--with-colons", "--fixed-list-mode", *args]
    proc = subprocess.run(argv, input=data, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return [line.split(":") for line in proc.stdout.decode().splitlines()]


PAYLOADS = {
    "crlf": b"Content-Type: text/plain\r\n\r\nline one\r\nline two\r\n",
    "bare-lf": b"Content-Type: text/plain\n\nline one\nline two\n",
    "mixed-and-lone-cr": b"a\r\nb\nc\rd\r\n\r\n.\r\n",
    "nul": b"\x00\x00head\x00tail\x00",
    "8bit": "Grüße, 日本語, \u00e9\n".encode() + bytes(range(128, 256)),
    "all-bytes": bytes(range(256)) * 64,
    "no-final-newline": b"From nobody\r\nend",
}


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_three_implementations_return_the_exact_bytes(carol: TestKey, payload: bytes) -> None:
    armored = gpg_encrypt(carol, payload)
    assert decrypt_all(carol, armored) == payload
    assert packet_recipients(armored) == {carol.encryption_subkeys[0][-16:]}
    assert packet_versions(armored) == ({3}, {1})


def test_rsa_key_round_trip(factory: KeyFactory) -> None:
    rsa = factory.make("rsa@example.test", algo="rsa2048", name="Rsa User", expires="1y")
    pub = next(r for r in colons(rsa.home, "--list-keys") if r[0] == "pub")
    assert (pub[3], pub[2]) == ("1", "2048")  # RSA, 2048 bits
    assert pub[6], "expiry date set"
    assert decrypt_all(rsa, gpg_encrypt(rsa, PAYLOADS["crlf"])) == PAYLOADS["crlf"]


def test_text_literal_is_reported_not_hidden(carol: TestKey) -> None:
    """gpg strips CRs from text-mode literals; decrypt_all must say so instead of passing."""
    armored = gpg_encrypt(carol, b"a\r\nb\r\n", None, "--textmode")
    assert literal_format(carol, armored) == "t"
    assert decrypt_sq(carol, armored) == decrypt_rnp(carol, armored) == b"a\r\nb\r\n"
    assert decrypt_gpg(carol, armored) == b"a\nb\n"
    with pytest.raises(AssertionError, match="literal format 't'"):
        decrypt_all(carol, armored)
    assert literal_format(carol, gpg_encrypt(carol, b"x")) == "b"


@pytest.mark.parametrize("decrypt", DECRYPTORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "junk",
    [b"garbage\n", b"-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----\n", b""],
    ids=["text", "bad-armor", "empty"],
)
def test_decrypting_garbage_raises(
    carol: TestKey, decrypt: Callable[[TestKey, bytes], bytes], junk: bytes
) -> None:
    with pytest.raises(ToolError) as info:
        decrypt(carol, junk)
    assert info.value.argv, "the failing command is named"


@pytest.mark.parametrize("decrypt", DECRYPTORS, ids=lambda f: f.__name__)
def test_message_for_another_key_raises(
    factory: KeyFactory, carol: TestKey, decrypt: Callable[[TestKey, bytes], bytes]
) -> None:
    other = factory.make("other@example.test")
    with pytest.raises(ToolError, match=r"\S"):
        decrypt(carol, gpg_encrypt(other, b"not for carol"))


def test_tampered_message_raises(carol: TestKey) -> None:
    armored = gpg_encrypt(carol, b"x" * 2000, None, "-z", "0")
    binary = subprocess.run(
        ["gpg", "--dearmor"], input=armored, capture_output=True, timeout=30, check=True
    ).stdout
    flipped = bytearray(binary)
    flipped[-40] ^= 0x01  # inside the SEIPD body: the MDC no longer matches
    for decrypt in DECRYPTORS:
        with pytest.raises(ToolError):
            decrypt(carol, bytes(flipped))


def test_packet_versions_sees_rfc9580_packets(carol: TestKey) -> None:
    """sq 0.27 cannot parse PKESK v6 / SEIPD v2; the version octet must still come back."""
    armored = gpg_encrypt(carol, b"hello", None, "-z", "0")
    binary = subprocess.run(
        ["gpg", "--dearmor"], input=armored, capture_output=True, timeout=30, check=True
    ).stdout
    assert binary[0] == 0x84 and binary[2] == 3  # old-format PKESK, one-octet length, v3
    seipd_at = 2 + binary[1]
    assert binary[seipd_at] & 0x3F == 18 and binary[seipd_at + 2] == 1
    v2 = bytearray(binary)
    v2[seipd_at + 2] = 2
    assert packet_versions(bytes(v2)) == ({3}, {2})
    v6 = bytearray(binary)
    v6[2] = 6
    assert packet_versions(bytes(v6)) == ({6}, {1})
    with pytest.raises(ValueError, match="cannot parse"):
        packet_recipients(bytes(v6))


def test_packet_recipients_lists_every_pkesk(factory: KeyFactory, carol: TestKey) -> None:
    dan = factory.make("dan@example.test")
    (carol.home / "dan.asc").write_bytes(dan.public)
    armored = gpg_encrypt(carol, b"two", None, "--recipient-file", str(carol.home / "dan.asc"))
    expected = {carol.encryption_subkeys[0][-16:], dan.encryption_subkeys[0][-16:]}
    assert packet_recipients(armored) == expected
    assert decrypt_all(dan, armored) == decrypt_all(carol, armored) == b"two"


# -- key variants: gpg's own verdict on each ----------------------------------------------------

# method, pub validity, can the key as a whole encrypt (capital E), validity of each subkey,
# index into the subkeys of the one(s) gpg considers usable for encryption.
VARIANTS = [
    ("make", "u", True, "u", (0,)),
    ("make_expired", "e", False, "e", ()),
    ("make_with_expired_encryption_subkey", "u", False, "e", ()),
    ("make_with_two_encryption_subkeys", "u", True, "uu", (0, 1)),
    ("make_with_old_expired_and_new_valid_subkey", "u", True, "eu", (1,)),
    ("make_revoked", "r", False, "r", ()),
    ("make_with_revoked_subkey_and_new_valid", "u", True, "ru", (1,)),
    ("make_sign_only", "u", False, "", ()),
]


@pytest.mark.parametrize(
    ("method", "validity", "encrypts", "sub_validity", "usable"),
    VARIANTS,
    ids=[v[0] for v in VARIANTS],
)
def test_variant_has_the_claimed_properties(
    factory: KeyFactory,
    scratch: Path,
    method: str,
    validity: str,
    encrypts: bool,
    sub_validity: str,
    usable: tuple[int, ...],
) -> None:
    address = f"{method.replace('_', '-')}@example.test"
    key: TestKey = getattr(factory, method)(address)
    records = colons(key.home, "--list-keys")
    pub = next(r for r in records if r[0] == "pub")
    subs = [r for r in records if r[0] == "sub"]
    sub_fprs = [b[9] for a, b in itertools.pairwise(records) if a[0] == "sub"]
    assert re.fullmatch(r"[0-9A-F]{40}", key.fingerprint)
    assert pub[1] == validity
    assert ("E" in pub[11]) is encrypts
    assert "".join(s[1] for s in subs) == sub_validity
    assert all("e" in s[11] for s in subs)
    assert key.encryption_subkeys == tuple(sub_fprs[i] for i in usable)
    assert key.public.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert key.secret.startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----")

    # What a fresh consumer of the exported public key sees (a dry-run import, no trust).
    shown = colons(scratch, "--import-options", "show-only", "--import", data=key.public)
    shown_pub = next(r for r in shown if r[0] == "pub")
    assert ("E" in shown_pub[11]) is encrypts
    if validity in "er":
        assert shown_pub[1] == validity

    # gpg's behaviour matches the claim: it refuses, or it picks the newest usable subkey.
    argv = ["gpg", "--homedir", str(key.home), "--batch", "--trust-model", "always"]
    argv += ["--armor", "--encrypt", "--recipient", key.fingerprint]
    proc = subprocess.run(argv, input=b"probe", capture_output=True, timeout=60, check=False)
    if not encrypts:
        assert proc.returncode != 0
        return
    assert proc.returncode == 0, proc.stderr.decode()
    assert packet_recipients(proc.stdout) == {key.encryption_subkeys[-1][-16:]}
    assert decrypt_all(key, proc.stdout) == b"probe"


def test_each_of_two_subkeys_decrypts_everywhere(factory: KeyFactory) -> None:
    key = factory.make_with_two_encryption_subkeys("both@example.test")
    assert len(key.encryption_subkeys) == 2
    for sub in key.encryption_subkeys:
        armored = gpg_encrypt(key, sub.encode(), f"{sub}!")
        assert packet_recipients(armored) == {sub[-16:]}
        assert decrypt_all(key, armored) == sub.encode()


def test_multi_uid_key(factory: KeyFactory) -> None:
    addresses = ["first@example.test", "second@other.test", "third@example.test"]
    key = factory.make_multi_uid(addresses)
    assert key.address == addresses[0]
    uids = [r[9] for r in colons(key.home, "--list-keys") if r[0] == "uid"]
    assert sorted(uids) == sorted(f"Test User <{a}>" for a in addresses)
    for address in addresses:
        armored = gpg_encrypt(key, b"m", address)
        assert decrypt_all(key, armored) == b"m"


def test_flooded_key_carries_the_signatures(
    factory: KeyFactory, carol: TestKey, scratch: Path
) -> None:
    started = time.perf_counter()
    flooded = factory.flooded(carol, count=1500)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"flooding took {elapsed:.1f} s"
    assert flooded.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    listing = subprocess.run(
        ["gpg", "--homedir", str(scratch), "--batch", "--list-packets"],
        input=flooded,
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout.decode()
    issuers = re.findall(r"keyid ([0-9A-F]{16})\n\tversion 4, .*sigclass 0x10\n", listing)
    assert len(issuers) >= 1500
    assert carol.fingerprint[-16:] not in issuers
    assert len(set(issuers)) == 25
    # Still the same, usable key to gpg.
    shown = colons(scratch, "--import-options", "show-only", "--import", data=flooded)
    pub = next(r for r in shown if r[0] == "pub")
    assert "E" in pub[11]
    assert next(r for r in shown if r[0] == "fpr")[9] == carol.fingerprint


def test_close_stops_agents(tmp_path: Path) -> None:
    with KeyFactory(tmp_path / "k") as made:
        key = made.make("agent@example.test")
        decrypt_gpg(key, gpg_encrypt(key, b"start the agent"))
        assert (key.home / "S.gpg-agent").exists()
    deadline = time.monotonic() + 5
    while (key.home / "S.gpg-agent").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (key.home / "S.gpg-agent").exists(), "gpg-agent still running after close()"
