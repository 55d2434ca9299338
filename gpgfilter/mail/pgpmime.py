"""Assembling the RFC 3156 PGP/MIME message around a ciphertext.

The outer message is the original header block minus the fields that describe the body, then
exactly the RFC 3156 structure. Nothing else stands in clear: no preamble, no banner, and no
Content-Transfer-Encoding of the original (Thunderbird refuses to decrypt with one left over).
"""

from __future__ import annotations

import secrets

from gpgfilter.mail.rawmessage import CRLF, RawMessage, join_fields


def new_boundary() -> str:
    # "." and "_" never occur in base64 or in armor lines, so the boundary cannot collide.
    return f"gpgfilter.{secrets.token_hex(16)}_"


def assemble(
    message: RawMessage, armored: bytes, boundary: str | None = None, *, outer: bytes | None = None
) -> list[bytes]:
    """The encrypted message: outer header fields, RFC 3156 headers and body. ``outer``
    replaces the message's own outer fields when header protection changed them
    (``gpgfilter.mail.protect``).

    Returned in three pieces, each ending a line, so that a large ciphertext is not copied once
    more just to be joined to a few header lines.
    """
    mark = (boundary or new_boundary()).encode("ascii")
    if b"\r\n" not in armored:
        armored = armored.replace(b"\n", CRLF)
    if not armored.endswith(CRLF):
        armored += CRLF
    head = b"".join(
        (
            join_fields(message.outer_fields) if outer is None else outer,
            b"MIME-Version: 1.0\r\n",
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n',
            b' boundary="' + mark + b'"\r\n',
            CRLF,
            b"--" + mark + CRLF,
            b"Content-Type: application/pgp-encrypted\r\n",
            b"Content-Description: PGP/MIME version identification\r\n",
            CRLF,
            b"Version: 1\r\n",
            CRLF,
            b"--" + mark + CRLF,
            b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n',
            b"Content-Description: OpenPGP encrypted message\r\n",
            b'Content-Disposition: inline; filename="encrypted.asc"\r\n',
            CRLF,
        )
    )
    return [head, armored, CRLF + b"--" + mark + b"--" + CRLF]
