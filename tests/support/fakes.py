"""A scriptable LMTP/SMTP downstream for tests of the filter's own logic.

It stands in for Dovecot only where a test needs to choose the downstream's answers; the
end-to-end tests use the real Dovecot.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Delivery:
    mail_from: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class Downstream:
    """Records what it receives; ``codes`` maps a recipient to the reply it gets after DATA."""

    lmtp: bool = True
    codes: dict[str, str] = field(default_factory=dict)
    rcpt_codes: dict[str, str] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    hellos: int = 0
    pipelining: bool = True
    mail_code: str = ""
    connections: list[SMTP] = field(default_factory=list)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.hellos += 1
        session.host_name = hostname
        if not self.pipelining:
            responses = [r for r in responses if "PIPELINING" not in r]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_code:
            return self.mail_code
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        code = self.rcpt_codes.get(address)
        if code:
            return code
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None
        accepted = [r for r in envelope.rcpt_tos if self.codes.get(r, "250").startswith("2")]
        if accepted:
            self.deliveries.append(
                Delivery(
                    str(envelope.mail_from),
                    accepted,
                    envelope.original_content,
                    list(envelope.mail_options),
                )
            )
        replies = [self.codes.get(r, f"250 2.0.0 <{r}> Saved") for r in envelope.rcpt_tos]
        if not self.lmtp:
            return replies[0]
        for reply in replies[:-1]:
            await server.push(reply)
        return replies[-1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cls = LMTP if self.lmtp else SMTP

        def factory() -> SMTP:
            protocol = cls(self, enable_SMTPUTF8=True, decode_data=False, loop=loop)
            self.connections.append(protocol)
            return protocol

        self.server = await loop.create_server(
            factory,
            "127.0.0.1",
            self.port,
            reuse_address=True,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for protocol in self.connections:  # a stopped server drops its clients too
                if protocol.transport is not None:
                    protocol.transport.close()
            await self.server.wait_closed()
