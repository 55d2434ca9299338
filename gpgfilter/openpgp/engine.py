"""The engine seam: what the filter, the challenge mailer and WKS ask of an OpenPGP engine.

Everything that encrypts sees only :class:`Engine`, so an engine can be swapped for a cheaper
one without touching anything else; :func:`gpgfilter.openpgp.factory.make_engine` is the one
place an engine is chosen, and every engine's output goes through the same check
(:func:`gpgfilter.openpgp.check.check_ciphertext`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

EngineName = Literal["sequoia", "gnupg"]
"""The engines that can serve a recipient, as the metrics and ``doctor`` name them."""


class EngineError(Exception):
    """Encryption failed or produced something we will not deliver. Never carries plaintext."""


@dataclass(frozen=True, slots=True)
class Recipient:
    """What an engine needs to encrypt to one mailbox owner."""

    key_data: bytes  # the owner's transferable public key(s), binary
    encryption_keys: tuple[str, ...]  # fingerprints of the (sub)keys to encrypt to, all of them


Plaintext = bytes | Sequence[bytes | memoryview]
"""What an engine encrypts: the bytes, or pieces to be taken as one (no need to join a large
message just to hand it over)."""


def pieces(plaintext: Plaintext) -> Sequence[bytes | memoryview]:
    return (plaintext,) if isinstance(plaintext, bytes) else plaintext


class Engine(Protocol):
    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        """Return an ASCII-armored OpenPGP message readable with exactly the recipient's keys."""
        ...
