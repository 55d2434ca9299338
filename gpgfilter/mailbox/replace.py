"""Replacing a folder's clear messages by their encrypted copies, safely at every step.

The order of one replacement is what makes it crash-safe:

1. read the original (exact bytes, flags, keywords, INTERNALDATE);
2. APPEND the encrypted copy, with a marker naming the original (``marker.py``), the same
   flags and the same INTERNALDATE, to the same folder;
3. read the copy back from Dovecot and compare it byte for byte with what was sent;
4. if the original is gone meanwhile (a client deleted or moved it), remove the copy too;
   otherwise bring the copy's flags up to date and UID EXPUNGE the original.

A SIGKILL before 2 leaves the original alone; between 2 and 4, both messages — and the next
run, seeing a marked copy whose original still exists, checks the copy and goes on at 4. The
original is only ever removed when a checked copy is stored: at worst both exist, never none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpgfilter.mail import storedcopy
from gpgfilter.mail.classify import Verdict, classify
from gpgfilter.mail.rawmessage import split
from gpgfilter.mailbox.dovecot import Listed, MailboxError, Session
from gpgfilter.mailbox.marker import FIELD, MarkerKey
from gpgfilter.openpgp.engine import Engine, EngineError, Recipient
from keystore.model import HeaderProtection

RECENT = "\\recent"
DELETED = "\\deleted"

#: Called with the name of each step done ("appended", "verified", "expunged"): the crash
#: tests stop the real process there; the command itself passes nothing.
StepHook = Callable[[str], None]


@dataclass(slots=True)
class FolderReport:
    """What happened in one folder (or, with ``dry_run``, would happen)."""

    folder: str
    encrypted: int = 0  # replaced by an encrypted copy in this run
    finished: int = 0  # replacements an interrupted run had left half done
    already: int = 0  # encrypted already (by the filter, a client, or an earlier run)
    vanished: int = 0  # deleted or moved by a client while we worked on it
    failed: int = 0  # left as they were, with the reason logged
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.encrypted + self.finished


class Pacer:
    """At most ``rate`` replacements a second (0: no limit), so delivery keeps its speed."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self.interval


def _kept(flags: frozenset[str]) -> frozenset[str]:
    """The flags a copy must share with its original: \\Recent cannot be set, and \\Deleted
    may be our own half-done expunge."""
    return frozenset(f for f in flags if f.lower() not in (RECENT, DELETED))


class FolderReplacer:
    """One folder of one user's mailbox, through one IMAP session."""

    def __init__(
        self,
        *,
        session: Session,
        user: str,
        recipient: Recipient,
        engine: Engine,
        marker: MarkerKey,
        protection: HeaderProtection = "off",
        timeout: float,
        pacer: Pacer,
        dry_run: bool = False,
        step: StepHook | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.session = session
        self.user = user
        self.recipient = recipient
        self.protection = protection
        self.engine = engine
        self.marker = marker
        self.timeout = timeout
        self.pacer = pacer
        self.dry_run = dry_run
        self._step = step or (lambda _name: None)
        self._progress = progress or (lambda _count: None)

    async def run(self, folder: str, first_uid: int = 1) -> tuple[FolderReport, int, int]:
        """Process every message from ``first_uid``; the report, and the folder's UIDVALIDITY
        and UIDNEXT as they were when it was opened (where the next sweep starts)."""
        report = FolderReport(folder)
        selected = self.session.select(folder)
        if selected.exists == 0:
            return report, selected.uidvalidity, selected.uidnext
        listed = [
            m
            for m in self.session.listing(first_uid, FIELD)
            if m.uid < selected.uidnext  # what arrives after opening is the next sweep's
        ]
        copies: dict[int, list[Listed]] = {}
        originals: list[Listed] = []
        for message in listed:
            uid = self.marker.original(message.marker, self.user, folder, selected.uidvalidity)
            if uid is None:
                originals.append(message)
            else:
                copies.setdefault(uid, []).append(message)
        present = {m.uid for m in listed}
        for uid, made in copies.items():
            if uid not in present:
                report.already += len(made)  # a finished replacement
        for message in originals:
            made = copies.get(message.uid, [])
            try:
                if made:
                    await self._finish_pair(folder, message, made, report)
                else:
                    await self._replace(folder, selected.uidvalidity, message, report)
            except (EngineError, TimeoutError) as error:
                report.failed += 1
                report.notes.append(f"uid {message.uid}: encryption failed: {error or 'timeout'}")
            self._progress(1)
        return report, selected.uidvalidity, selected.uidnext

    async def _replace(
        self, folder: str, uidvalidity: int, message: Listed, report: FolderReport
    ) -> None:
        original = self.session.fetch(message.uid)
        if original is None:
            report.vanished += 1
            return
        parsed = split(original)
        if classify(parsed).already_encrypted:
            report.already += 1
            return
        if self.dry_run:
            report.encrypted += 1
            return
        await self.pacer.wait()
        pieces = await storedcopy.stored_copy(
            parsed, self.recipient, self.engine, timeout=self.timeout, protection=self.protection
        )
        del parsed, original
        copy = self.marker.field(self.user, folder, uidvalidity, message.uid) + b"".join(pieces)
        del pieces
        if classify(split(copy)) is not Verdict.PGP_MIME:  # our own assembly, read back
            report.failed += 1
            report.notes.append(f"uid {message.uid}: the copy is not PGP/MIME; original kept")
            return
        flags = _kept(message.flags)
        copy_uid = self.session.append(folder, flags, message.internaldate, copy)
        self._step("appended")
        stored = self.session.fetch(copy_uid)
        if stored != copy:
            # Dovecot did not keep what we sent: the copy goes, the original stays.
            if stored is not None:
                self.session.expunge(copy_uid)
            report.failed += 1
            report.notes.append(f"uid {message.uid}: Dovecot stored a different copy; kept")
            return
        del stored, copy
        self._step("verified")
        if self._expunge_original(message.uid, copy_uid, flags):
            report.encrypted += 1
        else:
            report.vanished += 1

    async def _finish_pair(
        self, folder: str, message: Listed, made: list[Listed], report: FolderReport
    ) -> None:
        """An earlier run stored a copy and stopped before the original was expunged."""
        copy, *extra = made
        stored = self.session.fetch(copy.uid)
        if stored is None or classify(split(stored)) is not Verdict.PGP_MIME:
            # Not a copy we can vouch for (cannot happen unless the store changed it): leave
            # the original, and encrypt it anew next run once this copy is gone.
            report.failed += 1
            report.notes.append(f"uid {message.uid}: its earlier copy is unreadable; kept")
            return
        if self.dry_run:
            report.finished += 1
            return
        for duplicate in extra:  # two runs at once on one mailbox (another host): keep one
            self.session.expunge(duplicate.uid)
        if self._expunge_original(message.uid, copy.uid, _kept(copy.flags)):
            report.finished += 1
        else:
            report.vanished += 1

    def _expunge_original(self, uid: int, copy_uid: int, copy_flags: frozenset[str]) -> bool:
        """Expunge the original unless a client removed it first (then the copy goes too: the
        user deleted or moved that message). False when it was gone."""
        now = self.session.flags(uid)
        if now is None:
            self.session.expunge(copy_uid)
            return False
        if _kept(now) != copy_flags:  # a client changed the flags meanwhile
            self.session.set_flags(copy_uid, _kept(now))
        self.session.expunge(uid)
        self._step("expunged")
        return True


__all__ = ["FolderReplacer", "FolderReport", "MailboxError", "Pacer", "StepHook"]
