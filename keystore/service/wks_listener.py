"""The mail side of the Web Key Service: Postfix hands mail for the submission address to this
LMTP (or SMTP) listener, which feeds it to :class:`keystore.service.wks.WksServer`.

The reply tells Postfix what became of the message, so nothing is lost and nothing loops:

- 250 once it was processed, and the mail it calls for (the confirmation request) was accepted
  by the relay; also for what is no WKS message at all, which is dropped with a log line (a
  refusal would make Postfix bounce spam back to forged senders);
- 550 with the precise reason for a WKS message that is refused (a key without the sender's
  user ID, an unknown or expired confirmation): Postfix tells the sender why;
- 451 for a failure on our side (gpg, the key store, the relay) or a busy service: Postfix
  retries. A message we cannot read is never that: retrying the same bytes cannot help, so it
  is refused (550) with the reason.
"""

from __future__ import annotations

import logging

from aiosmtpd.smtp import SMTP, Envelope, Session

from keystore.logsafe import escape
from keystore.service.outbound import Send
from keystore.service.wks import (
    MAX_MESSAGE_BYTES,
    WksDeferred,
    WksIgnored,
    WksRejected,
    WksServer,
)

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
            return f"550 5.7.0 {_reason(rejected)}"
        except WksDeferred as deferred:
            log.warning("WKS: deferred a message: %s", deferred)
            return f"451 4.3.2 {_reason(deferred)}"
        except Exception as error:
            log.error("WKS: processing failed, deferred: %s", type(error).__name__)
            return _TEMPORARY
        return "250 2.0.0 Key submission processed"


def _reason(error: Exception) -> str:
    """The reason on one line of printable text: it may quote what the sender wrote."""
    return escape(" ".join(str(error).split()), 400)
