"""TEMPORARY stand-ins for the extended ``keystore.validate`` API.

DELETE THIS MODULE once ``keystore.validate`` provides ``validate_key(data, *, address,
require_uid, min_valid_days, max_bytes, gpg_binary)``, ``looks_like_revocation`` and
``check_revocation``; then import those names from ``keystore.validate`` in
``keystore/registration.py`` (the only user). The signatures here are the agreed ones, so that
switch changes nothing else.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from email.utils import parseaddr
from pathlib import Path

from gpgfilter import openpgp
from gpgfilter.engine import GPG_OPTIONS
from keystore import validate as _validate
from keystore.model import StoredKey
from keystore.validate import KeyRejected, ValidatedKey, decode_keyblock

_TAG_SIGNATURE = 2
_SIG_KEY_REVOCATION = 0x20  # signature type of a primary key revocation


def validate_key(
    data: bytes,
    *,
    address: str | None = None,
    require_uid: bool = False,
    min_valid_days: int = 0,
    max_bytes: int = _validate.MAX_KEY_BYTES,
    gpg_binary: str = "gpg",
) -> ValidatedKey:
    if len(data) > max_bytes:
        raise KeyRejected(f"key file is larger than {max_bytes} bytes")
    validated = _validate.validate_key(data, address=address, gpg_binary=gpg_binary)
    key = validated.key
    if require_uid and address:
        wanted = address.strip().lower()
        if not any(parseaddr(uid)[1].strip().lower() == wanted for uid in key.user_ids):
            raise KeyRejected(f"the key has no user ID for {wanted}")
    if min_valid_days:
        horizon = time.time() + min_valid_days * 86400
        if not key.usable_encryption_keys(horizon):
            raise KeyRejected(f"the key can encrypt for less than {min_valid_days} more days")
    return validated


def looks_like_revocation(data: bytes) -> bool:
    """A bare key revocation signature (what ``gpg --gen-revoke`` writes), no key with it."""
    try:
        binary = decode_keyblock(data.replace(b"\n:-----BEGIN", b"\n-----BEGIN"))
        packets = list(openpgp.iter_packets(binary))
    except (KeyRejected, openpgp.PacketError):
        return False
    return bool(packets) and all(
        p.tag == _TAG_SIGNATURE
        and len(p.head) > 1
        and p.head[0] == 4
        and p.head[1] == _SIG_KEY_REVOCATION
        for p in packets
    )


def check_revocation(data: bytes, current: StoredKey) -> bool:
    """True when ``data`` (a revocation certificate or a revoked copy) validly revokes
    ``current``: gpg checks the signature against the stored key."""
    data = data.replace(b"\n:-----BEGIN", b"\n-----BEGIN")
    with tempfile.TemporaryDirectory(prefix="gpgfilter-rev-") as tmp:
        home = Path(tmp)
        home.chmod(0o700)
        base = ["gpg", "--homedir", str(home), "--batch", *GPG_OPTIONS]
        for blob in (current.key_data, data):
            subprocess.run(
                [*base, "--import"], input=blob, capture_output=True, timeout=60, check=False
            )
        listing = subprocess.run(
            [*base, "--with-colons", "--fixed-list-mode", "--list-keys", current.fingerprint],
            capture_output=True,
            timeout=60,
            check=False,
            text=True,
        )
    for line in listing.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            return fields[1] == "r"
    return False
