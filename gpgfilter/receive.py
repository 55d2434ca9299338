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

from gpgfilter.config import Endpoint
from gpgfilter.deliver import Reply
from gpgfilter.filter import TEMPORARY_FAILURE, MailFilter
from gpgfilter.filter import Envelope as FilterEnvelope

log = logging.getLogger(__name__)

# Postfix splits lines at 998 octets, but a 5xx "line too long" would bounce the message, so
# accept anything a sane client sends; the size limit still bounds memory.
_LINE_LIMIT = 1 << 20


class _SMTPServer(SMTP):
    line_length_limit = _LINE_LIMIT


class _LMTPServer(LMTP):
    line_length_limit = _LINE_LIMIT


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

    def __init__(self, mail_filter: MailFilter, *, lmtp: bool) -> None:
        self.filter = mail_filter
        self.lmtp = lmtp

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipients = tuple(envelope.rcpt_tos)
        try:
            mail_from = envelope.mail_from or ""
            if mail_from == "<>":  # aiosmtpd reports the null reverse path as "<>"
                mail_from = ""
            content = envelope.original_content or b""
            replies = await self.filter.process(
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
    """Listen on ``endpoint``; each connection gets its own protocol instance."""
    loop = asyncio.get_running_loop()
    protocol_class: Any = _LMTPServer if handler.lmtp else _SMTPServer

    def factory() -> SMTP:
        server: SMTP = protocol_class(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="gpgfilter",
            loop=loop,
        )
        return server

    if endpoint.is_unix:
        return await loop.create_unix_server(factory, endpoint.path)
    return await loop.create_server(factory, endpoint.host, endpoint.port, reuse_address=True)
