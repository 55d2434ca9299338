"""Handing a message to the downstream: Dovecot over LMTP, or Postfix's reinjection smtpd.

A small client of our own, because neither ``smtplib.LMTP`` nor the usual async SMTP clients
read the per-recipient replies that LMTP sends after DATA (RFC 2033 section 4.2,
python/cpython#76984): reading only one makes the server time out and the MTA redeliver.

Every failure comes back as a reply per recipient, never as an exception: the caller answers
Postfix from these replies, and a connection problem is a temporary failure (4xx) so that
Postfix keeps the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from gpgfilter.process.config import Endpoint

_BARE_LF = re.compile(rb"(?<!\r)\n")
_WRITE_CHUNK = 1 << 18


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


UNAVAILABLE = Reply(451, "4.4.0 Downstream unavailable, try again later")
PROTOCOL_ERROR = Reply(451, "4.5.0 Downstream protocol error, try again later")


class _ProtocolError(Exception):
    pass


def to_wire(data: bytes) -> bytes:
    """SMTP DATA form: CRLF line endings, dot-stuffed, ending with the final dot line."""
    return wire_body(data) + b".\r\n"


def crlf_lines(data: bytes) -> bytes:
    """``data`` with CRLF line endings, ending with one: the form both DATA and BDAT carry.

    Copies the data only where it must change: a 30 MB ciphertext in CRLF form is passed
    through as the same object.
    """
    if data.count(b"\n") != data.count(b"\r\n"):  # two C scans beat a regex over the data
        data = _BARE_LF.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def wire_body(data: bytes) -> bytes:
    """``data`` with CRLF line endings and dot-stuffing, without the final dot line."""
    data = crlf_lines(data)
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data


class _Refused(Exception):
    """The server greeted with a refusal; every recipient gets that reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class MailClient:
    """SMTP, or LMTP with ``lmtp=True``, reusing idle connections as Postfix does.

    A fresh connection per message would cost the downstream (Dovecot) a session set-up for
    every message; a connection is reused after an ``RSET`` that proves it still works.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        lmtp: bool,
        helo: str,
        timeout: float,
        max_idle: int = 8,
        idle_seconds: float = 30.0,
    ) -> None:
        self.endpoint = endpoint
        self.lmtp = lmtp
        self.helo = helo
        self.timeout = timeout
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: list[_Session] = []

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes | Sequence[bytes],
        *,
        smtputf8: bool = False,
    ) -> list[Reply]:
        """Deliver ``data`` (bytes, or pieces that each end a line); one reply per recipient,
        in order.

        Replies already received stay valid when the connection fails later: an LMTP server that
        said 250 for the first recipient has delivered to it, whatever happens to the others.
        """
        replies: list[Reply | None] = [None] * len(recipients)
        fallback = UNAVAILABLE
        try:
            # A deadline on this task, not wait_for's task of its own: one fewer per message.
            async with asyncio.timeout(self.timeout):
                await self._transaction(
                    mail_from,
                    recipients,
                    (data,) if isinstance(data, bytes) else data,
                    smtputf8,
                    replies,
                )
        except _Refused as refused:
            fallback = refused.reply
        except (OSError, asyncio.IncompleteReadError, TimeoutError, EOFError):
            pass
        except _ProtocolError:
            fallback = PROTOCOL_ERROR
        return [reply or fallback for reply in replies]

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            await session.close()

    async def _connect(self) -> _Session:
        if self.endpoint.is_unix:
            reader, writer = await asyncio.open_unix_connection(self.endpoint.path)
        else:
            reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        session = _Session(reader, writer)
        try:
            greeting = await session.read_reply()
            if not greeting.ok:
                raise _Refused(greeting)
            session.extensions = await session.hello(self.helo, self.lmtp)
        except BaseException:
            session.abort()
            raise
        return session

    def _reusable(self) -> _Session | None:
        while self._idle:
            session = self._idle.pop()
            if time.monotonic() - session.last_used <= self.idle_seconds:
                return session
            session.abort()
        return None

    def _checkin(self, session: _Session) -> None:
        if len(self._idle) < self.max_idle:
            session.last_used = time.monotonic()
            self._idle.append(session)
        else:
            session.abort()

    async def _transaction(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: Sequence[bytes],
        smtputf8: bool,
        replies: list[Reply | None],
    ) -> None:
        """Fill ``replies`` with final answers as they arrive; None means "not final yet".

        A reused connection starts with RSET; when the server has closed it meanwhile, that
        first reply never comes, nothing was accepted, and a fresh connection takes over.
        """
        session = self._reusable()
        while True:
            if session is None:
                session = await self._connect()  # a fresh session is never stale
            try:
                await self._exchange(session, mail_from, recipients, data, smtputf8, replies)
            except _StaleConnection:
                session.abort()
                session = None
                continue
            except BaseException:
                session.abort()
                raise
            self._checkin(session)
            return

    async def _exchange(
        self,
        session: _Session,
        mail_from: str,
        recipients: Sequence[str],
        data: Sequence[bytes],
        smtputf8: bool,
        replies: list[Reply | None],
    ) -> None:
        extensions = session.extensions
        options = []
        if "8BITMIME" in extensions and not all(part.isascii() for part in data):
            options.append("BODY=8BITMIME")
        if smtputf8 and "SMTPUTF8" in extensions:
            options.append("SMTPUTF8")
        if "SIZE" in extensions:
            options.append(f"SIZE={sum(len(part) for part in data)}")
        reset = session.used
        session.used = True
        if "CHUNKING" in extensions and "PIPELINING" in extensions:
            await self._exchange_chunked(
                session, reset, options, mail_from, recipients, data, replies
            )
            return
        commands = ["RSET"] if reset else []
        commands.append(" ".join((f"MAIL FROM:<{mail_from}>", *options)))
        commands += [f"RCPT TO:<{recipient}>" for recipient in recipients]
        commands.append("DATA")
        # RFC 2920: with PIPELINING the whole envelope goes out in one write.
        answers = session.pipeline(commands) if "PIPELINING" in extensions else None
        if reset:
            try:
                first = await (answers.__anext__() if answers else session.command(commands[0]))
            except (OSError, EOFError, asyncio.IncompleteReadError) as error:
                raise _StaleConnection from error
            if not first.ok:
                raise _StaleConnection
        next_reply = answers.__anext__ if answers else None

        async def answer(command: str) -> Reply:
            return await (next_reply() if next_reply else session.command(command))

        mail = await answer(commands[int(reset)])
        if not mail.ok and not answers:
            replies[:] = [mail] * len(recipients)
            return
        accepted: list[int] = []
        for index, recipient in enumerate(recipients):
            _sort_rcpt(mail, await answer(f"RCPT TO:<{recipient}>"), index, accepted, replies)
        if not mail.ok:
            replies[:] = [mail] * len(recipients)
            if answers:
                await next_reply()  # type: ignore[misc]  # DATA, refused: no recipient
            return
        if not accepted and not answers:
            return
        start = await answer("DATA")
        if start.code != 354:
            for index in accepted:
                replies[index] = start
            return
        if not accepted:  # a server that says 354 with no recipient: end it empty
            session.writer.write(b".\r\n")
            await session.read_reply()
            return
        # In chunks: the transport copies whatever the socket does not take at once, and a
        # whole 30 MB ciphertext would be held twice. Small pieces (the header fields, the
        # ciphertext of a short message, the closing boundary) and the end of data share a
        # write: a syscall and a wake-up of the server each fewer.
        pending: list[bytes | memoryview] = []
        size = 0
        for part in data:  # each piece starts a line, so each can be made wire-ready alone
            body = memoryview(wire_body(part))
            for offset in range(0, len(body), _WRITE_CHUNK):
                chunk = body[offset : offset + _WRITE_CHUNK]
                pending.append(chunk)
                size += len(chunk)
                if size >= _WRITE_CHUNK:
                    session.writer.writelines(pending)
                    pending, size = [], 0
                    await session.writer.drain()
        pending.append(b".\r\n")
        session.writer.writelines(pending)
        await session.writer.drain()
        await self._final_replies(session, accepted, replies)

    async def _exchange_chunked(
        self,
        session: _Session,
        reset: bool,
        options: list[str],
        mail_from: str,
        recipients: Sequence[str],
        data: Sequence[bytes],
        replies: list[Reply | None],
    ) -> None:
        """The transaction with BDAT (RFC 3030) instead of DATA: the envelope, the command and
        the message go out together, with no wait for a 354 and no dot-stuffing. Dovecot's LMTP
        and Postfix's smtpd both offer it; it saves the downstream and us a round trip, a
        write and a wake-up per message. In LMTP the reply to ``BDAT LAST`` is one reply per
        accepted recipient, as after DATA (RFC 2033 section 4.2).

        On a reused connection the reply to the leading RSET still tells a connection the
        server closed meanwhile (nothing was accepted on it, so a fresh one takes over); only
        the first 256 KB of a message go out before that reply has come.
        """
        body = [crlf_lines(part) for part in data]
        size = sum(len(part) for part in body)
        commands = ["RSET"] if reset else []
        commands.append(" ".join((f"MAIL FROM:<{mail_from}>", *options)))
        commands += [f"RCPT TO:<{recipient}>" for recipient in recipients]
        commands.append(f"BDAT {size} LAST")
        head = "".join(f"{command}\r\n" for command in commands).encode("utf-8")
        chunks = _chunks(body)
        # The envelope, the command and the start of the message in one write.
        first: list[bytes | memoryview] = [head]
        sent, room = 0, _WRITE_CHUNK
        while sent < len(chunks) and len(chunks[sent]) <= room:
            room -= len(chunks[sent])
            first.append(chunks[sent])
            sent += 1
        try:
            session.writer.writelines(first)
            await session.writer.drain()
            if reset:
                answer = await session.read_reply()
                if not answer.ok:
                    raise _StaleConnection
        except (OSError, EOFError, asyncio.IncompleteReadError) as error:
            if reset:
                raise _StaleConnection from error
            raise
        for chunk in chunks[sent:]:
            session.writer.write(chunk)
            await session.writer.drain()
        mail = await session.read_reply()
        accepted: list[int] = []
        for index in range(len(recipients)):
            _sort_rcpt(mail, await session.read_reply(), index, accepted, replies)
        if not mail.ok:
            await session.read_reply()  # BDAT, refused: no transaction
            replies[:] = [mail] * len(recipients)
            return
        if not accepted:
            await session.read_reply()  # BDAT, refused: no recipient
            return
        await self._final_replies(session, accepted, replies)

    async def _final_replies(
        self, session: _Session, accepted: list[int], replies: list[Reply | None]
    ) -> None:
        """After the end of data: one reply per accepted recipient in LMTP, one for all in
        SMTP."""
        if self.lmtp:
            for index in accepted:
                replies[index] = await session.read_reply()
        else:
            final = await session.read_reply()
            for index in accepted:
                replies[index] = final


def _sort_rcpt(
    mail: Reply, reply: Reply, index: int, accepted: list[int], replies: list[Reply | None]
) -> None:
    """File the reply to one RCPT: accepted, or that recipient's final answer. After a
    refused MAIL every reply is moot (the MAIL reply answers for all)."""
    if not mail.ok:
        return
    if reply.ok:
        accepted.append(index)
    else:
        replies[index] = reply


def _chunks(body: Sequence[bytes]) -> list[bytes | memoryview]:
    """The pieces of ``body`` in slices of at most ``_WRITE_CHUNK`` bytes, without copying."""
    chunks: list[bytes | memoryview] = []
    for part in body:
        if len(part) <= _WRITE_CHUNK:
            chunks.append(part)
        else:
            view = memoryview(part)
            chunks += [view[o : o + _WRITE_CHUNK] for o in range(0, len(part), _WRITE_CHUNK)]
    return chunks


class _StaleConnection(Exception):
    """A reused connection turned out closed before anything was accepted."""


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: set[str] = set()
        self.last_used = time.monotonic()
        self.used = False

    async def pipeline(self, commands: Sequence[str]) -> AsyncIterator[Reply]:
        """Send ``commands`` at once, then yield their replies in order."""
        self.writer.write(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))
        await self.writer.drain()
        for _ in commands:
            yield await self.read_reply()

    def abort(self) -> None:
        """Drop the connection at once: after an error its state is unknown."""
        self.writer.close()

    async def read_reply(self) -> Reply:
        texts: list[str] = []
        code = 0
        while True:
            line = await self.reader.readline()
            if not line:
                raise EOFError("connection closed")
            decoded = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(decoded) < 3 or not decoded[:3].isdigit():
                raise _ProtocolError(f"malformed reply line {decoded[:40]!r}")
            code = int(decoded[:3])
            texts.append(decoded[4:].strip())
            if decoded[3:4] != "-":
                break
        return Reply(code, " ".join(t for t in texts if t) or "(no text)")

    async def hello(self, name: str, lmtp: bool) -> set[str]:
        verb = "LHLO" if lmtp else "EHLO"
        self.writer.write(f"{verb} {name}\r\n".encode("ascii"))
        await self.writer.drain()
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise EOFError("connection closed")
            decoded = line.decode("utf-8", "replace").rstrip("\r\n")
            if not decoded[:3].isdigit():
                raise _ProtocolError("malformed greeting reply")
            if not decoded.startswith("250"):
                raise _ProtocolError(f"{verb} refused")
            lines.append(decoded[4:])
            if decoded[3:4] != "-":
                break
        return {line.split()[0].upper() for line in lines[1:] if line.split()}

    async def command(self, verb: str, *options: str) -> Reply:
        line = " ".join((verb, *options))
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self.read_reply()

    async def close(self) -> None:
        """Say QUIT politely when the connection still works, then close it."""
        try:
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                await self.writer.drain()
                await asyncio.wait_for(self.read_reply(), 5)
        except (OSError, EOFError, TimeoutError, _ProtocolError, asyncio.IncompleteReadError):
            pass
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
