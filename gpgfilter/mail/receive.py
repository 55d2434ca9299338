"""Receiving mail from Postfix: an aiosmtpd SMTP or LMTP server in front of the filter.

LMTP answers once per recipient after DATA (RFC 2033 section 4.2); aiosmtpd's ``LMTP`` class
sends a single reply (aio-libs/aiosmtpd#517), so the handler pushes all but the last reply
itself and returns the last one. A single reply for several recipients would make Postfix wait
for the others, time out, and deliver the message again.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from gpgfilter.mail.deliver import Reply
from gpgfilter.mail.filter import TEMPORARY_FAILURE, MailFilter
from gpgfilter.mail.filter import Envelope as FilterEnvelope
from gpgfilter.process.config import Endpoint

log = logging.getLogger(__name__)

# Postfix splits lines at 998 octets, but a 5xx "line too long" would bounce the message, so
# accept anything a sane client sends; memory is bounded by the size limit, not by this.
_LINE_LIMIT = 1 << 20

# C0 controls (NUL, CR, LF, ESC...), DEL, C1 controls, and bytes that are no UTF-8 (aiosmtpd
# keeps them as lone surrogates): none belongs in an address, and each could forge or break
# a log line or the downstream's command.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# A path as Postfix writes nearly every one: ``<dot-atom@domain>`` and maybe parameters.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)", re.DOTALL
)

_END = b".\r\n"
# Replies held back for one write (see ``_BoundedData.push``), at most this many bytes.
_UNSENT_LIMIT = 1 << 16

TOO_BIG = Reply(552, "5.3.4 Message too big for this system")
TOO_LONG = Reply(500, "5.5.6 Line too long")
# The greeting of a connection past the listener's cap: Postfix defers and retries later.
TOO_MANY = Reply(421, "4.3.2 Too many connections, try again later")


class DataReader:
    """The body of DATA, fed in the pieces read from the client: dot-unstuffing as it
    streams, into one buffer, bounded. The buffer is a BytesIO because its ``getvalue()``
    hands over the bytes it grew without copying them: one copy of the message, not two.

    aiosmtpd (1.4) keeps every line as its own object until the end of data (~4x the message),
    and keeps the fragments of a line past its limit without any bound: an endless line grew
    memory with every byte. Here a message past ``max_size`` or a line past
    ``line_limit`` is noted and dropped as it arrives; reading goes on to the end of data so
    the client gets its answer at the right place in the dialogue.

    Each piece must end at the first ``.\\r\\n`` of the stream after the previous piece,
    or before it (what ``readuntil`` gives): only the end of a piece is looked at for the end
    of data.
    """

    def __init__(self, max_size: int, line_limit: int) -> None:
        self.max_size = max_size
        self.line_limit = line_limit
        self.content = io.BytesIO()
        self.size = 0
        self.too_big = False
        self.too_long = False
        self.done = False
        self._line = 0  # length of the current (unfinished) line so far
        self._tail = b"\r\n"  # the last two raw bytes; the data starts at a line start

    @property
    def refused(self) -> bool:
        return self.too_big or self.too_long

    def feed(self, piece: bytes) -> bool:
        """Take the next raw piece; True once the end of data was in it."""
        assert not self.done
        tail = self._tail
        if piece.endswith(_END) and _last_two(tail, piece[-5:-3]) == b"\r\n":
            self.done = True
            piece = piece[:-3]
        self._tail = _last_two(tail, piece[-2:])
        self._check_lines(piece)
        if self.refused:
            return self.done
        piece = _unstuff(tail, piece)
        self.size += len(piece)
        if self.size > self.max_size:
            self.too_big = True
            self.content = io.BytesIO()  # let go of it now, not at the end of data
        else:
            self.content.write(piece)
        return self.done

    def _check_lines(self, piece: bytes) -> None:
        first = piece.find(b"\n")
        if first < 0:
            self._line += len(piece)
        else:
            longest = self._line + first
            last = piece.rfind(b"\n")
            if last - first > self.line_limit:  # only a piece longer than the limit
                start = first + 1
                while start <= last:
                    end = piece.index(b"\n", start)
                    longest = max(longest, end - start)
                    start = end + 1
            self._line = len(piece) - last - 1
            if longest > self.line_limit:
                self.too_long = True
        if self._line > self.line_limit:
            self.too_long = True
        if self.too_long:
            self.content = io.BytesIO()


def _last_two(tail: bytes, end: bytes) -> bytes:
    """The last two bytes of ``tail`` followed by ``end`` (``end`` is at most two bytes)."""
    return (tail + end)[-2:]


def _unstuff(tail: bytes, piece: bytes) -> bytes:
    """Remove the dot that starts each line of ``piece`` (RFC 5321 section 4.5.2);
    ``tail`` is the raw bytes before it."""
    if tail == b"\r\n" and piece[:1] == b".":
        piece = piece[1:]
    elif tail.endswith(b"\r") and piece[:2] == b"\n.":
        piece = piece[:1] + piece[2:]
    return piece.replace(b"\r\n.", b"\r\n")


async def read_data(reader: asyncio.StreamReader, data: DataReader) -> None:
    """Read to the end of data, never holding more than the reader's limit (plus the
    message, while it is within the size limit). Pipelined commands after the end of data
    stay in ``reader``."""
    while True:
        try:
            piece = await reader.readuntil(_END)
        except asyncio.LimitOverrunError as overrun:
            piece = await reader.read(overrun.consumed)
        if data.feed(piece):
            return


class _BoundedData(SMTP):
    """aiosmtpd with a DATA reader whose memory is bounded, which refuses control
    characters in envelope addresses, and which answers once per recipient in LMTP."""

    line_length_limit = _LINE_LIMIT
    # Gives the connection's slot back to the listener's cap (see ``listen``).
    release_slot: Callable[[], None] | None = None
    # Replies not yet written (see ``push``), and whether a write of them is scheduled.
    _unsent: list[bytes] | None = None
    _unsent_size = 0

    async def push(self, status: str | bytes) -> None:
        """Write replies together: with PIPELINING Postfix sends MAIL, RCPT and DATA at once,
        and one write per reply made a syscall (and the client's wake-up) each. A positive
        reply waits until this connection's task has to wait for anything (the next
        command, the message, the downstream): the write is a loop callback, run as soon as
        the task yields. A refusal, 221 and 421 (the connection may close right after), and
        a backlog past 64 KB go out at once, with whatever waits before them."""
        response = status.encode("utf-8") if isinstance(status, str) else status
        unsent = self._unsent
        if unsent is None:
            unsent = self._unsent = []
        unsent.append(response + b"\r\n")
        self._unsent_size += len(response) + 2
        if response[:1] in (b"2", b"3") and not response.startswith(b"221"):
            if len(unsent) == 1:
                self.loop.call_soon(self._write_unsent)
            if self._unsent_size > _UNSENT_LIMIT:
                self._write_unsent()
        else:
            self._write_unsent()
        await self._writer.drain()  # waits only while the client does not read

    def _write_unsent(self) -> None:
        unsent = self._unsent
        if unsent:
            self._unsent = []
            self._unsent_size = 0
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(b"".join(unsent))

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            release, self.release_slot = self.release_slot, None
            if release is not None:
                release()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's answer, without its RFC 5322 parser (a tenth of the filter's time per
        message went there) for the plain paths Postfix sends; anything else still goes to
        it. A property test holds the two to the same answers."""
        found = _PLAIN_PATH.fullmatch(arg.lstrip()) if arg else None
        rest = found.group(2).lstrip(" \t") if found else ""
        if found is None or rest.startswith("("):  # a comment: the full parser's business
            return super()._getaddr(arg)
        address = found.group(1)
        if self.local_part_limit and address.rindex("@") > self.local_part_limit:
            return None, None
        return address, rest

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and _CONTROL.search(arg):
            await self.push("501 5.1.7 Control character in the sender address")
            return
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and _CONTROL.search(arg):
            await self.push("501 5.1.3 Control character in the recipient address")
            return
        await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = DataReader(self.data_size_limit or (1 << 62), self.line_length_limit)
        try:
            await read_data(self._reader, data)
        except asyncio.CancelledError:  # the connection went away during DATA
            self._writer.close()
            raise
        if data.refused:
            reply = TOO_LONG if data.too_long else TOO_BIG
            for _ in self._replies_due()[1:]:
                await self.push(str(reply))
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(reply))
            return
        content = data.content.getvalue()
        del data
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status if isinstance(status, str) else "250 OK")

    def _replies_due(self) -> list[str]:
        """One entry per reply owed after the end of data: one in SMTP."""
        assert self.envelope is not None
        return ["transaction"]


class _SMTPServer(_BoundedData):
    pass


class _LMTPServer(_BoundedData, LMTP):
    def _replies_due(self) -> list[str]:
        assert self.envelope is not None
        return list(self.envelope.rcpt_tos)


def transaction_reply(replies: Sequence[Reply]) -> Reply:
    """SMTP's single answer for a whole transaction.

    Any temporary failure defers it all (nothing is lost; Postfix retries). Otherwise a
    permanent refusal is passed on. Only when every recipient succeeded do we say 250.
    """
    for reply in replies:
        if reply.temporary:
            return reply
    for reply in replies:
        if not reply.ok:
            return reply
    return replies[0] if replies else TEMPORARY_FAILURE


class Handler:
    """aiosmtpd handler: turns a received transaction into a filter call and its replies."""

    def __init__(self, mail_filter: MailFilter, *, lmtp: bool, max_size: int) -> None:
        # Replaced on a configuration reload; a transaction keeps the filter it started with.
        self.filter = mail_filter
        self.lmtp = lmtp
        self.max_size = max_size
        # Set when stopping: Postfix keeps its connections open between messages, so closing
        # the listener alone would not stop new ones arriving on them.
        self.closing = False

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO/LHLO answer plus PIPELINING (RFC 2920), which its command loop
        handles but does not announce: without it Postfix waits for each reply before the
        next command, four round trips per message instead of one or two."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", *responses[-1:]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.closing:
            return "421 4.3.2 gpgfilter is shutting down, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipients = tuple(envelope.rcpt_tos)
        mail_filter = self.filter
        try:
            mail_from = envelope.mail_from or ""
            if mail_from == "<>":  # aiosmtpd reports the null reverse path as "<>"
                mail_from = ""
            content = envelope.original_content or b""
            if len(content) > self.max_size:
                replies = [TOO_BIG] * len(recipients)
            else:
                replies = await mail_filter.process(
                    FilterEnvelope(mail_from, recipients, content, bool(envelope.smtp_utf8))
                )
        except Exception:
            log.exception("internal error while receiving a message; deferring it")
            replies = [TEMPORARY_FAILURE] * len(recipients)
        if not self.lmtp:
            return str(transaction_reply(replies))
        for reply in replies[:-1]:
            await server.push(str(reply))
        return str(replies[-1]) if replies else str(TEMPORARY_FAILURE)

    async def handle_exception(self, error: Exception) -> str:
        log.error("protocol error: %s", type(error).__name__)
        return "421 4.3.0 Internal error, closing connection"


async def start_server(
    handler: Handler,
    endpoint: Endpoint,
    *,
    hostname: str,
    data_size_limit: int,
    max_connections: int,
) -> asyncio.AbstractServer:
    """Listen on ``endpoint`` for Postfix; a message past ``data_size_limit`` is refused
    (552, once per recipient in LMTP) while it streams, a connection past
    ``max_connections`` open at once is refused (421) at once."""
    return await listen(
        handler,
        endpoint,
        lmtp=handler.lmtp,
        hostname=hostname,
        data_size_limit=data_size_limit,
        max_connections=max_connections,
        ident="gpgfilter",
    )


class _Refused(asyncio.Protocol):
    """A connection past the cap: the 421 greeting, then the close. It reads nothing and holds
    no buffer, so a flood of connections costs no more than accepting them."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.WriteTransport subclass (uvloop's
        # is not): an isinstance check would close the connection without the 421.
        typing.cast(asyncio.WriteTransport, transport).write(f"{TOO_MANY}\r\n".encode())
        transport.close()


class _Slots:
    """Connections open on one listener, at most ``limit``: memory per connection is bounded
    (by the size limit), so this bounds the listener's memory in total."""

    def __init__(self, limit: int, ident: str) -> None:
        self.limit = limit
        self.ident = ident
        self.open = 0
        self.full = False

    def take(self) -> bool:
        if self.open >= self.limit:
            if not self.full:  # once per episode, not once per refused connection
                log.warning(
                    "%s: %d connections open, the most allowed: refusing new ones (421)",
                    self.ident,
                    self.limit,
                )
            self.full = True
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
        if self.full and self.open < self.limit:
            self.full = False
            log.info("%s: accepting connections again", self.ident)


async def listen(
    handler: object,
    endpoint: Endpoint,
    *,
    lmtp: bool,
    hostname: str,
    data_size_limit: int,
    max_connections: int,
    ident: str,
) -> asyncio.AbstractServer:
    """An aiosmtpd SMTP or LMTP server on ``endpoint``; each connection gets its own protocol
    instance, raw bytes (no decoding), SMTPUTF8, and memory bounded by ``data_size_limit``
    whatever the client sends. With ``max_connections`` open, a new connection gets 421 and
    is closed: in total the listener holds at most ``max_connections * data_size_limit``."""
    loop = asyncio.get_running_loop()
    chosen: Any = _LMTPServer if lmtp else _SMTPServer
    # Counted from the protocol's creation, not its connection_made: asyncio may accept a
    # whole backlog of connections before any of them is made.
    slots = _Slots(max_connections, ident)

    def factory() -> asyncio.Protocol:
        if not slots.take():
            return _Refused()
        try:
            server: _BoundedData = chosen(
                handler,
                data_size_limit=data_size_limit,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=hostname,
                ident=ident,
                loop=loop,
            )
        except BaseException:
            slots.release()
            raise
        server.release_slot = slots.release
        return server

    if endpoint.is_unix:
        server = await loop.create_unix_server(factory, endpoint.path)
        # Postfix's LMTP client (user postfix) must be able to connect, as to a loopback port,
        # which any local user can reach: who may deliver is the directory's permissions'
        # business (Dovecot's LMTP socket is made the same way).
        os.chmod(endpoint.path, 0o666)  # noqa: S103
        return server
    return await loop.create_server(factory, endpoint.host, endpoint.port, reuse_address=True)
