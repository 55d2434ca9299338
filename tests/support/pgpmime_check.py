"""Independent checks of a stored message's RFC 3156 structure, read with Python's ``email``
package (reading only: it stands in for a mail client's parser, not for our splitter)."""

from __future__ import annotations

import email
import email.message
import email.policy


def armored_part(stored: bytes) -> bytes:
    """Assert ``stored`` is exactly RFC 3156 PGP/MIME and return its armored OpenPGP message."""
    message = email.message_from_bytes(stored, policy=email.policy.compat32)
    assert message.get_content_type() == "multipart/encrypted", message.get_content_type()
    assert message.get_param("protocol") == "application/pgp-encrypted"
    assert message.get_all("Content-Transfer-Encoding") is None, "no CTE may stay outside"
    assert len(message.get_all("Content-Type") or []) == 1
    assert not message.defects, message.defects
    parts = message.get_payload()
    assert isinstance(parts, list) and len(parts) == 2
    control, payload = parts
    assert isinstance(control, email.message.Message)
    assert isinstance(payload, email.message.Message)
    assert control.get_content_type() == "application/pgp-encrypted"
    assert "Version: 1" in str(control.get_payload())
    assert payload.get_content_type() == "application/octet-stream"
    preamble = (message.preamble or "").strip()
    epilogue = (message.epilogue or "").strip()
    assert not preamble and not epilogue, "nothing may stand in clear beside the ciphertext"
    armored = str(payload.get_payload()).strip().encode("ascii")
    assert armored.startswith(b"-----BEGIN PGP MESSAGE-----")
    assert armored.endswith(b"-----END PGP MESSAGE-----")
    assert max(len(line) for line in stored.split(b"\n")) <= 1000, "line over 998 octets"
    return armored
