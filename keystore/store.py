"""The storage interface the filter and the admin commands use; backends implement it."""

from __future__ import annotations

from typing import Protocol

from keystore.model import Binding, StoredKey


class StoreError(Exception):
    """The store cannot be read or written. The filter defers mail when it sees this: a store
    that cannot answer must never be mistaken for "this user has no key"."""


class KeyStore(Protocol):
    def keys_for(self, address: str) -> list[StoredKey]:
        """The keys bound to a canonical address; empty when the address is not enrolled."""
        ...

    def bind(self, address: str, key: StoredKey, *, replace: bool = True) -> None:
        """Bind ``key`` to ``address``; ``replace`` drops the address's other keys atomically."""
        ...

    def remove(self, address_or_fingerprint: str) -> int:
        """Remove an address's bindings or every binding of a fingerprint; returns how many."""
        ...

    def revoke(self, fingerprint: str) -> int:
        """Mark a registered key revoked (it stays bound, so mail is held, not sent in clear);
        returns how many addresses it is bound to."""
        ...

    def bindings(self) -> list[Binding]: ...

    def close(self) -> None: ...
