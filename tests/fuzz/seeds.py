"""Seed corpora for the fuzz targets, from real data: the message corpus and keys, revocations
and ciphertexts made by gpg.

A fuzzer that starts from real inputs reaches the deep branches (PGP/MIME structure, armor,
signature subpackets) at once instead of having to discover them byte by byte.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from keystore import packets as openpgp
from tests.support.openpgp_tools import KeyFactory, TestKey

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
TARGETS = ("split", "classify", "openpgp", "sanitize")
# Large seeds make every run slow; the parsers' interesting structure is at the start.
_MAX_SEED = 64 * 1024


def _gpg(key: TestKey, *args: str, data: bytes = b"") -> bytes:
    argv = ["gpg", "--homedir", str(key.home), "--batch", "--yes", "--trust-model", "always"]
    return subprocess.run([*argv, *args], input=data, capture_output=True, check=True).stdout


def _dearmor(armored: bytes) -> bytes:
    found = openpgp.find_armor(armored)
    if found is None:
        raise ValueError("no armor in gpg's output")
    return found.data


def _messages() -> list[bytes]:
    seeds = [path.read_bytes()[:_MAX_SEED] for path in sorted(CORPUS.glob("*.eml"))]
    # Shapes the parsers treat specially, so the fuzzer mutates them from the start.
    seeds.append(b"Content-Type: text/plain; name*0*=utf-8''%C3%A9; name*1=\"x;y\"\r\n\r\nhi\r\n")
    seeds.append(b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\n0\x80")
    return seeds


def _keys(factory: KeyFactory) -> tuple[list[bytes], list[bytes]]:
    """(key material, ciphertexts), armored and binary."""
    alice = factory.make("alice@example.test")
    bob = factory.make("bob@example.test", algo="rsa2048")
    two = factory.make_with_two_encryption_subkeys("two@example.test")
    revoked_sub = factory.make_with_revoked_subkey_and_new_valid("sub@example.test")
    photo = factory.make_with_photo("photo@example.test")
    multi = factory.make_multi_uid(["m1@example.test", "m2@example.test"])
    keys = [alice, bob, two, revoked_sub, photo, multi]
    material = [k.public for k in keys] + [_dearmor(k.public) for k in keys]
    revocation = factory.revocation_certificate(alice)
    material += [revocation, _dearmor(revocation.replace(b"\n:-----", b"\n-----"))]
    material.append(_dearmor(factory.flooded(alice, count=40, signers=4)))
    ciphertexts: list[bytes] = []
    for key in (alice, bob, two):
        ciphertexts.append(_gpg(key, "--encrypt", "-r", key.fingerprint, data=b"hello\r\n"))
    ciphertexts.append(
        _gpg(
            alice,
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "x",
            "--symmetric",
            data=b"hello",
        )
    )
    ciphertexts += [_gpg(alice, "--armor", "--encrypt", "-r", alice.fingerprint, data=b"x")]
    return material, ciphertexts


def build(root: Path, work: Path) -> dict[str, int]:
    """Write each target's seeds into ``root/<target>``; the number of seeds per target."""
    messages = _messages()
    with KeyFactory(work) as factory:
        keys, ciphertexts = _keys(factory)
    armored_in_mail = [
        found.data
        for raw in messages
        if (found := openpgp.find_armor(raw)) is not None and found.data
    ]
    packets = keys + ciphertexts + armored_in_mail
    seeds = {
        "split": messages,
        "classify": messages,
        "openpgp": packets + [m for m in messages if b"-----BEGIN PGP" in m],
        "sanitize": keys,
    }
    counts: dict[str, int] = {}
    for target in TARGETS:
        folder = root / target
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds[target]:
            name = hashlib.sha1(seed, usedforsecurity=False).hexdigest()
            (folder / name).write_bytes(seed)
        counts[target] = len(list(folder.iterdir()))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="where the per-target seed folders go")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for gpg homes")
    args = parser.parse_args()
    for target, count in build(args.root, args.work).items():
        print(f"{target}: {count} seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
