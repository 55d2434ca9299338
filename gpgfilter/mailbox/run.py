"""A run over users and folders: who is skipped and why, the sweep's state, one lock per user.

The run itself is the same for a first pass over a whole mailbox and for the periodic sweep
(``since_last``): the sweep only starts each folder at the UID where the previous run stopped,
so that what mail clients stored since (Sent, archives, moved-in mail) is encrypted too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpgfilter.mail import storedcopy
from gpgfilter.mailbox.dovecot import Folder, MailboxError, Session
from gpgfilter.mailbox.marker import MarkerKey
from gpgfilter.mailbox.replace import FolderReplacer, FolderReport, Pacer, StepHook
from gpgfilter.openpgp.engine import Engine, Recipient
from keystore.model import HeaderProtection, StoredKey

STATE_FILE = "sweep.json"
LOCK_DIR = "locks"


@dataclass(slots=True)
class UserReport:
    user: str
    folders: list[FolderReport] = field(default_factory=list)
    skipped: str | None = None  # why the whole mailbox was left alone
    skipped_folders: list[str] = field(default_factory=list)
    error: str | None = None  # why the run stopped in this mailbox (Dovecot failed)
    seconds: float = 0.0

    def total(self, name: str) -> int:
        return sum(int(getattr(f, name)) for f in self.folders)


class SweepState:
    """Per user and folder: the UIDVALIDITY and the UID the next sweep starts at.

    Written after each folder, atomically; a folder whose run had failures is not moved on,
    so its failed messages are tried again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            loaded = {}
        except (OSError, ValueError) as error:
            raise MailboxError(f"{path}: unreadable sweep state: {error}") from None
        self._data: dict[str, dict[str, list[int]]] = loaded if isinstance(loaded, dict) else {}

    def start(self, user: str, folder: str, uidvalidity: int | None) -> int:
        """Where a sweep starts: 1 for an unknown folder or one whose UIDVALIDITY changed."""
        entry = self._data.get(user, {}).get(folder)
        if entry is None or uidvalidity is None or entry[0] != uidvalidity:
            return 1
        return int(entry[1])

    def known(self, user: str, folder: str) -> tuple[int, int] | None:
        entry = self._data.get(user, {}).get(folder)
        return (int(entry[0]), int(entry[1])) if entry else None

    def done(self, user: str, folder: str, uidvalidity: int, next_uid: int) -> None:
        self._data.setdefault(user, {})[folder] = [uidvalidity, next_uid]
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(self._data, sort_keys=True))
        os.replace(temporary, self.path)


@contextlib.contextmanager
def user_lock(data_dir: Path, user: str) -> Iterator[bool]:
    """Hold this user's lock (False when another run on this host has it): two runs at once
    would each store a copy of the same message."""
    directory = data_dir / LOCK_DIR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = hashlib.sha256(user.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    with open(directory / name, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


@dataclass(frozen=True, slots=True)
class RunSettings:
    doveadm: str = "doveadm"
    dovecot_config: str | None = None
    skip_folders: tuple[str, ...] = ("\\Drafts", "Drafts")
    throttle: float = 0.0
    timeout: float = 120.0
    dry_run: bool = False
    since_last: bool = False
    header_protection: HeaderProtection = "off"  # the admin's default, as for the filter


class MailboxRun:
    """Encrypts the mail at rest of one user after another."""

    def __init__(
        self,
        *,
        data_dir: Path,
        engine: Engine,
        keys_for: Callable[[str], list[StoredKey]],
        settings: RunSettings,
        step: StepHook | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.engine = engine
        self.keys_for = keys_for
        self.settings = settings
        self.marker = MarkerKey.load(data_dir)
        self.state = SweepState(data_dir / STATE_FILE)
        self.pacer = Pacer(settings.throttle)
        self.step = step

    def _skipped(self, folder: Folder) -> bool:
        if folder.attributes & {"\\noselect", "\\nonexistent"}:
            return True
        for entry in self.settings.skip_folders:
            if entry.startswith("\\") and entry.lower() in folder.attributes:
                return True
            if entry == folder.name:
                return True
        return False

    def open(self, user: str) -> Session:
        return Session.doveadm(
            user, doveadm=self.settings.doveadm, config=self.settings.dovecot_config
        )

    async def user(
        self,
        user: str,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> UserReport:
        """One user's mailbox; ``progress(done, total)`` after each message."""
        started = time.monotonic()
        report = UserReport(user)
        keys = self.keys_for(user)
        recipient = storedcopy.recipient_for(keys)
        if recipient is None:
            report.skipped = (
                "no key registered" if not keys else "no usable key (expired or revoked)"
            )
            return report
        protection = storedcopy.protection_for(keys, self.settings.header_protection)
        with user_lock(self.data_dir, user) as mine:
            if not mine:
                report.skipped = "another run is working on this mailbox"
                return report
            try:
                session = self.open(user)
            except MailboxError as error:
                report.skipped = str(error)
                return report
            with session:
                try:
                    await self._folders(session, user, recipient, protection, report, progress)
                except MailboxError as error:
                    # Nothing is lost (see replace.py); the next run goes on from here.
                    report.error = str(error)
        report.seconds = time.monotonic() - started
        return report

    async def _folders(
        self,
        session: Session,
        user: str,
        recipient: Recipient,
        protection: HeaderProtection,
        report: UserReport,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        folders = []
        for folder in session.folders():
            if self._skipped(folder):
                if not folder.attributes & {"\\noselect", "\\nonexistent"}:
                    report.skipped_folders.append(folder.name)
            else:
                folders.append(folder)
        total = sum(session.status_messages(f.name) for f in folders) if progress else 0
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        replacer = FolderReplacer(
            session=session,
            user=user,
            recipient=recipient,
            protection=protection,
            engine=self.engine,
            marker=self.marker,
            timeout=self.settings.timeout,
            pacer=self.pacer,
            dry_run=self.settings.dry_run,
            step=self.step,
            progress=advance,
        )
        for folder in folders:
            first = 1
            if self.settings.since_last:
                known = self.state.known(user, folder.name)
                if known is not None:
                    first = self.state.start(
                        user, folder.name, session.select(folder.name).uidvalidity
                    )
            folder_report, uidvalidity, uidnext = await replacer.run(folder.name, first)
            report.folders.append(folder_report)
            if not self.settings.dry_run and not folder_report.failed:
                self.state.done(user, folder.name, uidvalidity, uidnext)
