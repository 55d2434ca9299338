"""What both backends' schema migrations share: the wording of a refusal.

Each backend keeps its own list of migrations (``_MIGRATIONS`` in ``keystore.storage.sqlite`` and
``keystore.storage.postgres``), one entry per schema version, applied in order in one transaction.
A store written by a newer gpgfilter is refused rather than used: an older filter could
misread it, and misreading a key store may store mail in clear.
"""

from __future__ import annotations

from keystore.store import StoreError


def newer_schema(where: str, found: int, supported: int) -> StoreError:
    """The error for a store whose schema is newer than this program understands."""
    return StoreError(
        f"key store {where} has schema version {found}, newer than this"
        f" gpgfilter ({supported}): upgrade gpgfilter"
    )
