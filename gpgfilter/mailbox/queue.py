"""The addresses whose stored mail waits to be encrypted because their owner enrolled.

The key service notes a request here (it runs as its own user, without the rights doveadm
needs); ``gpgfilter mailbox encrypt --queued``, which the sweep's timer runs as root, does the
work and removes the entry. One file per address, named by a hash of it and holding it: two
requests for one address are one entry, and a request never overwrites a half-read one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

QUEUE_DIR = "mailbox-queue"


class EnrolmentQueue:
    """A directory of requests; it implements keystore's ``EnrolmentHook``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def under(cls, data_dir: Path) -> EnrolmentQueue:
        return cls(data_dir / QUEUE_DIR)

    def _entry(self, address: str) -> Path:
        return self.directory / hashlib.sha256(address.encode("utf-8")).hexdigest()[:32]

    def request(self, address: str) -> None:
        """Note ``address`` (written whole, then renamed into place: a reader never sees a
        partial entry; a crash leaves at worst a dot file, ignored)."""
        self._make_directory()
        entry = self._entry(address)
        temporary = entry.with_name(f".{entry.name}.{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(address + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, entry)

    def _make_directory(self) -> None:
        """Made by whoever queues first; owned like DATA_DIR, so that the key service (its
        own user) can still queue after root's ``keys import`` made it."""
        if self.directory.is_dir():
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            parent = self.directory.parent.stat()
            os.chown(self.directory, parent.st_uid, parent.st_gid)

    def addresses(self) -> list[str]:
        """The queued addresses, in no particular order; unreadable entries are skipped."""
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                address = entry.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if address and entry.name == self._entry(address).name:
                found.append(address)
        return found

    def done(self, address: str) -> None:
        self._entry(address).unlink(missing_ok=True)
