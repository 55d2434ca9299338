"""Challenge mails (RFC 3156 PGP/MIME, encrypted to the uploaded key) and clear-text notices,
handed to the local Postfix.

A challenge is only proof of possession if nobody but the key's holder can read it: the
token travels inside the ciphertext only, and the ciphertext is checked to be addressed to
exactly the uploaded key's encryption keys before it leaves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import formatdate, make_msgid

from keystore.model import StoredKey
from keystore.registration import MailError, Notice, Purpose
from keystore.service.outbound import EncryptionFailed, Encryptor, Send

_SUBJECTS = {
    "confirm": "Confirm your OpenPGP key",
    "withdraw": "Confirm the withdrawal of your OpenPGP key",
    "protect": "Confirm the change of how your mail is stored",
    "registered": "An OpenPGP key was registered for your address",
    "replaced": "The OpenPGP key for your address was replaced",
    "renewed": "The OpenPGP key for your address was renewed",
    "withdrawn": "The OpenPGP key for your address was withdrawn",
    "revoked": "The OpenPGP key for your address was revoked",
    "expiring": "Your OpenPGP key expires soon",
    "expired": "Your OpenPGP key has expired",
}

_NOTICE_TEXT = {
    "registered": "Incoming mail for {address} is now encrypted to the key\n  {fpr}\n"
    "before it is stored.",
    "replaced": "Incoming mail for {address} is now encrypted to the key\n  {fpr}\n"
    "instead of the key registered before.",
    "renewed": "The key\n  {fpr}\nregistered for {address} was updated (new expiry date or"
    " subkeys).",
    "withdrawn": "The key\n  {fpr}\nis no longer registered for {address}: new mail is stored"
    " as it arrives, without encryption by this server.",
    "revoked": "The key\n  {fpr}\nregistered for {address} was revoked. Mail for you is held"
    " until you register a new key.",
    "expiring": "The key\n  {fpr}\nregistered for {address} can encrypt until {when}. Extend"
    " its expiry date and upload it again, or register a new key, before then.",
    "expired": "The key\n  {fpr}\nregistered for {address} expired on {when}. Mail for you is"
    " held until you upload the key with a new expiry date or register a new key.",
}


class Mailer:
    def __init__(
        self,
        *,
        send: Send,
        encryptor: Encryptor,
        mail_from: str,
        hostname: str,
        public_url: str,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.send = send
        self._close = close
        self.encryptor = encryptor
        self.mail_from = mail_from
        self.hostname = hostname
        self.public_url = public_url.rstrip("/")

    async def close(self) -> None:
        """Release the sending side (the relay connection) the mailer was given."""
        if self._close is not None:
            await self._close()

    async def send_challenge(
        self, address: str, key: StoredKey, *, purpose: Purpose, token: str, expires: int
    ) -> None:
        inner = self._challenge_text(address, key, purpose, token, expires)
        header = self._header(address, _SUBJECTS[purpose])
        try:
            message = await self.encryptor.pgp_mime(header, inner, key)
        except EncryptionFailed as error:
            raise MailError(str(error)) from None
        await self._send(address, message)

    async def send_notice(self, notice: Notice) -> None:
        text = _NOTICE_TEXT[notice.action].format(
            address=notice.address,
            fpr=_spaced(notice.fingerprint),
            when=_date(notice.expires),
        )
        by = {
            "admin-api": "\n\nThe change was made by the mail administrator.",
            "self-service": f"\n\nThe change was made on {self.public_url}/ by someone who proved"
            " they hold the key and can read your mail.",
            "wks": "\n\nThe change was made by mail (Web Key Service) by someone who proved they"
            " hold the key and can read your mail.",
        }.get(notice.actor, "")
        body = (
            f"{text}{by}\n\nIf you did not expect this, tell your mail administrator.\n"
            f"\n-- \n{self.public_url}/\n"
        )
        header = self._header(notice.address, _SUBJECTS[notice.action])
        header += (
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
        )
        await self._send(notice.address, header + b"\r\n" + _crlf(body))

    # -- composition -------------------------------------------------------------------------
    def _challenge_text(
        self, address: str, key: StoredKey, purpose: Purpose, token: str, expires: int
    ) -> bytes:
        link = f"{self.public_url}/confirm#token={token}"
        if purpose == "confirm":
            what = f"register the OpenPGP key\n  {_spaced(key.fingerprint)}\nfor mail to {address}"
            ignore = "nothing changes"
        elif purpose == "protect":
            what = (
                f"change the header protection of mail to {address} (whether its header"
                " fields, and its Subject, are also stored inside the encryption)"
            )
            ignore = "nothing changes"
        else:
            what = (
                f"withdraw the OpenPGP key\n  {_spaced(key.fingerprint)}\nregistered for"
                f" {address}, so that new mail is no longer encrypted to it"
            )
            ignore = "the key stays registered"
        body = (
            f"Someone, hopefully you, asked to {what}.\n\n"
            f"To confirm, open\n  {link}\n"
            f"and press the button, or enter this code on {self.public_url}/confirm :\n"
            f"  {token}\n\n"
            f"The code works once, until {_date(expires)}. If you did not ask for this, ignore"
            f" this mail: {ignore}.\n"
        )
        return (
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + _crlf(body)
        )

    def _header(self, address: str, subject: str) -> bytes:
        fields = (
            f"From: <{self.mail_from}>",
            f"To: <{address}>",
            f"Subject: {subject}",
            f"Date: {formatdate(usegmt=True)}",
            f"Message-ID: {make_msgid(domain=self.hostname)}",
            "Auto-Submitted: auto-generated",
        )
        return "".join(f"{f}\r\n" for f in fields).encode("ascii")

    async def _send(self, address: str, data: bytes) -> None:
        try:
            await self.send(self.mail_from, [address], data)
        except OSError as error:
            raise MailError(str(error)) from None


def _spaced(fingerprint: str) -> str:
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def _date(moment: int | None) -> str:
    if moment is None:
        return "never"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")
