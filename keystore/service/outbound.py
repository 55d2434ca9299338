"""What the key service needs from the layer above it to send mail, named here so that the
registry never imports the filter: the process wiring (``gpgfilter.process.keyserver``) passes
in implementations built from the filter's own engine, output check, PGP/MIME assembly and
mail client.

Every mail the key service encrypts (challenges, WKS confirmation requests, notices) thus goes
through the same engine and the same check of its output as the filter's mail.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from keystore.model import StoredKey

Send = Callable[[str, list[str], bytes], Awaitable[None]]
"""How mail leaves: ``send(mail_from, recipients, data)``; raises OSError unless the relay
accepted it for every recipient."""


class EncryptionFailed(Exception):
    """The message could not be encrypted to the key; the text is safe to log (no content)."""


class Encryptor(Protocol):
    async def armor(self, plaintext: bytes, key: StoredKey) -> bytes:
        """``plaintext`` encrypted to exactly ``key``'s usable encryption (sub)keys, armored
        with CRLF line ends, the output checked; raises EncryptionFailed."""
        ...

    async def pgp_mime(self, header: bytes, entity: bytes, key: StoredKey) -> bytes:
        """A complete RFC 3156 message: ``header`` (CRLF-terminated fields) outside, the MIME
        ``entity`` encrypted to ``key`` inside; raises EncryptionFailed."""
        ...
