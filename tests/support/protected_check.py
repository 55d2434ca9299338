"""An independent oracle for header protection (RFC 9788): given what the filter received and
the plaintext a recipient decrypted, check the protected entity as a client would read it.

Written from the RFC and the product's rules, not from ``gpgfilter.mail.protect``: the header
is cut by ``signatures.header_units`` and read with Python's ``email`` package (reading only).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re

from tests.support.signatures import header_units

# Never copied inside (Bcc, trace fields), and what Dovecot adds on delivery.
NOT_INSIDE = {"bcc", "resent-bcc", "received", "return-path", "hp-outer", "delivered-to"}
_NAME = re.compile(rb"\s*([!-9;-~]+)[ \t]*:")


def name_of(unit: bytes) -> str:
    found = _NAME.match(unit)
    return found.group(1).decode().lower() if found else ""


def read(entity: bytes) -> email.message.Message:
    return email.message_from_bytes(entity, policy=email.policy.compat32)


def check_protected(plaintext: bytes, received: bytes, stored: bytes, mode: str) -> bool:
    """Assert ``plaintext`` protects the header of ``received`` per ``mode`` ("copy" or
    "hide-subject") and ``stored`` (the encrypted message) shows outside what it should.
    Returns True when a legacy display element stands in front of the body."""
    units, separator, body = header_units(received)
    inner_units, inner_separator, inner_body = header_units(plaintext)
    copies = [u for u, moved in units if not moved and name_of(u) not in NOT_INSIDE]
    assert [u for u, moved in inner_units if not moved and name_of(u) != "hp-outer"] == copies
    outer_units = [u for u, moved in header_units(stored)[0] if not moved]
    outer_subject = [u for u in outer_units if name_of(u) == "subject"]
    hp_outer = [u for u, _ in inner_units if name_of(u) == "hp-outer"]
    assert len(hp_outer) == len(copies)
    subjects = [u for u in copies if name_of(u) == "subject"]
    if mode == "copy":
        assert hp_outer == [b"HP-Outer: " + u for u in copies]
        assert outer_subject == subjects
    else:
        assert len(outer_subject) == len(subjects)
        assert all(u.split(b":", 1)[1].strip() == b"[...]" for u in outer_subject), outer_subject
        for unit in subjects:
            assert unit.split(b":", 1)[1].strip() not in stored
        assert [u for u in hp_outer if name_of(u[len(b"HP-Outer: ") :]) == "subject"] == [
            b"HP-Outer: " + u for u in outer_subject
        ]
    # The original Content-* lines, in order; Content-Type only extended.
    moved = [u for u, m in units if m]
    inner_moved = [u for u, m in inner_units if m]
    if not any(name_of(u) == "content-type" for u in moved):
        added = inner_moved.pop()
        assert added.lower().startswith(b"content-type: text/plain; charset=us-ascii; ")
    assert len(inner_moved) == len(moved)
    for original, kept in zip(moved, inner_moved, strict=True):
        if name_of(original) == "content-type":
            assert kept.startswith(original.rstrip(b"\r\n")), (original, kept)
        else:
            assert kept == original
    assert inner_separator == (separator or b"\r\n")
    parsed = read(plaintext)
    assert parsed.get_param("hp") == "cipher"
    assert parsed.get_param("protected-headers") == "v1"
    outside = read(received)
    assert parsed["Subject"] == outside["Subject"]
    for key in ("From", "To", "Date", "Message-ID"):
        assert parsed[key] == outside[key], key
    legacy = parsed.get_param("hp-legacy-display") == "1"
    if legacy:
        assert mode == "hide-subject"
        eol = b"\n" if inner_separator == b"\n" else b"\r\n"
        first, _, rest = inner_body.partition(eol + eol)
        assert first.startswith(b"Subject: ") and rest == body
        assert parsed.get_content_type() == "text/plain"
    else:
        assert inner_body == body, "the body must stay byte for byte"
    return legacy
