"""Deciding whether a message is already encrypted — by its structure, never by a text search.

Only three shapes pass through untouched; a look-alike that passed would be stored in clear:

- PGP/MIME (RFC 3156): ``multipart/encrypted; protocol="application/pgp-encrypted"`` with exactly
  two parts, the second an armored OpenPGP *encrypted message* (session-key packets followed by
  one encrypted-data packet), and nothing of substance around them;
- inline PGP: a ``text/plain`` message whose decoded text is nothing but one such armored message;
- S/MIME ``application/(x-)pkcs7-mime`` whose DER content type is enveloped-data or
  authEnveloped-data (a label claiming so is not enough: signed-data carries the content in clear).

Anything else — labels around plaintext, armored blocks amid text, encrypted attachments,
forwarded encrypted messages, marker headers — is treated as clear text and gets encrypted.
"""

from __future__ import annotations

import binascii
import enum

from gpgfilter.mail.rawmessage import (
    RawMessage,
    content_type,
    multipart_parts,
    split,
    transfer_encoding,
)
from keystore import packets as openpgp

# Room for the customary one-line notice ("This is an OpenPGP/MIME encrypted message") around
# the parts of a PGP/MIME message; more text than this would be stored in clear.
MAX_NOTICE_BYTES = 512

# DER encodings of the CMS content type OIDs (RFC 5652, RFC 5083).
_OID_ENVELOPED = bytes.fromhex("2a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_AUTH_ENVELOPED = bytes.fromhex("2a864886f70d0109100117")  # 1.2.840.113549.1.9.16.1.23
_SMIME_TYPES = frozenset({"enveloped-data", "authenveloped-data"})


class Verdict(enum.Enum):
    CLEAR = "clear"
    PGP_MIME = "pgp-mime"
    INLINE_PGP = "inline-pgp"
    SMIME = "smime"

    @property
    def already_encrypted(self) -> bool:
        return self is not Verdict.CLEAR


def classify(message: RawMessage) -> Verdict:
    ctype = content_type(message)
    if ctype is None:
        if message.all("content-type"):
            return Verdict.CLEAR  # repeated Content-Type: ambiguous, so never trusted
        return Verdict.INLINE_PGP if _is_inline_pgp(message) else Verdict.CLEAR
    mimetype = ctype.mimetype
    if mimetype == "multipart/encrypted":
        return Verdict.PGP_MIME if _is_pgp_mime(message, ctype.params) else Verdict.CLEAR
    if mimetype == "text/plain":
        return Verdict.INLINE_PGP if _is_inline_pgp(message) else Verdict.CLEAR
    if mimetype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        return Verdict.SMIME if _is_smime_enveloped(message, ctype.params) else Verdict.CLEAR
    return Verdict.CLEAR


def _is_pgp_mime(message: RawMessage, params: dict[str, str]) -> bool:
    if params.get("protocol", "").lower() != "application/pgp-encrypted":
        return False
    boundary = params.get("boundary")
    if not boundary:
        return False
    cut = multipart_parts(message.body, boundary)
    if cut is None:
        return False
    preamble, parts, epilogue, _closed = cut
    if len(parts) != 2:
        return False
    if len(preamble.strip()) > MAX_NOTICE_BYTES or len(epilogue.strip()) > MAX_NOTICE_BYTES:
        return False
    control, payload = (split(part) for part in parts)
    control_type = content_type(control)
    payload_type = content_type(payload)
    if control_type is None or control_type.mimetype != "application/pgp-encrypted":
        return False
    if control.body.strip().lower() != b"version: 1":
        return False  # the control part is a version line, not a place for text
    if payload_type is None or payload_type.mimetype != "application/octet-stream":
        return False
    return _is_only_armored_message(_decoded_body(payload))


def _is_inline_pgp(message: RawMessage) -> bool:
    return _is_only_armored_message(_decoded_body(message))


def _decoded_body(message: RawMessage) -> bytes | None:
    """The body with its transfer encoding undone; None when it cannot be undone."""
    encoding = transfer_encoding(message)
    try:
        if encoding == "base64":
            return binascii.a2b_base64(message.body)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(message.body)
    except binascii.Error:
        return None
    if encoding in ("7bit", "8bit", "binary"):
        return message.body
    return None


def _is_only_armored_message(text: bytes | None) -> bool:
    if text is None:
        return False
    armored = openpgp.find_armor(text)
    if armored is None or armored.label != "MESSAGE":
        return False
    if armored.before.strip() or armored.after.strip():
        return False
    return openpgp.is_encrypted_message(armored.data)


def _is_smime_enveloped(message: RawMessage, params: dict[str, str]) -> bool:
    label = params.get("smime-type", "").lower()
    if label and label not in _SMIME_TYPES:
        return False
    der = _decoded_body(message)
    return der is not None and _der_content_type(der) in (_OID_ENVELOPED, _OID_AUTH_ENVELOPED)


def _der_content_type(der: bytes) -> bytes | None:
    """The OID of a CMS ContentInfo: SEQUENCE { contentType OBJECT IDENTIFIER, ... }."""
    if len(der) < 4 or der[0] != 0x30:
        return None
    pos = _skip_der_length(der, 1)
    if pos is None or pos >= len(der) or der[pos] != 0x06:
        return None
    oid_len_pos = pos + 1
    if oid_len_pos >= len(der):
        return None
    oid_len = der[oid_len_pos]
    if oid_len & 0x80:
        return None  # OIDs this short never use the long form
    start = oid_len_pos + 1
    return der[start : start + oid_len] if start + oid_len <= len(der) else None


def _skip_der_length(der: bytes, pos: int) -> int | None:
    if pos >= len(der):
        return None
    first = der[pos]
    if first < 0x80:
        return pos + 1
    if first == 0x80:
        return pos + 1  # indefinite length (BER), as some S/MIME agents write
    count = first & 0x7F
    return pos + 1 + count if pos + 1 + count <= len(der) else None
