"""Web Key Service (draft-koch-openpgp-webkey-service, section 4): registering keys by mail.

1. The user's client (``gpg-wks-client --create``, Thunderbird, Kmail) mails the key as
   ``application/pgp-keys`` to the submission address, usually PGP/MIME-encrypted to the
   submission address's key, which it found by WKD.
2. :meth:`WksServer.process` reads it and hands the key to the registry
   (:meth:`~keystore.registration.Registry.submit_wks`), which applies the rules of an HTTP
   upload: an update of the active key or a revocation takes effect at once, a revoked key is
   refused, and a new key waits as a pending change (origin ``wks``, the nonce stored only as its
   SHA-256) while :class:`WksMailer` sends the *confirmation request*: the nonce, encrypted to
   the submitted key and mailed to the key's address, so only someone who can read that
   mailbox *and* holds the secret key learns it. The request is signed by the service.
3. The client returns the nonce in a *confirmation response*;
   :meth:`~keystore.registration.Registry.confirm_wks` takes the pending change (once, before it
   expires) and binds the key — the address's former key stays active until this moment. The
   change is audited (actor ``wks``) and the owner gets the registry's notice, as for HTTP.

Everything here is mail in, mail out through a ``send`` callable, so the mail listener
(:mod:`keystore.service.wks_listener`) or any other host process decides how mail travels.
Header fields the email package parses are bounded before it sees a message, and whatever it
cannot read is refused for good. gpg runs as a subprocess in a thread, within the registry's
validation slots; logs name addresses and fingerprints, never keys, nonces or message content.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path

from keystore.gpg import GPG_OPTIONS
from keystore.gpgbound import Busy
from keystore.model import StoredKey
from keystore.ratelimit import RateLimited
from keystore.registration import MailError, Notice, Outcome, Purpose, Refused, Registry
from keystore.service.outbound import EncryptionFailed, Encryptor, Send

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024
DRAFT_VERSION = "3"
_TIMEOUT = 60
# Options for gpg runs that use the service's secret key: these need gpg-agent, so unlike the
# filter's runs (GPG_OPTIONS) they may start one.
_SECRET_OPTIONS = [
    "--batch",
    "--no-tty",
    "--status-fd",
    "2",
    "--pinentry-mode",
    "loopback",
    "--passphrase",
    "",
    "--no-auto-key-retrieve",
    "--auto-key-locate",
    "local",
    "--no-greeting",
    "--no-permission-warning",
]


class WksError(Exception):
    """A WKS message could not be processed; the text is safe to log and to send back."""


class WksIgnored(WksError):
    """Not a WKS message at all (spam to the submission address, a bounce): dropped."""


class WksRejected(WksError):
    """A WKS message that is refused, with the precise reason for its sender."""


class WksDeferred(WksError):
    """A WKS message that cannot be processed now (the service is busy, the confirmation
    request did not go out): the sender's server retries it later."""


class GpgFailed(Exception):
    """gpg failed on the service's side: a temporary problem, the mail is retried."""


def _gpg(
    home: Path, args: Sequence[str], data: bytes, binary: str, *, secret: bool = False
) -> tuple[bytes, set[str]]:
    """Run gpg in ``home``; returns its output and status keywords (never their arguments)."""
    options = _SECRET_OPTIONS if secret else ["--batch", "--no-tty", "--status-fd", "2"]
    command = [binary, "--homedir", str(home), *options]
    if not secret:
        command += GPG_OPTIONS
    try:
        done = subprocess.run(
            [*command, *args], input=data, capture_output=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise GpgFailed(f"cannot run gpg: {type(error).__name__}") from None
    keywords = {
        line.split()[1].decode("ascii", "replace")
        for line in done.stderr.splitlines()
        if line.startswith(b"[GNUPG:] ") and len(line.split()) > 1
    }
    if done.returncode != 0:
        raise GpgFailed(f"gpg exit {done.returncode}, status {' '.join(sorted(keywords))}")
    return done.stdout, keywords


class ServiceKey:
    """The submission address's key pair, in a gpg home of its own that only we can read.

    Made on first start: an Ed25519 signing primary and a Curve25519 encryption subkey, without
    passphrase (the home's 0700 mode is its protection, as for a TLS server key).
    """

    def __init__(self, home: Path, address: str, fingerprint: str, gpg_binary: str) -> None:
        self.home = home
        self.address = address
        self.fingerprint = fingerprint
        self.gpg_binary = gpg_binary
        self.public_key, _ = _gpg(
            home,
            ["--export-options", "export-minimal", "--export", fingerprint],
            b"",
            gpg_binary,
            secret=True,
        )
        if not self.public_key:
            raise GpgFailed("cannot export the submission key")

    @classmethod
    def open(cls, home: Path, address: str, *, gpg_binary: str = "gpg") -> ServiceKey:
        """The key for ``address`` in ``home``, created when there is none yet."""
        address = address.lower()
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        home.chmod(0o700)
        fingerprint = cls._find(home, address, gpg_binary)
        if fingerprint is None:
            _gpg(
                home,
                ["--quick-gen-key", address, "ed25519", "sign,cert", "never"],
                b"",
                gpg_binary,
                secret=True,
            )
            fingerprint = cls._find(home, address, gpg_binary)
            if fingerprint is None:
                raise GpgFailed("gpg made no submission key")
            _gpg(
                home,
                ["--quick-add-key", fingerprint, "cv25519", "encr", "never"],
                b"",
                gpg_binary,
                secret=True,
            )
            log.info("made the WKS submission key %s for %s", fingerprint, address)
        return cls(home, address, fingerprint, gpg_binary)

    @staticmethod
    def _find(home: Path, address: str, gpg_binary: str) -> str | None:
        try:
            listing, _ = _gpg(
                home,
                ["--with-colons", "--list-secret-keys", f"<{address}>"],
                b"",
                gpg_binary,
                secret=True,
            )
        except GpgFailed:
            return None  # gpg exits 2 when there is no such key
        for line in listing.decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if fields[0] == "fpr":
                return fields[9]
        return None

    def decrypt(self, armored: bytes) -> bytes:
        """The plaintext of a message encrypted to the submission key; WksRejected otherwise."""
        try:
            plaintext, keywords = _gpg(
                self.home,
                ["--max-output", str(MAX_MESSAGE_BYTES), "--decrypt"],
                armored,
                self.gpg_binary,
                secret=True,
            )
        except GpgFailed as error:
            raise WksRejected(
                f"cannot decrypt the message: it must be encrypted to {self.fingerprint}"
            ) from error
        if "DECRYPTION_OKAY" not in keywords:
            raise WksRejected("the message could not be decrypted intact")
        return plaintext

    def sign(self, data: bytes) -> bytes:
        """An armored detached signature of ``data`` (SHA-256), for a multipart/signed part."""
        signature, _ = _gpg(
            self.home,
            [
                "--local-user",
                f"{self.fingerprint}!",
                "--digest-algo",
                "SHA256",
                "--armor",
                "--detach-sign",
            ],
            data,
            self.gpg_binary,
            secret=True,
        )
        return signature

    def close(self) -> None:
        """Stop the gpg-agent that decryption and signing started in the home."""
        subprocess.run(
            ["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
        )


def new_boundary() -> str:
    """A MIME boundary that cannot occur in the parts it separates (they are ours or armor)."""
    return f"gpgfilter.{secrets.token_hex(16)}_"


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class WksServer:
    """The server side of the Web Key Service: reads the mail, and leaves every decision about
    keys to the :class:`~keystore.registration.Registry` (the same rules as the HTTP API)."""

    def __init__(
        self,
        *,
        registry: Registry,
        service_key: ServiceKey,
        domains: Iterable[str],
        encryptor: Encryptor,
        token_ttl: int = 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.key = service_key
        self.address = service_key.address
        self.domains = frozenset(d.lower() for d in domains)
        self.encryptor = encryptor
        self.token_ttl = token_ttl
        self.clock = clock

    # -- entry point ---------------------------------------------------------------------------
    async def process(self, raw: bytes, send: Send) -> Outcome:
        """A submission or a confirmation response in; what it calls for is sent by ``send``.

        Raises WksIgnored for what is no WKS message, WksRejected for a WKS message refused
        (the reason is meant for its sender) and WksDeferred, GpgFailed or StoreError for a
        temporary problem on our side. Nothing here blocks the event loop: parsing and gpg run
        in threads, gpg within the registry's validation slots.
        """
        if len(raw) > MAX_MESSAGE_BYTES:
            raise WksRejected(f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
        parts = await asyncio.to_thread(read_message, raw)
        if parts.ciphertext is not None:
            inner = await asyncio.to_thread(read_message, await self._decrypt(parts.ciphertext))
            if inner.key_data is None and inner.wks_data is None:
                raise WksRejected("the encrypted message holds neither a key nor WKS data")
            parts = Parts(parts.sender, None, inner.key_data, inner.wks_data)
        if parts.key_data is not None:
            return await self._submission(parts.sender, parts.key_data, WksMailer(self, send))
        if parts.wks_data is not None:
            data = parts.wks_data
            if data.lstrip().startswith(b"-----BEGIN PGP MESSAGE"):
                data = await self._decrypt(data)
            return await self._response(data)
        raise WksIgnored("neither a key nor WKS data")

    async def _decrypt(self, armored: bytes) -> bytes:
        """Decryption is gpg work a stranger can cause: bounded like a key check."""
        try:
            async with self.registry.gpg_slots.hold():
                return await asyncio.to_thread(self.key.decrypt, armored)
        except Busy as busy:
            raise WksDeferred(str(busy)) from None

    async def _ruled(self, change: Awaitable[Outcome]) -> Outcome:
        """The registry's answer in WKS terms: a refusal is permanent (550, its reason to the
        sender); a busy service or a confirmation request that did not go out is retried."""
        try:
            return await change
        except Refused as refused:
            if refused.code == "mail-failed":
                raise WksDeferred(str(refused)) from None
            raise WksRejected(str(refused)) from None
        except RateLimited as limited:
            raise WksRejected(str(limited)) from None
        except Busy as busy:
            raise WksDeferred(str(busy)) from None

    # -- submission --------------------------------------------------------------------------
    async def _submission(self, sender: str, key_data: bytes, mailer: WksMailer) -> Outcome:
        local, at, domain = sender.rpartition("@")
        if not at or not local:
            raise WksRejected("the From address of the submission is missing or malformed")
        if domain not in self.domains or sender == self.address:
            raise WksRejected(f"keys for {domain} are not published here")
        outcome = await self._ruled(
            self.registry.submit_wks(sender, key_data, mailer, token_ttl=self.token_ttl)
        )
        log.info("WKS: key %s for %s: %s", outcome.fingerprint, outcome.address, outcome.action)
        return outcome

    async def confirmation_request(self, address: str, key: StoredKey, nonce: str) -> bytes:
        """The draft's confirmation request, encrypted to ``key`` and signed by the service.

        The layout is the one GnuPG's server sends to clients of draft version 2 and later:
        multipart/signed around multipart/mixed, with an explanation for people whose mail
        program does not handle WKS, and the ``application/vnd.gnupg.wks`` part whose body is
        the armored, encrypted request.
        """
        body = (
            "type: confirmation-request\n"
            f"sender: {self.address}\n"
            f"address: {address}\n"
            f"fingerprint: {key.fingerprint}\n"
            f"nonce: {nonce}\n"
        ).encode()
        if not key.usable_encryption_keys():
            raise WksRejected("the key has no encryption key that is valid now")
        try:
            armored = _crlf(await self.encryptor.armor(body, key)).rstrip(b"\r\n")
        except EncryptionFailed as error:
            raise GpgFailed(str(error)) from None
        mixed = new_boundary().encode("ascii")
        signed = b"\r\n".join(
            (
                b'Content-Type: multipart/mixed; boundary="' + mixed + b'"',
                b"",
                b"--" + mixed,
                b"Content-Type: text/plain; charset=us-ascii",
                b"",
                b"This message asks you to confirm the publication of your OpenPGP key",
                b"for " + address.encode("utf-8") + b" (" + key.fingerprint.encode() + b").",
                b"Mail programs that support the Web Key Service answer it by themselves.",
                b"With GnuPG: gpg-wks-client --receive --send < this-message.eml",
                b"If you did not ask for this, ignore this message: nothing is published.",
                b"",
                b"--" + mixed,
                b"Content-Type: application/vnd.gnupg.wks",
                b"",
                armored,
                b"",
                b"--" + mixed + b"--",
            )
        )
        signature = _crlf(await asyncio.to_thread(self.key.sign, signed)).rstrip(b"\r\n")
        outer = new_boundary().encode("ascii")
        head = self._head(address, "Confirm your key publication", "confirm") + (
            b'Content-Type: multipart/signed; protocol="application/pgp-signature";\r\n'
            b' micalg=pgp-sha256; boundary="' + outer + b'"\r\n'
        )
        return b"".join(
            (
                head,
                b"\r\n--" + outer + b"\r\n",
                signed,
                b"\r\n--" + outer + b"\r\n",
                b'Content-Type: application/pgp-signature; name="signature.asc"\r\n\r\n',
                signature,
                b"\r\n--" + outer + b"--\r\n",
            )
        )

    def _head(self, to: str, subject: str, phase: str) -> bytes:
        domain = self.address.rpartition("@")[2]
        return (
            f"From: {self.address}\r\n"
            f"To: {to}\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {formatdate(self.clock(), usegmt=True)}\r\n"
            f"Message-ID: {make_msgid(domain=domain)}\r\n"
            f"Wks-Draft-Version: {DRAFT_VERSION}\r\n"
            f"WKS-Phase: {phase}\r\n"
            "Auto-Submitted: auto-replied\r\n"
            "MIME-Version: 1.0\r\n"
        ).encode()

    # -- confirmation ------------------------------------------------------------------------
    async def _response(self, data: bytes) -> Outcome:
        fields = _name_values(data)
        if fields.get("type", "") != "confirmation-response":
            # The value is not quoted back: logs and replies never carry message content.
            raise WksRejected("not a confirmation response (unexpected WKS message type)")
        if fields.get("sender", "").lower() != self.address:
            raise WksRejected(f"the response is not addressed to {self.address}")
        address = fields.get("address", "").lower()
        nonce = fields.get("nonce", "")
        if "@" not in address or len(nonce) < 16:
            raise WksRejected("the response lacks the address or the nonce")
        return await self._ruled(self.registry.confirm_wks(address, nonce))


class WksMailer:
    """The registry's :class:`~keystore.registration.Mailer` for WKS: the challenge is the
    draft's confirmation request, mailed from the submission address (with an empty envelope
    sender, so it never bounces back to us). Notices are the registry's own mailer's job."""

    def __init__(self, server: WksServer, send: Send) -> None:
        self.server = server
        self.send = send

    async def send_challenge(
        self, address: str, key: StoredKey, *, purpose: Purpose, token: str, expires: int
    ) -> None:
        if purpose != "confirm":
            raise MailError("the Web Key Service only confirms publications")
        try:
            request = await self.server.confirmation_request(address, key, token)
        except (GpgFailed, WksRejected) as error:
            raise MailError(str(error)) from None
        try:
            await self.send("", [address], request)
        except Exception as error:  # whatever the relay did, the request did not go out
            raise MailError(f"relay: {type(error).__name__}") from None

    async def send_notice(self, notice: Notice) -> None:
        """Never called: the registry sends its notices through its own mailer."""
        raise MailError("WKS sends no notices of its own")


@dataclass(frozen=True, slots=True)
class Parts:
    """What a received message holds for WKS: its sender, and the ciphertext of a PGP/MIME
    message, or else the key (``application/pgp-keys``) or WKS data it carries."""

    sender: str
    ciphertext: bytes | None
    key_data: bytes | None
    wks_data: bytes | None


# The email package's parameter parser is quadratic (an open quote and 100 KB of semicolons in
# a Content-Type took 8 s of CPU) and its MIME parser checks every line against every open
# boundary: the fields it parses are bounded, and so is the number of parts, before it sees
# the message. A WKS message has a handful of parts with short header fields.
MAX_FIELD_CHARS = 2048
MAX_PARTS = 64
_PARSED_FIELD = re.compile(rb"(?i)(content-[a-z0-9-]*|from)[ \t]*:")
_CONTENT_TYPE = re.compile(rb"(?i)content-type[ \t]*:")


def check_fields(raw: bytes) -> None:
    """Refuse a message with a parsed header field (Content-*, From) longer than
    MAX_FIELD_CHARS, folded lines included, or more than MAX_PARTS Content-Type fields.

    Lines are read without knowing where a part's header ends: a body line that looks like
    such a field counts too, which only a hostile message can make this long or this many.
    """
    parts = 0
    length = 0
    bounded = False
    for line in raw.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not bounded:
                continue
            length += len(line)
        else:
            bounded = _PARSED_FIELD.match(line) is not None
            if not bounded:
                continue
            length = len(line)
            if _CONTENT_TYPE.match(line):
                parts += 1
                if parts > MAX_PARTS:
                    raise WksRejected(f"the message has more than {MAX_PARTS} MIME parts")
        if length > MAX_FIELD_CHARS:
            raise WksRejected(
                f"a Content or From header field is longer than {MAX_FIELD_CHARS} characters"
            )


def read_message(raw: bytes) -> Parts:
    """What a received message holds for WKS; WksRejected when it cannot be read.

    Only reading goes through ``email`` (nothing it produces is sent on). Any failure of the
    email package on hostile MIME (it raised TypeError on RFC 2231 sections it cannot put in
    order) is a permanent refusal: retrying the same bytes cannot help.
    """
    check_fields(raw)
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        sender = parseaddr(str(message.get("From", "")))[1].strip().lower()
        if message.get_content_type() == "multipart/encrypted":
            return Parts(sender, _pgp_mime_ciphertext(message), None, None)
        return Parts(
            sender,
            None,
            _part_payload(message, "application/pgp-keys"),
            _part_payload(message, "application/vnd.gnupg.wks"),
        )
    except WksError:
        raise
    except Exception as error:  # the email package on input it cannot read
        raise WksRejected(
            f"the message's MIME structure cannot be read ({type(error).__name__})"
        ) from None


def _pgp_mime_ciphertext(message: Message) -> bytes:
    parts = message.get_payload()
    if not isinstance(parts, list) or len(parts) != 2:
        raise WksRejected("malformed PGP/MIME message: expected two parts")
    second = parts[1]
    payload = second.get_payload(decode=True) if isinstance(second, Message) else None
    if not isinstance(payload, bytes) or b"-----BEGIN PGP MESSAGE" not in payload:
        raise WksRejected("malformed PGP/MIME message: no encrypted part")
    return payload


def _part_payload(message: Message, mimetype: str) -> bytes | None:
    for part in message.walk():
        if part.get_content_type() == mimetype:
            payload = part.get_payload(decode=True)
            return payload if isinstance(payload, bytes) else b""
    return None


def _name_values(data: bytes) -> dict[str, str]:
    """The ``name: value`` lines of a WKS message (first occurrence wins)."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip() and not name[:1].isspace():
            fields.setdefault(name.strip().lower(), value.strip())
    return fields
