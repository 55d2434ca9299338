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
from collections.abc import Sequence
from dataclasses import dataclass

from gpgfilter.config import Endpoint

_BARE_LF = re.compile(rb"(?<!\r)\n")


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
    data = _BARE_LF.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class MailClient:
    """One transaction per call, on a fresh connection (SMTP, or LMTP with ``lmtp=True``)."""

    def __init__(self, endpoint: Endpoint, *, lmtp: bool, helo: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.lmtp = lmtp
        self.helo = helo
        self.timeout = timeout

    async def send(
        self, mail_from: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool = False
    ) -> list[Reply]:
        """Deliver ``data``; returns one reply per recipient, in order.

        Replies already received stay valid when the connection fails later: an LMTP server that
        said 250 for the first recipient has delivered to it, whatever happens to the others.
        """
        replies: list[Reply | None] = [None] * len(recipients)
        fallback = UNAVAILABLE
        try:
            await asyncio.wait_for(
                self._transaction(mail_from, recipients, data, smtputf8, replies), self.timeout
            )
        except (OSError, asyncio.IncompleteReadError, TimeoutError, EOFError):
            pass
        except _ProtocolError:
            fallback = PROTOCOL_ERROR
        return [reply or fallback for reply in replies]

    async def _transaction(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        smtputf8: bool,
        replies: list[Reply | None],
    ) -> None:
        """Fill ``replies`` with final answers as they arrive; None means "not final yet"."""
        if self.endpoint.is_unix:
            reader, writer = await asyncio.open_unix_connection(self.endpoint.path)
        else:
            reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        session = _Session(reader, writer)
        try:
            greeting = await session.read_reply()
            if not greeting.ok:
                replies[:] = [greeting] * len(recipients)
                return
            extensions = await session.hello(self.helo, self.lmtp)
            options = []
            if "8BITMIME" in extensions and not data.isascii():
                options.append("BODY=8BITMIME")
            if smtputf8 and "SMTPUTF8" in extensions:
                options.append("SMTPUTF8")
            if "SIZE" in extensions:
                options.append(f"SIZE={len(data)}")
            mail = await session.command(f"MAIL FROM:<{mail_from}>", *options)
            if not mail.ok:
                replies[:] = [mail] * len(recipients)
                return
            accepted: list[int] = []
            for index, recipient in enumerate(recipients):
                reply = await session.command(f"RCPT TO:<{recipient}>")
                if reply.ok:
                    accepted.append(index)
                else:
                    replies[index] = reply
            if not accepted:
                return
            start = await session.command("DATA")
            if start.code != 354:
                for index in accepted:
                    replies[index] = start
                return
            writer.write(to_wire(data))
            await writer.drain()
            if self.lmtp:
                for index in accepted:
                    replies[index] = await session.read_reply()
            else:
                final = await session.read_reply()
                for index in accepted:
                    replies[index] = final
        finally:
            await session.close()


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

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
