"""Tests of the mail-stack harness (tests/support/mailstack.py) with real Postfix and Dovecot.

They pin the transport behaviour gpgfilter is built against: what Postfix and Dovecot add to
a message, how one LMTP transaction can end 250 / 452 / 550 per recipient, and that the
documented integration snippets (postfix/) work with a filter in between. Each stack is
started once per module; every test uses mailboxes of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import smtplib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support import mailstack
from tests.support.mailstack import Dovecot, Postfix, free_port, require_mail_stack, stop_all

require_mail_stack()

pytestmark = pytest.mark.e2e

DOMAIN = "example.org"
FULL = 0  # quota_bytes for a mailbox that has no room at all

# Every test has mailboxes of its own; quota users start full.
USERS: dict[str, int | None] = {
    "alice": None,  # (a)
    "sender-a": None,
    "carol": None,  # (b)
    "dave": FULL,
    "sender-b": None,
    "lmtp-one": None,  # (c), LMTP mode
    "sender-l": None,
    "lmtp-ok": None,
    "lmtp-full": FULL,
    "sender-l3": None,
    "cf-one": None,  # (c), content-filter mode
    "sender-c": None,
}


def addr(local: str) -> str:
    return f"{local}@{DOMAIN}"


def message(to: str, subject: str) -> bytes:
    """A complete message (Date, Message-ID, From present: Postfix then adds nothing but
    Received), with 8-bit UTF-8, a leading dot, trailing white space and a long line."""
    return (
        f"From: Sender <sender@{DOMAIN}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Grüße aus dem Test\r\n"
        ".a line that starts with a dot\r\n"
        "trailing space \r\n"
        "\tleading tab\r\n" + "x" * 900 + "\r\n"
    ).encode()


def added_headers(stored: bytes, original: bytes) -> list[str]:
    """Names of the header fields the transport put in front of *original*, top first."""
    assert stored.endswith(original), "message changed in transit"
    prefix = stored[: len(stored) - len(original)]
    return [
        line.split(b":", 1)[0].decode()
        for line in prefix.split(b"\r\n")
        if line and not line[:1].isspace()
    ]


def dsn_recipients(dsn: bytes) -> list[str]:
    """Final-Recipient addresses of a delivery status notification."""
    return re.findall(r"^Final-Recipient: rfc822; ?(\S+)\r?$", dsn.decode(errors="replace"), re.M)


# --------------------------------------------------------------------------------------------
# trivial pass-through filters


def reverse_path(envelope: Envelope) -> str:
    """The envelope sender, "" for the null sender (aiosmtpd reports that one as "<>";
    passing "<>" on to a client that adds its own brackets would send MAIL FROM:<<>>)."""
    return "" if envelope.mail_from in (None, "<>") else envelope.mail_from


@dataclass
class Transaction:
    mail_from: str
    rcpt_tos: list[str]
    replies: list[str] = field(default_factory=list)


class LmtpPassThrough:
    """LMTP in, LMTP out to Dovecot, Dovecot's answer relayed once per recipient."""

    def __init__(self, dovecot_port: int) -> None:
        self.dovecot_port = dovecot_port
        self.seen: list[Transaction] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        seen = Transaction(reverse_path(envelope), list(envelope.rcpt_tos))
        self.seen.append(seen)
        loop = asyncio.get_running_loop()
        seen.replies = await loop.run_in_executor(
            None, self._deliver, seen.mail_from, seen.rcpt_tos, envelope.original_content
        )
        return "\r\n".join(seen.replies)

    def _deliver(self, mail_from: str, rcpts: list[str], data: bytes) -> list[str]:
        replies: dict[str, str] = {}
        with smtplib.LMTP("127.0.0.1", self.dovecot_port) as lmtp:
            lmtp.ehlo("filter.test")
            lmtp.mail(mail_from)
            accepted = []
            for rcpt in rcpts:
                code, text = lmtp.rcpt(rcpt)
                if code == 250:
                    accepted.append(rcpt)
                else:
                    replies[rcpt] = f"{code} {text.decode()}"
            if accepted:
                code, text = lmtp.data(data)
                replies[accepted[0]] = f"{code} {text.decode()}"
                for rcpt in accepted[1:]:
                    code, text = lmtp.getreply()
                    replies[rcpt] = f"{code} {text.decode()}"
        return [replies[r].replace("\n", " ") for r in rcpts]


class SmtpPassThrough:
    """SMTP in, reinjected unchanged into Postfix's reinjection smtpd."""

    def __init__(self) -> None:
        self.reinject_port: int | None = None
        self.seen: list[Transaction] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        seen = Transaction(reverse_path(envelope), list(envelope.rcpt_tos))
        self.seen.append(seen)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None, self._reinject, seen.mail_from, seen.rcpt_tos, envelope.original_content
            )
        except (OSError, smtplib.SMTPException) as exc:
            return f"451 4.3.0 reinjection failed: {exc}"
        return "250 2.0.0 reinjected"

    def _reinject(self, mail_from: str, rcpts: list[str], data: bytes) -> None:
        assert self.reinject_port is not None
        with smtplib.SMTP("127.0.0.1", self.reinject_port, "filter.test") as smtp:
            smtp.sendmail(mail_from, rcpts, data)


class LmtpController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


# --------------------------------------------------------------------------------------------
# fixtures: one Dovecot, three Postfix instances, each started once


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    server = Dovecot(tmp_path_factory.mktemp("dovecot"))
    for local, quota in USERS.items():
        server.add_user(addr(local), quota_bytes=quota)
    with server:
        yield server


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> Iterator[Postfix]:
    postfix = Postfix(
        tmp_path_factory.mktemp("postfix-direct"),
        mode="direct",
        dovecot_lmtp_port=dovecot.lmtp_port,
        domains=[DOMAIN],
    )
    with postfix:
        yield postfix


@pytest.fixture(scope="module")
def lmtp_stack(
    tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot
) -> Iterator[tuple[Postfix, LmtpPassThrough]]:
    port = free_port()
    handler = LmtpPassThrough(dovecot.lmtp_port)
    postfix = Postfix(
        tmp_path_factory.mktemp("postfix-lmtp"),
        mode="lmtp",
        dovecot_lmtp_port=dovecot.lmtp_port,
        domains=[DOMAIN],
        filter_port=port,
    )
    controller = LmtpController(handler, hostname="127.0.0.1", port=port)
    with contextlib.ExitStack() as stack:
        controller.start()
        stack.callback(controller.stop)
        stack.enter_context(postfix)
        yield postfix, handler


@pytest.fixture(scope="module")
def content_filter_stack(
    tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot
) -> Iterator[tuple[Postfix, SmtpPassThrough]]:
    port = free_port()
    handler = SmtpPassThrough()
    postfix = Postfix(
        tmp_path_factory.mktemp("postfix-cf"),
        mode="content_filter",
        dovecot_lmtp_port=dovecot.lmtp_port,
        domains=[DOMAIN],
        filter_port=port,
    )
    handler.reinject_port = postfix.reinject_port
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    with contextlib.ExitStack() as stack:
        controller.start()
        stack.callback(controller.stop)
        stack.enter_context(postfix)
        yield postfix, handler


# --------------------------------------------------------------------------------------------
# (a) direct: Postfix -> Dovecot


def test_direct_delivery_keeps_the_message_bytes(direct: Postfix, dovecot: Dovecot) -> None:
    rcpt, sender = addr("alice"), addr("sender-a")
    original = message(rcpt, "direct bytes")

    direct.send(sender, [rcpt], original)

    [stored] = dovecot.wait_for(rcpt, 1)
    # Dovecot's LMTP adds Return-Path, Delivered-To and a Received of its own on top of
    # Postfix's Received; everything below is what the client sent, byte for byte.
    assert added_headers(stored, original) == [
        "Return-Path",
        "Delivered-To",
        "Received",
        "Received",
    ]
    assert stored.startswith(f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode())
    assert b"with LMTP" in stored.split(b"\r\nReceived: ")[1]
    direct.wait_queue_empty()
    dovecot.delete_all(rcpt)
    assert dovecot.fetch_all(rcpt) == []


# --------------------------------------------------------------------------------------------
# (b) direct: one transaction, three outcomes


def test_direct_250_452_550_in_one_transaction(direct: Postfix, dovecot: Dovecot) -> None:
    ok, full, unknown, sender = addr("carol"), addr("dave"), addr("nobody"), addr("sender-b")
    original = message(ok, "three outcomes")

    direct.send(sender, [ok, full, unknown], original)

    # 250: delivered.
    [stored] = dovecot.wait_for(ok, 1)
    assert stored.endswith(original)
    # 550 at RCPT TO: bounced, the DSN (null sender) lands in the sender's mailbox.
    [dsn] = dovecot.wait_for(sender, 1)
    assert dsn.startswith(b"Return-Path: <>\r\n")
    assert dsn_recipients(dsn) == [unknown]
    assert b"550 5.1.1" in dsn
    direct.wait_log(rf"to=<{re.escape(unknown)}>.*status=bounced .*in reply to RCPT TO command")
    # 452 after DATA (lmtp_rcpt_check_quota = no): deferred, still queued.
    direct.wait_log(
        rf"to=<{re.escape(full)}>.*dsn=4\.2\.2, status=deferred .* said: 452 4\.2\.2 .*"
        r"Quota exceeded.*in reply to end of DATA command"
    )
    assert len(direct.queue_ids()) == 1
    assert dovecot.fetch_all(full) == []

    # Room again, retry now: delivered exactly once, queue empty, nothing else sent twice.
    dovecot.set_quota(full, None)
    direct.flush()
    [late] = dovecot.wait_for(full, 1)
    assert late.endswith(original)
    direct.wait_queue_empty()
    assert len(dovecot.fetch_all(full)) == 1
    assert len(dovecot.fetch_all(ok)) == 1
    assert len(dovecot.fetch_all(sender)) == 1
    assert len(re.findall(rf"to=<{re.escape(full)}>.*status=sent", direct.log())) == 1


# --------------------------------------------------------------------------------------------
# (c) the two filter modes, with trivial pass-through filters


def test_lmtp_mode_through_a_pass_through_filter(
    lmtp_stack: tuple[Postfix, LmtpPassThrough], dovecot: Dovecot
) -> None:
    postfix, lmtp_filter = lmtp_stack
    rcpt, sender = addr("lmtp-one"), addr("sender-l")
    original = message(rcpt, "lmtp mode")

    postfix.send(sender, [rcpt], original)

    [stored] = dovecot.wait_for(rcpt, 1)
    assert added_headers(stored, original) == [
        "Return-Path",
        "Delivered-To",
        "Received",
        "Received",
    ]
    postfix.wait_queue_empty()
    [seen] = [t for t in lmtp_filter.seen if t.rcpt_tos == [rcpt]]
    assert seen.mail_from == sender
    assert seen.replies[0].startswith("250 2.0.0")


def test_lmtp_mode_relays_one_reply_per_recipient(
    lmtp_stack: tuple[Postfix, LmtpPassThrough], dovecot: Dovecot
) -> None:
    postfix, lmtp_filter = lmtp_stack
    ok, full, unknown, sender = (
        addr("lmtp-ok"),
        addr("lmtp-full"),
        addr("nobody"),
        addr("sender-l3"),
    )

    postfix.send(sender, [ok, full, unknown], message(ok, "lmtp three"))

    dovecot.wait_for(ok, 1)
    [dsn] = dovecot.wait_for(sender, 1)
    assert dsn_recipients(dsn) == [unknown]
    postfix.wait_log(rf"to=<{re.escape(full)}>.*status=deferred .* said: 452 4\.2\.2")
    # (Postfix retries the deferred recipient later, alone: take the first transaction.)
    # Postfix sorts the recipients of a transaction; the replies follow that order.
    seen = next(t for t in lmtp_filter.seen if t.mail_from == sender)
    codes = {rcpt: reply[:3] for rcpt, reply in zip(seen.rcpt_tos, seen.replies, strict=True)}
    assert codes == {ok: "250", full: "452", unknown: "550"}
    # In this mode Postfix's own bounce passes the filter as well.
    assert [t.rcpt_tos for t in lmtp_filter.seen if t.mail_from == ""] == [[sender]]


def test_content_filter_mode_through_a_pass_through_filter(
    content_filter_stack: tuple[Postfix, SmtpPassThrough], dovecot: Dovecot
) -> None:
    postfix, smtp_filter = content_filter_stack
    rcpt, sender = addr("cf-one"), addr("sender-c")
    original = message(rcpt, "content filter mode")

    postfix.send(sender, [rcpt], original)

    [stored] = dovecot.wait_for(rcpt, 1)
    # Dovecot's, the reinjection smtpd's and the first smtpd's Received.
    headers = added_headers(stored, original)
    assert headers == ["Return-Path", "Delivered-To", "Received", "Received", "Received"]
    postfix.wait_queue_empty()
    assert [(t.mail_from, t.rcpt_tos) for t in smtp_filter.seen] == [(sender, [rcpt])]
    assert postfix.wait_log(r"postfix/gpgfilter-reinject/smtpd\[\d+\]: connect from")


# --------------------------------------------------------------------------------------------
# the harness itself


def test_stop_leaves_no_process_and_no_listener(tmp_path: Path) -> None:
    server = Dovecot(tmp_path / "dovecot")
    postfix = Postfix(
        tmp_path / "postfix",
        mode="direct",
        dovecot_lmtp_port=server.lmtp_port,
        domains=[DOMAIN],
    )
    try:
        server.start()
        postfix.start()
        # Found while running: masters plus their helpers (Dovecot: log, config, anvil).
        assert len(server.processes()) >= 3
        assert len(postfix.processes()) >= 3
    finally:
        stop_all(postfix, server)
    assert server.processes() == {}
    assert postfix.processes() == {}
    for port in (server.lmtp_port, server.imap_port, postfix.smtp_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_snippet_ports_are_rewritten() -> None:
    text = "a = lmtp:inet:127.0.0.1:10025\nb = x:[127.0.0.1]:10025\nc = 127.0.0.1:100250\n"
    assert mailstack.rewrite_ports(text, {10025: 4711}) == (
        "a = lmtp:inet:127.0.0.1:4711\nb = x:[127.0.0.1]:4711\nc = 127.0.0.1:100250\n"
    )
    with pytest.raises(mailstack.MailStackError):
        mailstack.rewrite_ports(text, {10025: None})


def test_require_mail_stack_fails_instead_of_skipping_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mailstack, "missing_requirements", lambda: ["no postfix"])
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_mail_stack()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no postfix"):
        require_mail_stack()
