"""How a run recognises a copy it made, after a crash left both the copy and the original.

The encrypted copy carries one header field in its (clear) outer header::

    X-Gpgfilter-Replaces: <UIDVALIDITY>.<UID>; <MAC>

naming the original by its IMAP UID in the same folder, authenticated by an HMAC keyed with a
secret that never leaves the host (``DATA_DIR/mailbox/marker.key``). Why this shape:

- Nothing derived from the message's content stands in clear: the UID is the server's own
  bookkeeping, and the MAC covers only the user, the folder and the UID.
- Anyone can send mail with any header field, and the filter keeps outer fields as they are:
  without the MAC, a forged field naming another message's UID would make the next run expunge
  that message as "already replaced". The MAC cannot be forged without the key.
- UIDs are never reused within one UIDVALIDITY, so a marker can never name a later message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

FIELD = "X-Gpgfilter-Replaces"
KEY_FILE = "marker.key"
_VALUE = re.compile(r"^(\d{1,10})\.(\d{1,10}); ([0-9a-f]{32})$")


@dataclass(frozen=True, slots=True)
class MarkerKey:
    secret: bytes

    @classmethod
    def load(cls, data_dir: Path) -> MarkerKey:
        """The host's marker key, made on first use (readable by root only)."""
        path = data_dir / KEY_FILE
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            secret = bytes.fromhex(path.read_text().strip())
            if len(secret) != 32:
                raise ValueError(f"{path}: not a marker key") from None
            return cls(secret)
        secret = secrets.token_bytes(32)
        with os.fdopen(descriptor, "w") as file:
            file.write(secret.hex() + "\n")
            file.flush()
            os.fsync(file.fileno())
        return cls(secret)

    def _mac(self, user: str, folder: str, uidvalidity: int, uid: int) -> str:
        text = f"{user}\0{folder}\0{uidvalidity}\0{uid}".encode("utf-8", "surrogateescape")
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()[:32]

    def field(self, user: str, folder: str, uidvalidity: int, uid: int) -> bytes:
        """The header line (CRLF-terminated) for the copy of message ``uid``."""
        mac = self._mac(user, folder, uidvalidity, uid)
        return f"{FIELD}: {uidvalidity}.{uid}; {mac}\r\n".encode("ascii")

    def original(self, value: str | None, user: str, folder: str, uidvalidity: int) -> int | None:
        """The UID of the original a marker value names, if it is ours, for this folder."""
        if value is None or not (match := _VALUE.match(value)):
            return None
        validity, uid = int(match.group(1)), int(match.group(2))
        if validity != uidvalidity:
            return None
        expected = self._mac(user, folder, validity, uid)
        return uid if hmac.compare_digest(expected, match.group(3)) else None
