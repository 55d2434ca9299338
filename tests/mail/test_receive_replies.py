"""How the listener writes its replies: pipelined commands get their replies in one write.

Each write is a syscall that also does the client's (Postfix's) loopback TCP work; with
PIPELINING Postfix sends MAIL, RCPT and DATA together, so their three replies must go out
together. The running-process checks (PIPELINING announced, order of replies, a 221 after
pipelined commands) are in ``test_receive_attacks.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gpgfilter.mail.filter import MailFilter
from gpgfilter.mail.receive import Handler, listen
from gpgfilter.process.config import Endpoint


class _CountingWriter:
    """The server's stream writer, recording each write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.writer.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


class _Recording(Handler):
    """Puts a counting writer on the connection when the first MAIL comes in (before any of
    the pipelined replies is written)."""

    writer: _CountingWriter | None = None

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.writer is None:
            self.writer = _CountingWriter(server._writer)
            server._writer = self.writer  # type: ignore[assignment]
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


async def _replies(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    return [(await reader.readline()).rstrip() for _ in range(count)]


async def test_pipelined_envelope_replies_go_out_in_one_write() -> None:
    handler = _Recording(MailFilter.__new__(MailFilter), lmtp=True, max_size=1 << 20)
    server = await listen(
        handler,
        Endpoint("127.0.0.1", 0),
        lmtp=True,
        hostname="t",
        data_size_limit=1 << 20,
        max_connections=4,
        ident="test",
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()  # greeting
        writer.write(b"LHLO t\r\n")
        hello = []
        while not (line := await reader.readline()).startswith(b"250 "):
            hello.append(line)
        assert b"250-PIPELINING\r\n" in hello
        writer.write(
            b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
            b"RCPT TO:<c@example.test>\r\nDATA\r\n"
        )
        replies = await asyncio.wait_for(_replies(reader, 4), 10)
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
        assert handler.writer is not None
        assert len(handler.writer.writes) == 1, handler.writer.writes
        # A refusal is not held back behind the next command: it goes out at once.
        writer.write(b".\r\n")  # an empty message: no downstream in this test, so 4xx each
        await asyncio.wait_for(_replies(reader, 2), 10)
        writer.write(b"RSET\r\nNOOP\r\nQUIT\r\n")
        replies = await asyncio.wait_for(_replies(reader, 3), 10)
        assert [r[:3] for r in replies] == [b"250", b"250", b"221"]
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after the 221
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
