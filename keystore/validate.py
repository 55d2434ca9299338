"""Validating and minimising a public key before it enters the registry.

Uploads come from the internet, so every refusal is a ``KeyRejected`` whose message can be shown
to the uploader as is (it never quotes the data), and nothing is stored for a refused key.

The order matters for hostile input: the size cap comes before any parsing; then our own packet
framing cuts third-party certifications and photo IDs out (keystore.sanitize) so that no flood
reaches a slower parser; then gpg is the judge of validity (self-signatures, expiry,
revocation; PGPy checks none of them). What we store is gpg's own minimal export of the key —
primary key, its subkeys, the user IDs of the bound address(es) with their newest
self-signatures — so floods never reach the mail path. Revoked and expired subkeys stay in it,
with the signature that ended them: that memory is what lets ``merge_key`` refuse an old copy
that would bring them back (the filter encrypts only to ``encryption_keys``, never to them).
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from keystore import packets as openpgp
from keystore import sanitize
from keystore.gpg import GPG_OPTIONS
from keystore.gpgbound import BoundedGPG
from keystore.model import EncryptionKey, StoredKey

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 8 * 1024 * 1024  # the administrator's CLI; self-service passes a smaller cap
_MAX_REVOCATION_BYTES = 64 * 1024  # a revocation certificate is well under 2 KiB
_DAY = 86400
_UNUSABLE_VALIDITY = {"e": "has expired", "r": "is revoked", "i": "is invalid"}
_DEAD_UID = frozenset("eri")
_MASKED_ARMOR = re.compile(rb"^:(-----BEGIN PGP )", re.MULTILINE)


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


@dataclass(frozen=True, slots=True)
class MergedKey:
    """The stored key after an update: ``changed`` is False when the update added nothing
    (then ``key`` is the stored copy itself)."""

    key: StoredKey
    changed: bool


def validate_key(
    data: bytes,
    *,
    address: str | None = None,
    require_uid: bool = False,
    min_valid_days: int = 0,
    max_bytes: int = MAX_KEY_BYTES,
    gpg_binary: str = "gpg",
    now: float | None = None,
) -> ValidatedKey:
    """Check ``data`` is exactly one usable public v4 key and return its minimal form.

    With ``address`` the key is bound to that address even without a matching user ID (an
    administrator's explicit binding) unless ``require_uid`` (self-service: the key itself
    must name the address); without it, to the addresses of its user IDs. The key, and the
    encryption subkeys it would be used with, must stay valid for ``min_valid_days`` after
    ``now`` (gpg itself judges validity at the real time). Uploads over ``max_bytes`` are
    refused before any parsing.
    """
    moment = time.time() if now is None else now
    stripped = _strip(_read_upload(data, max_bytes))
    wanted = address.strip().lower() if address else None
    with tempfile.TemporaryDirectory(prefix="gpgfilter-key-") as tmp:
        first = _Homedir(Path(tmp) / "in", gpg_binary)
        first.gpg.import_keys(
            stripped.data,
            extra_args=["--import-options", "import-clean,self-sigs-only"],
        )
        listing = first.gpg.list_keys()
        if len(listing) != 1 or listing[0].get("fingerprint") != stripped.fingerprint:
            raise KeyRejected("gpg could not import the key (no valid self-signed user ID?)")
        uid_addresses = _uid_addresses(listing[0], listing.uid_map)
        if wanted and wanted in uid_addresses:
            keep = [wanted]
        elif wanted and require_uid:
            raise KeyRejected(f"the key has no user ID for {wanted}")
        elif wanted:
            keep = []  # explicit binding: keep the key's own user IDs as they are
        else:
            keep = uid_addresses
            if not keep:
                raise KeyRejected("the key has no user ID with an e-mail address; name one")
        minimal = first.export_minimal(stripped.fingerprint, keep)
        # The minimal copy is read back in a home of its own: what is stored is what counts.
        second = _Homedir(Path(tmp) / "out", gpg_binary)
        second.gpg.import_keys(minimal)
        final = second.gpg.list_keys()
    if len(final) != 1:
        raise KeyRejected("gpg could not re-read the minimised key")
    key = _stored_key(final[0], minimal, moment)
    _check_lifetime(key, moment, min_valid_days)
    if stripped.dropped_signatures or stripped.dropped_attributes:
        log.info(
            "key %s: dropped %d third-party signature(s) and %d user attribute(s)",
            stripped.fingerprint,
            stripped.dropped_signatures,
            stripped.dropped_attributes,
        )
    return ValidatedKey(key, (wanted,) if wanted else tuple(keep))


def merge_key(
    current: StoredKey,
    data: bytes,
    *,
    address: str | None = None,
    require_uid: bool = False,
    min_valid_days: int = 0,
    max_bytes: int = MAX_KEY_BYTES,
    gpg_binary: str = "gpg",
    now: float | None = None,
) -> MergedKey:
    """What gpg holds after importing ``data`` on top of the stored copy of the same key.

    A stored key only moves forward: gpg keeps every revocation and prefers the newest
    self-signature, so an old copy cannot undo a revocation, a subkey's end or a new expiry.
    Only signatures the key itself made are imported (``self-sigs-only``), so whatever changes
    was made by the key's holder. One more rule covers copies stored before revoked subkeys were
    kept: a subkey the stored copy does not know must be no older than the newest subkey it knows
    (a holder adds new subkeys; an old copy brings back old ones). ``changed`` is False when
    nothing moved; KeyRevoked when the merged key is revoked; KeyRejected when the update is
    another key or would leave a key that cannot be used (same checks as ``validate_key``).
    """
    moment = time.time() if now is None else now
    stripped = _strip(_read_upload(data, max_bytes))
    if stripped.fingerprint != current.fingerprint:
        raise KeyRejected(
            f"this is another key ({stripped.fingerprint}), not {current.fingerprint}"
        )
    wanted = address.strip().lower() if address else None
    with tempfile.TemporaryDirectory(prefix="gpgfilter-merge-") as tmp:
        home = _Homedir(Path(tmp) / "merge", gpg_binary)
        home.gpg.import_keys(current.key_data)
        before = home.gpg.list_keys()
        if len(before) != 1 or before[0].get("fingerprint") != current.fingerprint:
            raise KeyRejected("gpg could not read the stored copy of the key")
        baseline = home.export_minimal(current.fingerprint, _keep(before, wanted, require_uid))
        home.gpg.import_keys(
            stripped.data, extra_args=["--import-options", "import-clean,self-sigs-only"]
        )
        after = home.gpg.list_keys()
        minimal = home.export_minimal(current.fingerprint, _keep(after, wanted, require_uid))
        if minimal == baseline or _brings_back_old_subkeys(before[0], after[0]):
            return MergedKey(current, changed=False)
        second = _Homedir(Path(tmp) / "out", gpg_binary)
        second.gpg.import_keys(minimal)
        final = second.gpg.list_keys()
    if len(final) != 1:
        raise KeyRejected("gpg could not re-read the merged key")
    key = _stored_key(final[0], minimal, moment)
    _check_lifetime(key, moment, min_valid_days)
    return MergedKey(key, changed=True)


def _keep(listing: Any, wanted: str | None, require_uid: bool) -> list[str]:
    """The user IDs to keep in the minimal export, by the rules of ``validate_key``."""
    addresses = _uid_addresses(listing[0], listing.uid_map)
    if wanted and wanted in addresses:
        return [wanted]
    if wanted and require_uid:
        raise KeyRejected(f"the key has no user ID for {wanted}")
    return [] if wanted else addresses


def _brings_back_old_subkeys(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """True when the merge added a subkey created before the newest subkey already stored
    (creation times have a resolution of a second: a subkey of the same second is let in)."""
    known = {sub[2] for sub in before.get("subkeys", [])}
    newest = max(
        (int(sub.get("date") or 0) for sub in before.get("subkey_info", {}).values()), default=0
    )
    info = after.get("subkey_info", {})
    return any(
        fingerprint not in known and int(info.get(keyid, {}).get("date") or 0) < newest
        for keyid, _type, fingerprint, _grip in after.get("subkeys", [])
    )


def looks_like_revocation(data: bytes) -> bool:
    """True when ``data`` is just one key revocation signature, armored or binary (what
    ``gpg --gen-revoke`` writes). Cheap and without gpg, so a caller can route uploads; it
    proves nothing about the signature — ``check_revocation`` does."""
    if len(data) > _MAX_REVOCATION_BYTES:
        return False
    try:
        return sanitize.lone_revocation(decode_keyblock(_unmask(data))) is not None
    except (KeyRejected, sanitize.UnfitKey):
        return False


def check_revocation(
    data: bytes,
    current: StoredKey,
    *,
    max_bytes: int = MAX_KEY_BYTES,
    gpg_binary: str = "gpg",
) -> bool:
    """Does ``data`` revoke ``current``? gpg decides, so a forged signature is never believed.

    ``data`` is a revocation certificate or the full key carrying its revocation. The current
    key is imported into a throw-away home and the upload on top; True when gpg then lists the
    key as revoked. False when a full copy of the same key is not revoked (an ordinary upload,
    for ``validate_key``). KeyRejected, with the reason, for anything else: garbage, another
    key, another key's certificate, or a certificate whose signature does not verify.
    """
    if len(data) > max_bytes:
        raise KeyRejected(f"the upload is larger than {_size(max_bytes)}")
    binary = decode_keyblock(_unmask(data))
    try:
        certificate = sanitize.lone_revocation(binary)
    except sanitize.UnfitKey as error:
        raise KeyRejected(str(error)) from None
    options: list[str] = []
    if certificate is not None:
        if not certificate.claims_issuer(current.fingerprint):
            raise KeyRejected(
                f"this revocation certificate is for another key, not {current.fingerprint}"
            )
        upload = binary
    else:
        stripped = _strip(binary)
        if stripped.fingerprint != current.fingerprint:
            raise KeyRejected(
                f"this is another key ({stripped.fingerprint}), not {current.fingerprint}"
            )
        upload = stripped.data
        options = ["--import-options", "import-clean,self-sigs-only"]
    with tempfile.TemporaryDirectory(prefix="gpgfilter-rev-") as tmp:
        home = _Homedir(Path(tmp) / "home", gpg_binary)
        home.gpg.import_keys(current.key_data)
        home.gpg.import_keys(upload, extra_args=options)
        listing = home.gpg.list_keys()
    revoked = any(
        k.get("fingerprint") == current.fingerprint and k.get("trust") == "r" for k in listing
    )
    if certificate is not None and not revoked:
        raise KeyRejected(
            f"the revocation certificate does not verify against {current.fingerprint}"
        )
    return revoked


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
        if b"-----BEGIN PGP " in data:
            raise KeyRejected("the ASCII armor is damaged (bad base64 or no END line)")
        raise KeyRejected("not an OpenPGP public key (neither armored nor binary)")
    return b"".join(blocks)


def _read_upload(data: bytes, max_bytes: int) -> bytes:
    """The upload's binary packets, refusing oversized data before looking at it."""
    if len(data) > max_bytes:
        raise KeyRejected(f"the key file is larger than {_size(max_bytes)}")
    return decode_keyblock(data)


def _strip(binary: bytes) -> sanitize.StrippedKey:
    try:
        return sanitize.strip_key(binary)
    except sanitize.UnfitKey as error:
        raise KeyRejected(str(error)) from None


def _unmask(data: bytes) -> bytes:
    """gpg stores its revocation certificates with a ':' before the BEGIN line, so that they
    are not imported by accident; an upload is no accident."""
    return _MASKED_ARMOR.sub(rb"\1", data)


def _check_lifetime(key: StoredKey, moment: float, days: int) -> None:
    """Refuse a key that stops working within ``days``: mail would become unreadable soon
    after registration, with nobody told why."""
    if days <= 0:
        return
    horizon = moment + days * _DAY
    window = f"within {days} day{'s' if days != 1 else ''}"
    if key.expires is not None and key.expires <= horizon:
        raise KeyRejected(
            f"the key expires on {_date(key.expires)}, {window}:"
            " extend its expiry date and upload it again"
        )
    ends = [k.expires for k in key.encryption_keys if k.usable_at(moment)]
    if ends and all(end is not None and end <= horizon for end in ends):
        last = max(end for end in ends if end is not None)
        raise KeyRejected(
            f"its encryption subkey expires on {_date(last)}, {window}: extend its expiry"
            " date (or add a new encryption subkey) and upload the key again"
        )


def _date(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _size(count: int) -> str:
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= factor and count % factor == 0:
            return f"{count // factor} {unit}"
    return f"{count} bytes"


def _uid_addresses(listed: dict[str, Any], uid_map: dict[str, dict[str, str]]) -> list[str]:
    """Addresses of the user IDs gpg considers live: a revoked or expired one binds nothing.
    (A dead key marks all its user IDs dead; that verdict is the key's, reported later.)"""
    key_dead = listed.get("trust", "") in _DEAD_UID
    found: list[str] = []
    for uid in listed.get("uids", []):
        if not key_dead and uid_map.get(uid, {}).get("trust", "") in _DEAD_UID:
            continue
        address = parseaddr(uid)[1].strip().lower()
        if "@" in address and address not in found:
            found.append(address)
    return found


def _stored_key(listed: dict[str, Any], minimal: bytes, moment: float) -> StoredKey:
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
    if not stored.usable_encryption_keys(moment):
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
        self.gpg = BoundedGPG(gpgbinary=gpg_binary, gnupghome=str(path), options=GPG_OPTIONS)
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
