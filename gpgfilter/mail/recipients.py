"""Mapping an envelope recipient to the address its key is registered under."""

from __future__ import annotations


def canonical_address(recipient: str, delimiters: str = "+") -> str:
    """Lower-case the address and drop a sub-address, as Postfix's ``recipient_delimiter`` does.

    ``Alice+News@Example.ORG`` becomes ``alice@example.org``. The whole address is lower-cased:
    mailbox servers (Dovecot's ``%Lu``) treat local parts case-insensitively, so a key must too.
    """
    address = recipient.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    for index, char in enumerate(local):
        if char in delimiters and index > 0:
            local = local[:index]
            break
    return f"{local}@{domain}".lower()
