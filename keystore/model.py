"""What the registry knows about a key: enough to decide, at delivery time and without gpg,
whether it can be encrypted to now, and to which (sub)keys."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

# How much of a message's header the filter copies inside the encryption (RFC 9788):
# "off" encrypts the original entity byte for byte, "copy" also copies the header fields inside,
# "hide-subject" does that and leaves only "[...]" as the Subject outside.
HeaderProtection = Literal["off", "copy", "hide-subject"]
HEADER_PROTECTION_MODES: tuple[HeaderProtection, ...] = get_args(HeaderProtection)


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    """A primary key or subkey that is capable of encryption."""

    fingerprint: str
    expires: int | None  # seconds since the epoch; None = never

    def usable_at(self, now: float) -> bool:
        return self.expires is None or self.expires > now


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A validated, minimised transferable public key as the registry keeps it."""

    fingerprint: str  # primary key, 40 upper-case hex digits
    key_data: bytes  # binary OpenPGP: primary, valid subkeys, the bound user IDs, self-signatures
    expires: int | None  # of the primary key
    encryption_keys: tuple[EncryptionKey, ...]
    user_ids: tuple[str, ...]
    revoked: bool = False  # its owner published a revocation: never encrypt to it again

    def usable_encryption_keys(self, now: float | None = None) -> tuple[str, ...]:
        """Fingerprints of the (sub)keys to encrypt to now; empty when the key cannot encrypt."""
        moment = time.time() if now is None else now
        if self.revoked:
            return ()
        if self.expires is not None and self.expires <= moment:
            return ()
        return tuple(k.fingerprint for k in self.encryption_keys if k.usable_at(moment))


@dataclass(frozen=True, slots=True)
class Binding:
    """An address and the key it is bound to."""

    address: str
    key: StoredKey
    created: int


@dataclass(frozen=True, slots=True)
class PendingChange:
    """A key uploaded for an address, inactive until its owner proves they hold both the
    mailbox and the private key (by returning the token that was mailed encrypted to it)."""

    token_hash: str  # sha256 hex of the confirmation token; the token itself is never stored
    address: str
    key: StoredKey
    created: int
    expires: int  # seconds since the epoch; the token is refused after this
    origin: str  # "web" (signup page / API), "wks" (Web Key Service mail), "withdraw", "protect"
    # The owner's header protection choice, applied when the change is confirmed.
    header_protection: HeaderProtection | None = None
    # The owner asked for the mail already in the mailbox to be encrypted once bound.
    encrypt_existing: bool = False


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change to the registry, kept for the administrator and the user."""

    at: int
    address: str
    action: str  # registered, replaced, renewed, withdrawn, revoked, removed
    fingerprint: str
    actor: str  # self-service, admin-api, wks, cli


@dataclass(frozen=True, slots=True)
class AddressSettings:
    """What the owner (or the admin) chose for one address; None: the admin's default applies."""

    header_protection: HeaderProtection | None = None


class AddressKeys(list[StoredKey]):
    """The keys bound to an address, with the address's settings: one lookup answers both, so
    the mail path asks the store once per recipient. Still a list, so callers that only want
    the keys need not change."""

    settings: AddressSettings

    def __init__(
        self, keys: Iterable[StoredKey] = (), settings: AddressSettings | None = None
    ) -> None:
        super().__init__(keys)
        self.settings = settings or AddressSettings()
