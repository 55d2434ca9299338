"""Between model objects and table rows, for both backends: the same columns in the same order.

The backends differ only in how a JSON column travels: SQLite stores it as text, PostgreSQL as
``jsonb`` that psycopg decodes. Reading accepts either; writing takes the backend's encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, LiteralString

from keystore.model import (
    HEADER_PROTECTION_MODES,
    AddressKeys,
    AddressSettings,
    EncryptionKey,
    HeaderProtection,
    PendingChange,
    StoredKey,
)

# The columns ``row_to_key`` reads, in its order.
KEY_COLUMNS: LiteralString = "fingerprint, key_data, expires, encryption_keys, user_ids, revoked"

# The columns ``row_to_pending`` reads: a key (a pending key is never revoked), then the change.
PENDING_COLUMNS: LiteralString = (
    "fingerprint, key_data, expires_key, encryption_keys, user_ids, false,"
    " token_hash, address, created, expires, origin, header_protection, encrypt_existing"
)

# ``keys_for``'s query: a key's columns, then the address's settings (NULL when none).
ADDRESS_KEYS_QUERY: LiteralString = (
    "SELECT k.fingerprint, k.key_data, k.expires, k.encryption_keys, k.user_ids, k.revoked,"
    " s.header_protection FROM bindings b JOIN keys k USING (fingerprint)"
    " LEFT JOIN address_settings s ON s.address = b.address"
)


def key_columns(key: StoredKey, encode_json: Callable[[object], object]) -> tuple[object, ...]:
    """The values of a key's columns up to ``user_ids`` (revocation is written apart)."""
    return (
        key.fingerprint,
        key.key_data,
        key.expires,
        encode_json([[k.fingerprint, k.expires] for k in key.encryption_keys]),
        encode_json(list(key.user_ids)),
    )


def row_to_key(row: Sequence[object]) -> StoredKey:
    fingerprint, key_data, expires, encryption_keys, user_ids, revoked = row
    assert isinstance(fingerprint, str) and isinstance(key_data, bytes)
    return StoredKey(
        fingerprint=fingerprint,
        key_data=key_data,
        expires=expires if isinstance(expires, int) else None,
        encryption_keys=tuple(EncryptionKey(f, e) for f, e in _json_list(encryption_keys)),
        user_ids=tuple(_json_list(user_ids)),
        revoked=bool(revoked),
    )


def row_to_pending(row: Sequence[object]) -> PendingChange:
    token_hash, address, created, expires, origin, protection, encrypt_existing = row[6:]
    assert isinstance(token_hash, str) and isinstance(address, str) and isinstance(origin, str)
    assert isinstance(created, int) and isinstance(expires, int)
    return PendingChange(
        token_hash,
        address,
        row_to_key(row[:6]),
        created,
        expires,
        origin,
        header_protection=header_protection(protection),
        encrypt_existing=bool(encrypt_existing),
    )


def header_protection(value: object) -> HeaderProtection | None:
    """A stored choice; anything unknown reads as no choice (the admin's default applies)."""
    for mode in HEADER_PROTECTION_MODES:
        if value == mode:
            return mode
    return None


def rows_to_address_keys(rows: Sequence[Sequence[object]]) -> AddressKeys:
    """``ADDRESS_KEYS_QUERY``'s rows: the keys, and the settings every row repeats."""
    settings = AddressSettings(header_protection(rows[0][6]) if rows else None)
    return AddressKeys((row_to_key(row[:6]) for row in rows), settings)


def _json_list(value: object) -> list[Any]:
    """A JSON array column: text from SQLite, already decoded from PostgreSQL."""
    decoded = json.loads(value) if isinstance(value, str) else value
    assert isinstance(decoded, list)
    return decoded
