"""The mail side of the Web Key Service: Postfix hands mail for the submission address to this
LMTP (or SMTP) listener, which feeds it to :class:`keystore.wks.WksServer`.

The reply tells Postfix what became of the message, so nothing is lost and nothing loops:

- 250 once it was processed, and the mail it calls for (the confirmation request) was accepted
  by the relay; also for what is no WKS message at all, which is dropped with a log line (a
  refusal would make Postfix bounce spam back to forged senders);
- 550 with the precise reason for a WKS message that is refused (a key without the sender's
  user ID, an unknown or expired confirmation): Postfix tells the sender why;
- 451 for a failure on our side (gpg, the key store, the relay): Postfix retries.
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import SMTP, Envelope, Session

from gpgfilter.config import Config, Endpoint
from gpgfilter.deliver import MailClient
from gpgfilter.receive import listen
from keystore.store import KeyStore
from keystore.wks import MAX_MESSAGE_BYTES, Send, ServiceKey, WksIgnored, WksRejected, WksServer

log = logging.getLogger(__name__)

_TEMPORARY = "451 4.3.0 Key submission could not be processed now, try again later"


class WksHandler:
    """aiosmtpd handler accepting mail for the submission address only."""

    def __init__(self, server: WksServer, send: Send, *, lmtp: bool = True) -> None:
        self.server = server
        self.send = send
        self.lmtp = lmtp

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.lower() != self.server.address:
            return "550 5.1.1 Not the key submission address"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await self._process(envelope.original_content or b"")
        if self.lmtp:  # one reply per recipient (RFC 2033); all get the same one
            for _ in envelope.rcpt_tos[1:]:
                await server.push(reply)
        return reply

    async def _process(self, content: bytes) -> str:
        if len(content) > MAX_MESSAGE_BYTES:
            return "552 5.3.4 Message too big for a key submission"
        try:
            await self.server.process(content, self.send)
        except WksIgnored as ignored:
            log.info("WKS: dropped a message that is no WKS request (%s)", ignored)
            return "250 2.0.0 Dropped: not a key submission"
        except WksRejected as rejected:
            log.info("WKS: refused a message: %s", rejected)
            reason = " ".join(str(rejected).split())[:400]
            return f"550 5.7.0 {reason}"
        except Exception as error:
            log.error("WKS: processing failed, deferred: %s", type(error).__name__)
            return _TEMPORARY
        return "250 2.0.0 Key submission processed"


def relay_sender(client: MailClient) -> Send:
    """A :data:`Send` handing mail to an SMTP server (Postfix); raises unless all accepted."""

    async def send(mail_from: str, recipients: list[str], data: bytes) -> None:
        smtputf8 = not all(address.isascii() for address in recipients)
        replies = await client.send(mail_from, recipients, data, smtputf8=smtputf8)
        refused = [reply for reply in replies if not reply.ok]
        if refused:
            raise OSError(f"relay refused the message: {refused[0].code}")

    return send


async def start_wks_listener(
    handler: WksHandler, endpoint: Endpoint, *, hostname: str
) -> asyncio.AbstractServer:
    return await listen(
        handler,
        endpoint,
        lmtp=handler.lmtp,
        hostname=hostname,
        data_size_limit=MAX_MESSAGE_BYTES,
        ident="gpgfilter-wks",
    )


def wks_from_config(config: Config, store: KeyStore) -> tuple[WksServer, MailClient]:
    """The WKS server and its relay client as ``config.publication`` describes them; the
    submission key is made on first use. Blocking (gpg): call it before the event loop runs
    or in a thread."""
    publication = config.publication
    if not publication.domains:
        raise ValueError("publication.domains is empty: nothing to publish")
    key = ServiceKey.open(config.wks_home, publication.submission, gpg_binary=config.gpg.binary)
    server = WksServer(
        store=store,
        service_key=key,
        domains=publication.domains,
        token_ttl=publication.token_ttl,
        gpg_binary=config.gpg.binary,
    )
    client = MailClient(
        publication.wks_relay, lmtp=False, helo=config.hostname, timeout=config.delivery_timeout
    )
    return server, client
