"""The check every engine's output passes before it is delivered.

An engine's exit status alone proves nothing: gpg can exit 0 with empty output, and an engine
with a bug can encrypt to the wrong keys. So the output is read back: its OpenPGP packet
framing must show one armored message addressed to exactly the recipient's keys, in the forms
mail clients read.
"""

from __future__ import annotations

from gpgfilter.openpgp.engine import EngineError, Recipient
from keystore import packets as openpgp


def check_ciphertext(armored: bytes, recipient: Recipient) -> None:
    """Refuse output that is empty, not one armored encrypted message, or addressed to other
    keys than the recipient's — or in a form (PKESK v6, SEIPD v2) mail clients cannot read."""
    if not armored or armored.isspace():  # strip() would copy a 30 MB ciphertext
        raise EngineError("the engine produced no output")
    # Only the session-key packets are read: ~600 bytes each for RSA-4096, less for others.
    block = openpgp.find_armor(armored, max_decode=1024 + 640 * len(recipient.encryption_keys))
    if block is None or block.label != "MESSAGE":
        raise EngineError("the engine's output is not an armored OpenPGP message")
    if block.before.strip() or block.after.strip():
        raise EngineError("the engine's output has text around the armored message")
    try:
        addressing = openpgp.read_addressing(block.data)
    except openpgp.PacketError as error:
        raise EngineError(f"the engine's output is malformed: {error}") from None
    expected = sorted(openpgp.key_id(f) for f in recipient.encryption_keys)
    if sorted(addressing.key_ids) != expected:
        raise EngineError("the ciphertext is not addressed to exactly the recipient's keys")
    if addressing.pkesk_versions != {3}:
        raise EngineError("the ciphertext uses a session-key packet version clients cannot read")
    if addressing.data_tag != openpgp.TAG_SEIPD or addressing.data_version != 1:
        raise EngineError("the ciphertext is not integrity-protected data clients can read")
