"""The stored PGP/MIME copy of a raw message for one recipient.

The filter (``filter.py``) and the at-rest command (``gpgfilter.mailbox``) must store exactly the
same thing for the same message and key, so both call this: whatever the engine, its output
passes the same check (``openpgp.check``) and is wrapped in the same RFC 3156 assembly
(``pgpmime``). Throttling, metrics and policy stay with the callers.
"""

from __future__ import annotations

import asyncio
import time

from gpgfilter.mail import pgpmime, protect
from gpgfilter.mail.rawmessage import RawMessage
from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.engine import Engine, Plaintext, Recipient
from keystore.model import AddressKeys, HeaderProtection, StoredKey


def recipient_for(keys: list[StoredKey]) -> Recipient | None:
    """Every key of the address that can encrypt now, with all of its usable (sub)keys."""
    now = time.time()
    usable = [(key, key.usable_encryption_keys(now)) for key in keys]
    usable = [(key, fingerprints) for key, fingerprints in usable if fingerprints]
    if not usable:
        return None
    return Recipient(
        key_data=b"".join(key.key_data for key, _ in usable),
        encryption_keys=tuple(f for _, fingerprints in usable for f in fingerprints),
    )


def protection_for(keys: list[StoredKey], default: HeaderProtection) -> HeaderProtection:
    """The address's own header protection choice, or the admin's default."""
    chosen = keys.settings.header_protection if isinstance(keys, AddressKeys) else None
    return chosen or default


async def encrypt_checked(
    engine: Engine, inner: Plaintext, recipient: Recipient, *, timeout: float
) -> bytes:
    """The engine's armored ciphertext of ``inner``, bounded in time and read back: never
    trust an engine's word (raises EngineError or TimeoutError)."""
    async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
        armored = await engine.encrypt(inner, recipient)
    check_ciphertext(armored, recipient)
    return armored


def assemble(message: RawMessage, armored: bytes, *, outer: bytes | None = None) -> list[bytes]:
    """The message as it is stored: ``armored`` inside the outer header fields — the
    original's, or ``outer`` where header protection changed them (``protect.Layout``)."""
    return pgpmime.assemble(message, armored, outer=outer)


async def stored_copy(
    message: RawMessage,
    recipient: Recipient,
    engine: Engine,
    *,
    timeout: float,
    protection: HeaderProtection = "off",
) -> list[bytes]:
    """What the filter would have stored for ``message`` and ``recipient`` with the address's
    header protection, in pieces."""
    layout = protect.layout(message, protection)
    armored = await encrypt_checked(engine, layout.inner, recipient, timeout=timeout)
    return assemble(message, armored, outer=layout.outer)
