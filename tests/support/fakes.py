"""Stand-ins for tests of the filter's own logic: a scriptable LMTP/SMTP downstream, and
a key lookup, an engine and a deliverer with which ``MailFilter`` runs without sockets or gpg.

They stand in only where a test needs to choose the other side's answers; the end-to-end
tests use the real Dovecot, gpg and key stores.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from gpgfilter.mail.deliver import Reply
from gpgfilter.openpgp.engine import EngineError, Plaintext, Recipient, pieces
from keystore.model import EncryptionKey, StoredKey
from keystore.packets import TAG_PKESK, TAG_SEIPD, find_armor, key_id
from keystore.store import StoreError


def stored_key(fingerprint: str, *, expires: int | None = None) -> StoredKey:
    """A registered key as the filter sees it, with one encryption subkey (no real key data:
    only a real engine would need it)."""
    subkey = fingerprint[::-1]
    return StoredKey(fingerprint, b"", expires, (EncryptionKey(subkey, expires),), ())


@dataclass
class FakeLookup:
    """``KeyLookup`` from a dict; ``error`` is raised instead, after ``delay`` seconds."""

    keys: dict[str, list[StoredKey]] = field(default_factory=dict)
    error: StoreError | None = None
    delay: float = 0.0
    asked: list[str] = field(default_factory=list)

    async def keys_for(self, address: str) -> list[StoredKey]:
        self.asked.append(address)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return list(self.keys.get(address, []))


def _packet(tag: int, body: bytes) -> bytes:
    """An OpenPGP packet with a new-format header (five-octet length)."""
    return bytes([0xC0 | tag, 0xFF]) + len(body).to_bytes(4, "big") + body


@dataclass
class FakeEngine:
    """An ``Engine`` whose output has the form ``check_ciphertext`` demands (one session-key
    packet per encryption key, then integrity-protected data) but holds the plaintext in
    clear, so a test can read what would have been encrypted. Nothing here is encryption."""

    encrypted: list[tuple[bytes, Recipient]] = field(default_factory=list)
    error: EngineError | None = None

    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        if self.error is not None:
            raise self.error
        data = b"".join(bytes(piece) for piece in pieces(plaintext))
        self.encrypted.append((data, recipient))
        session_keys = b"".join(
            _packet(TAG_PKESK, b"\x03" + bytes.fromhex(key_id(f)) + b"\x01\x00\x08\xff")
            for f in recipient.encryption_keys
        )
        binary = session_keys + _packet(TAG_SEIPD, b"\x01" + data)
        text = base64.encodebytes(binary)
        return b"-----BEGIN PGP MESSAGE-----\n\n" + text + b"-----END PGP MESSAGE-----\n"

    @staticmethod
    def plaintext(armored: bytes) -> bytes:
        """What ``encrypt`` put into ``armored`` (the body of its last packet, version octet
        skipped)."""
        block = find_armor(armored)
        assert block is not None
        binary = block.data
        while binary[0] != 0xC0 | TAG_SEIPD:  # every packet here has a five-octet length
            binary = binary[6 + int.from_bytes(binary[2:6], "big") :]
        return binary[6 + 1 :]


@dataclass
class FakeDeliverer:
    """A ``Deliverer`` that accepts everything (or answers ``reply``) and records it."""

    reply: Reply = field(default_factory=lambda: Reply(250, "2.0.0 Saved"))
    sent: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes | Sequence[bytes],
        *,
        smtputf8: bool = False,
    ) -> list[Reply]:
        content = data if isinstance(data, bytes) else b"".join(data)
        self.sent.append((mail_from, list(recipients), content))
        return [self.reply] * len(recipients)

    async def close(self) -> None:
        pass


@dataclass
class Delivery:
    mail_from: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]


class _Chunking(SMTP):
    """BDAT (RFC 3030), which aiosmtpd lacks, as Dovecot's LMTP and Postfix's smtpd answer
    it: the chunk is always read; after ``BDAT n LAST`` the transaction ends as after DATA
    (one reply per recipient in LMTP), or with a single refusal when there is no MAIL or no
    accepted recipient."""

    _chunks: bytes = b""

    async def smtp_BDAT(self, arg: str | None) -> None:
        words = (arg or "").split()
        if not words or not words[0].isdigit() or len(words) > 2:
            await self.push("501 5.5.4 Syntax: BDAT size [LAST]")
            return
        self._chunks += await self._reader.readexactly(int(words[0]))
        if words[1:] != ["LAST"]:
            await self.push(f"250 2.0.0 {words[0]} octets received")
            return
        content, self._chunks = self._chunks, b""
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 MAIL needed first")
            return
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 No valid recipients")
            return
        self.envelope.content = self.envelope.original_content = content
        self.event_handler.chunked += 1
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


class _ChunkingSMTP(_Chunking):
    pass


class _ChunkingLMTP(_Chunking, LMTP):
    pass


@dataclass
class Downstream:
    """Records what it receives; ``codes`` maps a recipient to the reply it gets after DATA.
    With ``chunking`` it also offers CHUNKING (BDAT), as Dovecot and Postfix do."""

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
    chunking: bool = False
    chunked: int = 0  # transactions that ended with BDAT LAST

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
        offered = ["250-PIPELINING"] if self.pipelining else []  # aiosmtpd does not say so
        offered += ["250-CHUNKING"] if self.chunking else []
        return [*responses[:-1], *offered, *responses[-1:]]

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
        if self.chunking:
            cls: type[SMTP] = _ChunkingLMTP if self.lmtp else _ChunkingSMTP
        else:
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
