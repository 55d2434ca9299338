"""Receiving mail from Postfix: an aiosmtpd SMTP or LMTP server in front of the filter.

LMTP answers once per recipient after DATA (RFC 2033 section 4.2); aiosmtpd's ``LMTP`` class
sends a single reply (aio-libs/aiosmtpd#517), so the handler pushes all but the last reply
itself and returns the last one. A single reply for several recipients would make Postfix wait
for the others, time out, and deliver the message again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from gpgfilter.mail.deliver import Reply
from gpgfilter.mail.filter import TEMPORARY_FAILURE, MailFilter
from gpgfilter.mail.filter import Envelope as FilterEnvelope
from gpgfilter.process.config import Endpoint

log = logging.getLogger(__name__)

# Postfix splits lines at 998 octets, but a 5xx "line too long" would bounce the message, so
# accept anything a sane client sends; the size limit still bounds memory.
_LINE_LIMIT = 1 << 20


class _SMTPServer(SMTP):
    line_length_limit = _LINE_LIMIT


class _LMTPServer(LMTP):
    line_length_limit = _LINE_LIMIT


TOO_BIG = Reply(552, "5.3.4 Message too big for this system")


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
) -> asyncio.AbstractServer:
    """Listen on ``endpoint`` for Postfix.

    With LMTP the size limit is the handler's, which can answer once per recipient: aiosmtpd's
    own limit answers once per message, which an LMTP client would wait on in vain. aiosmtpd
    keeps a looser limit (twice as much) only to bound memory.
    """
    if handler.lmtp:
        data_size_limit *= 2
    return await listen(
        handler,
        endpoint,
        lmtp=handler.lmtp,
        hostname=hostname,
        data_size_limit=data_size_limit,
        ident="gpgfilter",
        protocol_class=_LMTPServer if handler.lmtp else _SMTPServer,
    )


async def listen(
    handler: object,
    endpoint: Endpoint,
    *,
    lmtp: bool,
    hostname: str,
    data_size_limit: int,
    ident: str,
    protocol_class: type[SMTP] | None = None,
) -> asyncio.AbstractServer:
    """An aiosmtpd SMTP or LMTP server on ``endpoint``; each connection gets its own protocol
    instance, raw bytes (no decoding) and SMTPUTF8."""
    loop = asyncio.get_running_loop()
    chosen: Any = protocol_class or (LMTP if lmtp else SMTP)

    def factory() -> SMTP:
        server: SMTP = chosen(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident=ident,
            loop=loop,
        )
        return server

    if endpoint.is_unix:
        return await loop.create_unix_server(factory, endpoint.path)
    return await loop.create_server(factory, endpoint.host, endpoint.port, reuse_address=True)
