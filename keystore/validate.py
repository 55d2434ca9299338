"""Validating and minimising a public key before it enters the registry.

gpg is the judge of validity (self-signatures, expiry, revocation): PGPy does not check them.
What we store is gpg's own minimal export of the key — primary key, valid subkeys, the user IDs
of the bound address(es) with their newest self-signatures — so certificate floods and stale
subkeys never reach the mail path.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import gnupg

from gpgfilter import openpgp
from gpgfilter.engine import GPG_OPTIONS
from keystore.model import EncryptionKey, StoredKey

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 8 * 1024 * 1024
_UNUSABLE_VALIDITY = {"e": "has expired", "r": "is revoked", "i": "is invalid"}


class KeyRejected(ValueError):
    """The upload is not a key we can register; the message says precisely why."""


class KeyRevoked(KeyRejected):
    """A revoked key: useless for new registrations, but news for a registered one."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__("the key is revoked")
        self.fingerprint = fingerprint


@dataclass(frozen=True, slots=True)
class ValidatedKey:
    key: StoredKey
    addresses: tuple[str, ...]


def validate_key(
    data: bytes, *, address: str | None = None, gpg_binary: str = "gpg"
) -> ValidatedKey:
    """Check ``data`` is exactly one usable public v4 key and return its minimal form.

    With ``address`` the key is bound to that address even without a matching user ID (an
    administrator's explicit binding); otherwise it is bound to the addresses of its user IDs.
    """
    if len(data) > MAX_KEY_BYTES:
        raise KeyRejected(f"key file is larger than {MAX_KEY_BYTES} bytes")
    _check_packets(decode_keyblock(data))
    wanted = address.strip().lower() if address else None
    with tempfile.TemporaryDirectory(prefix="gpgfilter-key-") as tmp:
        first = _Homedir(Path(tmp) / "in", gpg_binary)
        imported = first.gpg.import_keys(
            data,
            extra_args=["--import-options", "import-clean,self-sigs-only"],
        )
        listing = first.gpg.list_keys()
        if not imported.fingerprints or len(listing) != 1:
            raise KeyRejected("gpg could not import the key (no valid self-signed user ID?)")
        uid_addresses = _uid_addresses(listing[0])
        if wanted and wanted in uid_addresses:
            keep = [wanted]
        elif wanted:
            keep = []  # explicit binding: keep the key's own user IDs as they are
        else:
            keep = uid_addresses
            if not keep:
                raise KeyRejected("the key has no user ID with an e-mail address; name one")
        minimal = first.export_minimal(listing[0]["fingerprint"], keep)
        second = _Homedir(Path(tmp) / "out", gpg_binary)
        second.gpg.import_keys(minimal)
        final = second.gpg.list_keys()
    if len(final) != 1:
        raise KeyRejected("gpg could not re-read the minimised key")
    key = _stored_key(final[0], minimal)
    return ValidatedKey(key, (wanted,) if wanted else tuple(keep))


def decode_keyblock(data: bytes) -> bytes:
    """The binary packets of a key given armored or binary; refuses secret key blocks."""
    if data[:1] and data[0] & 0x80:
        return data
    blocks: list[bytes] = []
    rest = data
    while (armored := openpgp.find_armor(rest)) is not None:
        if armored.label == "PRIVATE KEY BLOCK":
            raise KeyRejected("this is a secret key: export and upload the public key only")
        if armored.label != "PUBLIC KEY BLOCK":
            raise KeyRejected(f"expected a public key block, found a PGP {armored.label}")
        blocks.append(armored.data)
        rest = armored.after
    if not blocks:
        raise KeyRejected("not an OpenPGP public key (neither armored nor binary)")
    return b"".join(blocks)


def _check_packets(binary: bytes) -> None:
    try:
        packets = list(openpgp.iter_packets(binary))
    except openpgp.PacketError as error:
        raise KeyRejected(f"malformed OpenPGP data: {error}") from None
    if any(p.tag in (openpgp.TAG_SECRET_KEY, openpgp.TAG_SECRET_SUBKEY) for p in packets):
        raise KeyRejected("this is a secret key: export and upload the public key only")
    primaries = [p for p in packets if p.tag == openpgp.TAG_PUBLIC_KEY]
    if not primaries:
        raise KeyRejected("no public key in the data")
    if len(primaries) > 1:
        raise KeyRejected(f"expected exactly one public key, found {len(primaries)}")
    version = primaries[0].head[:1]
    if version == b"\x06":
        raise KeyRejected("v6 keys (RFC 9580) cannot be read by today's mail clients: use a v4 key")
    if version != b"\x04":
        raise KeyRejected("only OpenPGP v4 keys are supported")


def _uid_addresses(listed: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for uid in listed.get("uids", []):
        address = parseaddr(uid)[1].strip().lower()
        if "@" in address and address not in found:
            found.append(address)
    return found


def _stored_key(listed: dict[str, Any], minimal: bytes) -> StoredKey:
    fingerprint = listed["fingerprint"]
    validity = listed.get("trust", "")
    if validity == "r":
        raise KeyRevoked(fingerprint)
    if validity in _UNUSABLE_VALIDITY:
        raise KeyRejected(f"the key {_UNUSABLE_VALIDITY[validity]}")
    if "E" not in listed.get("cap", ""):
        raise KeyRejected("the key has no valid encryption key or subkey")
    keys: list[EncryptionKey] = []
    if "e" in listed.get("cap", ""):
        keys.append(EncryptionKey(fingerprint, _epoch(listed.get("expires", ""))))
    info = listed.get("subkey_info", {})
    for keyid, _type, sub_fpr, _grip in listed.get("subkeys", []):
        details = info.get(keyid, {})
        if "e" in details.get("cap", "") and details.get("trust", "") not in _UNUSABLE_VALIDITY:
            keys.append(EncryptionKey(sub_fpr, _epoch(details.get("expires", ""))))
    stored = StoredKey(
        fingerprint=fingerprint,
        key_data=minimal,
        expires=_epoch(listed.get("expires", "")),
        encryption_keys=tuple(keys),
        user_ids=tuple(listed.get("uids", [])),
    )
    if not stored.usable_encryption_keys():
        raise KeyRejected("the key has no encryption key that is valid now")
    return stored


def _epoch(value: str) -> int | None:
    return int(value) if value else None


class _Homedir:
    """A throw-away gpg home for one validation step."""

    def __init__(self, path: Path, gpg_binary: str) -> None:
        path.mkdir(mode=0o700)
        self.path = path
        self.binary = gpg_binary
        self.gpg = gnupg.GPG(gpgbinary=gpg_binary, gnupghome=str(path), options=GPG_OPTIONS)
        # gpg lists user IDs in UTF-8; python-gnupg's default (latin-1) would garble a
        # non-ASCII address, which then matches no user ID when the key is minimised.
        self.gpg.encoding = "utf-8"

    def export_minimal(self, fingerprint: str, addresses: list[str]) -> bytes:
        command = [
            self.binary,
            "--homedir",
            str(self.path),
            "--batch",
            *GPG_OPTIONS,
            "--export-options",
            "export-minimal,export-clean",
            # gpg 2.2 has this filter for export only, hence the second home.
            "--export-filter",
            "drop-subkey=expired -t || revoked -t",
        ]
        if addresses:
            command += [
                "--export-filter",
                "keep-uid=" + " || ".join(f"mbox = {a}" for a in addresses),
            ]
        done = subprocess.run(
            [*command, "--export", fingerprint], capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0 or not done.stdout:
            raise KeyRejected("gpg could not export the minimised key")
        return done.stdout
