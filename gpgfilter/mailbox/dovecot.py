"""One user's mailbox, through Dovecot's IMAP server started by ``doveadm exec imap -u USER``.

Why IMAP, and why started this way:

- IMAP APPEND takes the flags, keywords and INTERNALDATE of a message natively, and Dovecot's
  UIDPLUS answer (APPENDUID) names the stored copy exactly; ``doveadm save`` keeps neither
  flags nor the received date.
- It is Dovecot's own code that reads and writes the mailbox, with its own locking, for any
  storage backend (Maildir, mdbox, sdbox, obox): concurrent delivery and clients stay safe, and
  no file under the mail directory is ever touched by us.
- ``doveadm exec imap -u USER`` runs Dovecot's imap binary pre-authenticated on a pipe: no
  master password to configure or keep, no network listener; it needs what doveadm needs
  (root, or read access to dovecot.conf and the auth-userdb socket).
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

# imaplib refuses response lines over 1 MB; a FETCH of many messages' flags stays far below.
imaplib._MAXLINE = 10_000_000  # type: ignore[attr-defined]

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_DATE = re.compile(rb'\bINTERNALDATE "([^"]+)"')
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_LIST = re.compile(rb'^\(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.+)$')
_STATUS_MESSAGES = re.compile(rb"\bMESSAGES (\d+)")


class MailboxError(Exception):
    """Dovecot refused or failed a command; the text names the command, never content."""


@dataclass(frozen=True, slots=True)
class Folder:
    name: str  # as on the wire (modified UTF-7), passed back unchanged
    attributes: frozenset[str]  # lower case, e.g. "\\drafts", "\\noselect"


@dataclass(frozen=True, slots=True)
class Listed:
    """What a run needs to know of a message before it reads it."""

    uid: int
    flags: frozenset[str]
    internaldate: str  # exactly as Dovecot gave it, handed back in APPEND
    size: int
    marker: str | None  # the value of the marker header field, if any


@dataclass(frozen=True, slots=True)
class Selected:
    uidvalidity: int
    uidnext: int
    exists: int


def quote(text: str) -> str:
    """An IMAP quoted string (imaplib sends arguments as they are)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Pipe(imaplib.IMAP4_stream):
    """imaplib over a child process started from an argument list (never through a shell)."""

    def __init__(self, argv: Sequence[str], errors: IO[bytes]) -> None:
        self._argv = list(argv)
        self._errors = errors
        super().__init__(" ".join(argv))

    def open(self, host: str | None = None, port: int | None = None, timeout: Any = None) -> None:
        self.host = ""
        self.port = 0
        self.process = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.writefile = self.process.stdin
        self.readfile = self.process.stdout


class Session:
    """A pre-authenticated IMAP session for one user; every method raises MailboxError."""

    def __init__(self, argv: Sequence[str]) -> None:
        # Kept open for the session's life: Dovecot's complaints, if it fails, are read here.
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._imap = _Pipe(argv, self._errors)
        except (imaplib.IMAP4.error, OSError) as error:
            self._errors.seek(0)
            said = self._errors.read(2000).decode("utf-8", "replace").strip()
            self._errors.close()
            raise MailboxError(f"cannot open the mailbox: {said or error}") from None
        if self._imap.state != "AUTH":
            self.close()
            raise MailboxError("Dovecot did not pre-authenticate the session")

    @classmethod
    def doveadm(cls, user: str, *, doveadm: str, config: str | None) -> Session:
        argv = [doveadm] + (["-c", config] if config else []) + ["exec", "imap", "-u", user]
        return cls(argv)

    def close(self) -> None:
        with contextlib.suppress(imaplib.IMAP4.error, OSError, ValueError):
            self._imap.logout()
        process: subprocess.Popen[bytes] | None = getattr(self._imap, "process", None)
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._errors.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ok(self, what: str, result: tuple[str, list[Any]]) -> list[Any]:
        typ, data = result
        if typ != "OK":
            detail = b" ".join(d for d in data if isinstance(d, bytes))[:200]
            raise MailboxError(f"{what}: {typ} {detail.decode('ascii', 'replace')}")
        return data

    def _call(self, what: str, *args: Any) -> list[Any]:
        try:
            return self._ok(what, self._imap._simple_command(*args))
        except (imaplib.IMAP4.error, OSError) as error:
            raise MailboxError(f"{what}: {error}") from None

    def folders(self) -> list[Folder]:
        self._call("LIST", "LIST", '""', '"*"', "RETURN", "(SPECIAL-USE)")
        _typ, lines = self._imap._untagged_response("OK", [None], "LIST")
        found = []
        for line in lines:
            if isinstance(line, tuple):  # a name sent as a literal
                head, name_bytes = line
                attributes = head.split(b")", 1)[0].lstrip(b"(")
                name = name_bytes.decode("utf-8", "replace")
            elif isinstance(line, bytes) and (match := _LIST.match(line)):
                attributes = match.group(1)
                name = _unquote(match.group(2))
            else:
                continue
            found.append(
                Folder(
                    name,
                    frozenset(a.decode("ascii", "replace").lower() for a in attributes.split()),
                )
            )
        return found

    def status_messages(self, folder: str) -> int:
        self._call("STATUS", "STATUS", quote(folder), "(MESSAGES)")
        _typ, lines = self._imap._untagged_response("OK", [None], "STATUS")
        for line in lines:
            text = line[0] if isinstance(line, tuple) else line
            if isinstance(text, bytes) and (match := _STATUS_MESSAGES.search(text)):
                return int(match.group(1))
        return 0

    def select(self, folder: str) -> Selected:
        self._imap.untagged_responses.clear()
        self._call("SELECT", "SELECT", quote(folder))
        self._imap.state = "SELECTED"  # imaplib's select() would not quote the name
        responses: dict[str, list[Any]] = self._imap.untagged_responses
        try:
            return Selected(
                uidvalidity=int(responses["UIDVALIDITY"][-1]),
                uidnext=int(responses.get("UIDNEXT", [b"1"])[-1]),
                exists=int(responses["EXISTS"][-1]),
            )
        except (KeyError, ValueError, TypeError):
            raise MailboxError("SELECT: no UIDVALIDITY or EXISTS in Dovecot's answer") from None

    def listing(self, first_uid: int, marker_field: str) -> list[Listed]:
        """UID, flags, date, size and marker of every message with a UID from ``first_uid``."""
        data = self._uid(
            "FETCH",
            f"{max(first_uid, 1)}:*",
            f"(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS ({marker_field})])",
        )
        found: list[Listed] = []
        for index, item in enumerate(data):
            if not isinstance(item, tuple):
                continue
            meta = item[0]
            after = data[index + 1] if index + 1 < len(data) else b""
            if isinstance(after, bytes):
                meta += after
            uid, flags, date, size = (
                _UID.search(meta),
                _FLAGS.search(meta),
                _DATE.search(meta),
                _SIZE.search(meta),
            )
            if not (uid and flags and date and size):
                raise MailboxError("FETCH: an answer without UID, FLAGS, INTERNALDATE or SIZE")
            if int(uid.group(1)) < first_uid:
                continue  # "N:*" names the highest UID even when it is below N
            found.append(
                Listed(
                    uid=int(uid.group(1)),
                    flags=_flags(flags.group(1)),
                    internaldate=date.group(1).decode("ascii"),
                    size=int(size.group(1)),
                    marker=_field_value(item[1], marker_field),
                )
            )
        return found

    def fetch(self, uid: int) -> bytes | None:
        """The message's bytes exactly as stored; None when it is gone."""
        for item in self._uid("FETCH", str(uid), "(UID BODY.PEEK[])"):
            if isinstance(item, tuple) and (m := _UID.search(item[0])) and int(m.group(1)) == uid:
                return bytes(item[1])
        return None

    def flags(self, uid: int) -> frozenset[str] | None:
        """The message's flags now; None when it is gone (expunged or moved by a client)."""
        for item in self._uid("FETCH", str(uid), "(UID FLAGS)"):
            if isinstance(item, bytes) and (m := _UID.search(item)) and int(m.group(1)) == uid:
                found = _FLAGS.search(item)
                return _flags(found.group(1)) if found else frozenset()
        return None

    def append(self, folder: str, flags: frozenset[str], internaldate: str, data: bytes) -> int:
        """Store ``data`` (bytes unchanged) with these flags and date; the new UID."""
        self._imap.literal = data  # type: ignore[assignment]  # imaplib takes bytes here
        try:
            typ, answer = self._imap._command_complete(
                "APPEND",
                self._imap._command(
                    "APPEND",
                    quote(folder),
                    "(" + " ".join(sorted(flags)) + ")",
                    quote(internaldate),
                ),
            )
        except (imaplib.IMAP4.error, OSError) as error:
            raise MailboxError(f"APPEND: {error}") from None
        self._ok("APPEND", (typ, answer))
        found = _APPENDUID.search(answer[0] or b"")
        if found is None:
            raise MailboxError("APPEND: Dovecot gave no APPENDUID")
        return int(found.group(2))

    def set_flags(self, uid: int, flags: frozenset[str]) -> None:
        self._uid("STORE", str(uid), "FLAGS.SILENT", "(" + " ".join(sorted(flags)) + ")")

    def expunge(self, uid: int) -> None:
        """Remove this one message (UID EXPUNGE: other messages marked \\Deleted stay)."""
        self._uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
        self._uid("EXPUNGE", str(uid))

    def _uid(self, command: str, *args: str) -> list[Any]:
        try:
            return self._ok(f"UID {command}", self._imap.uid(command, *args))
        except (imaplib.IMAP4.error, OSError) as error:
            raise MailboxError(f"UID {command}: {error}") from None


def _flags(text: bytes) -> frozenset[str]:
    return frozenset(text.decode("utf-8", "replace").split())


def _unquote(name: bytes) -> str:
    if name.startswith(b'"') and name.endswith(b'"') and len(name) >= 2:
        name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
    return name.decode("utf-8", "replace")


def _field_value(header: bytes, name: str) -> str | None:
    """The value of the header field ``name`` in a fetched header block (first one)."""
    prefix = name.lower().encode("ascii") + b":"
    for line in header.split(b"\r\n"):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip().decode("ascii", "replace")
    return None
