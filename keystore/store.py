"""The storage interfaces: ``KeyStore``, which backends implement and the admin commands use,
and ``KeyLookup``, the one question the filter asks, answered without blocking its event loop."""

from __future__ import annotations

import hashlib
from typing import Protocol

from keystore.model import AuditEntry, Binding, HeaderProtection, PendingChange, StoredKey

PRUNE_EVERY = 60  # seconds between prunings of one kind of rate-limit scope


def scope_kind(scope: str) -> tuple[str, str]:
    """The bounds of the scopes of ``scope``'s kind: ``("client:", "client;")`` for
    ``"client:192.0.2.1"``; every such scope is >= the first and < the second."""
    kind = scope.partition(":")[0]
    return kind + ":", kind + ";"


class StoreError(Exception):
    """The store cannot be read or written. The filter defers mail when it sees this: a store
    that cannot answer must never be mistaken for "this user has no key"."""


class StoreUnavailable(StoreError):
    """The store's database did not answer (connection refused, no answer in time): what it
    holds is unknown, not lost. Kept apart from other ``StoreError``s because the fix differs:
    bring the database back, never restore a backup over it."""


class KeyLookup(Protocol):
    """All the mail path asks of the store. Asynchronous so that a store that hangs costs the
    asking recipient a bounded wait, never the event loop every other connection runs on."""

    async def keys_for(self, address: str) -> list[StoredKey]:
        """The keys bound to a canonical address; empty when the address is not enrolled.
        The stores answer with ``AddressKeys``, which also carries the address's settings.
        Raises ``StoreError`` (``StoreUnavailable`` when no answer came in time)."""
        ...


class KeyWasRevoked(StoreError):
    """``bind`` refused a key that was revoked once: a revocation is forever, even after the
    key was replaced and its stored copy deleted (its old holder, or a thief, could otherwise
    register an old copy without the revocation again)."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__(f"key {fingerprint} was revoked")
        self.fingerprint = fingerprint


class StaleMerge(StoreError):
    """``bind`` refused a merge made against a stored copy that has changed since (another
    process or host stored its own update in between): merge again with the new copy."""


NOTHING_STORED = "nothing-stored"
# How often an update is read, merged and stored before a caller gives up on ``StaleMerge``.
MERGE_ATTEMPTS = 3


def stored_state(key: StoredKey | None) -> str:
    """What an update was merged against, for ``bind(expected=...)``: a digest of the stored
    copy, or ``NOTHING_STORED``."""
    return state_of(None if key is None else key.key_data)


def state_of(key_data: bytes | None) -> str:
    """``stored_state`` from the stored bytes, as a backend reads them."""
    return NOTHING_STORED if key_data is None else hashlib.sha256(key_data).hexdigest()


class KeyStore(Protocol):
    def keys_for(self, address: str) -> list[StoredKey]:
        """The keys bound to a canonical address; empty when the address is not enrolled."""
        ...

    def change_token(self) -> str:
        """A value that changes with every write to keys, bindings or address settings, by
        any process (the schema's triggers change it, whoever writes). What ``keys_for``
        returned after reading a token is still current as long as the token is unchanged."""
        ...

    def set_header_protection(self, address: str, mode: HeaderProtection | None) -> None:
        """Remember the address's header protection choice (None: the admin's default). Kept
        apart from the bindings, so a replaced key keeps it; dropped when the address is
        removed."""
        ...

    def key(self, fingerprint: str) -> StoredKey | None:
        """The stored copy of a key, whatever address it is bound to; None when unknown. An
        update of a known key is merged with this copy (``keystore.validate.merge_key``)."""
        ...

    def bind(
        self, address: str, key: StoredKey, *, replace: bool = True, expected: str | None = None
    ) -> None:
        """Bind ``key`` to ``address``; ``replace`` drops the address's other keys atomically.
        The key's stored copy is overwritten: callers merge first, and pass ``expected``
        (``stored_state`` of the copy they merged against) so that a copy changed meanwhile
        raises ``StaleMerge`` instead of being lost. A key ever revoked raises
        ``KeyWasRevoked``. Every pending change of the address is dropped in the same
        transaction: its token was issued for a former state."""
        ...

    def was_revoked(self, fingerprint: str) -> bool:
        """True when the key was ever revoked, whether or not a copy of it is still stored."""
        ...

    def remove(self, address_or_fingerprint: str) -> int:
        """Remove an address's bindings or every binding of a fingerprint, and the pending
        changes of the addresses concerned; returns how many bindings."""
        ...

    def revoke(self, fingerprint: str) -> int:
        """Remember forever that the key is revoked, mark its stored copy revoked (it stays
        bound, so mail is held, not sent in clear) and drop the pending changes of its
        addresses; returns how many addresses it is bound to."""
        ...

    def bindings(self) -> list[Binding]: ...

    # -- registration: proof of ownership, audit, rate limits, notices ---------------------
    def add_pending(self, pending: PendingChange) -> None:
        """Keep an uploaded key until its owner confirms; another pending change for the same
        address and key replaces it."""
        ...

    def take_pending(self, token_hash: str, now: int) -> PendingChange | None:
        """Remove and return the pending change with this token hash, atomically, so a token
        works once; None when it is unknown, already used or expired."""
        ...

    def pending_for(self, address: str, now: int) -> list[PendingChange]:
        """Changes for ``address`` that are still waiting for confirmation."""
        ...

    def purge_pending(self, now: int) -> int:
        """Forget expired pending changes; returns how many."""
        ...

    def record_audit(self, entry: AuditEntry) -> None: ...

    def audit_log(self, address: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""
        ...

    def hit(self, scope: str, now: int, window: int, limit: int) -> int:
        """Count one event under ``scope`` (e.g. ``"address:alice@example.org"``) and return how
        many that scope had in the last ``window`` seconds, this one included. When the scope
        already had ``limit``, nothing is written (a flood adds no rows) and ``limit + 1`` is
        returned. Events older than the window are pruned for every scope of the same kind
        (the part before ":", which must always come with the same window), at least every
        PRUNE_EVERY seconds, so one-off scopes leave nothing behind. Shared by every process
        using the store, so limits hold across restarts and hosts."""
        ...

    def mark_notice(self, fingerprint: str, kind: str) -> bool:
        """Remember that the notice ``kind`` went out for a key; True only the first time, so
        a periodic job sends each notice once."""
        ...

    def close(self) -> None: ...
