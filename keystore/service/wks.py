"""Web Key Service (draft-koch-openpgp-webkey-service, section 4): registering keys by mail.

1. The user's client (``gpg-wks-client --create``, Thunderbird, Kmail) mails the key as
   ``application/pgp-keys`` to the submission address, usually PGP/MIME-encrypted to the
   submission address's key, which it found by WKD.
2. :meth:`WksServer.handle` validates it, keeps it as a pending change (origin ``wks``, the
   nonce stored only as its SHA-256) and answers with a *confirmation request*: the nonce,
   encrypted to the submitted key and mailed to the key's address, so only someone who can read
   that mailbox *and* holds the secret key learns it. The request is signed by the service.
3. The client returns the nonce in a *confirmation response*; :meth:`WksServer.handle` takes the
   pending change (once, before it expires), binds the key — the address's former key stays
   active until this moment — records it in the audit trail and says so to the user.

Everything here is mail in, mail out: :meth:`WksServer.handle` takes the received bytes and
returns the messages to send, so the mail listener (:mod:`keystore.service.wks_listener`) or
any other host process decides how mail travels. gpg runs as a subprocess; logs name addresses and
fingerprints, never keys, nonces or message content.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import logging
import secrets
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

from keystore.gpg import GPG_OPTIONS
from keystore.model import AuditEntry, PendingChange, StoredKey
from keystore.service.outbound import EncryptionFailed, Encryptor, Send
from keystore.service.wkd import publishable, zbase32
from keystore.store import MERGE_ATTEMPTS, KeyStore, KeyWasRevoked, StaleMerge, stored_state
from keystore.validate import KeyRejected, KeyRevoked, merge_key, validate_key

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


class GpgFailed(Exception):
    """gpg failed on the service's side: a temporary problem, the mail is retried."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the service wants sent; ``essential`` ones must go out for the received
    message to count as processed (the others are courtesy notices)."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    essential: bool = True


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


def token_hash(nonce: str) -> str:
    return hashlib.sha256(nonce.encode("utf-8")).hexdigest()


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class WksServer:
    """The server side of the Web Key Service, over a :class:`KeyStore`."""

    def __init__(
        self,
        *,
        store: KeyStore,
        service_key: ServiceKey,
        domains: Iterable[str],
        encryptor: Encryptor,
        token_ttl: int = 86400,
        gpg_binary: str = "gpg",
        max_requests_per_hour: int = 5,
        clock: Callable[[], float] = time.time,
        recipient_delimiter: str = "+",
    ) -> None:
        self.store = store
        self.key = service_key
        self.address = service_key.address
        self.domains = frozenset(d.lower() for d in domains)
        self.encryptor = encryptor
        self._loop: asyncio.AbstractEventLoop | None = None
        self.token_ttl = token_ttl
        self.gpg_binary = gpg_binary
        self.max_requests_per_hour = max_requests_per_hour
        self.clock = clock
        self.delimiters = recipient_delimiter

    # -- entry points -------------------------------------------------------------------------
    async def process(self, raw: bytes, send: Send) -> None:
        """Handle one received message and send what it calls for (gpg runs in a thread)."""
        self._loop = asyncio.get_running_loop()
        for mail in await asyncio.to_thread(self.handle, raw):
            try:
                await send(mail.mail_from, list(mail.recipients), mail.data)
            except Exception as error:
                if mail.essential:
                    raise
                log.warning("WKS notice not sent: %s", type(error).__name__)

    def handle(self, raw: bytes) -> list[Outgoing]:
        """A submission or a confirmation response in, the mail to send out.

        Raises WksIgnored for what is no WKS message, WksRejected for a WKS message refused
        (the reason is meant for its sender) and GpgFailed or StoreError for a temporary
        problem on our side.
        """
        if len(raw) > MAX_MESSAGE_BYTES:
            raise WksRejected(f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        sender = parseaddr(str(message.get("From", "")))[1].strip().lower()
        content = message
        if message.get_content_type() == "multipart/encrypted":
            content = email.message_from_bytes(
                self.key.decrypt(_pgp_mime_ciphertext(message)), policy=email.policy.compat32
            )
        key_data = _part_payload(content, "application/pgp-keys")
        if key_data is not None:
            return [self._submission(sender, key_data)]
        wks_data = _part_payload(content, "application/vnd.gnupg.wks")
        if wks_data is not None:
            if wks_data.lstrip().startswith(b"-----BEGIN PGP MESSAGE"):
                wks_data = self.key.decrypt(wks_data)
            return self._response(wks_data)
        if content is not message:
            raise WksRejected("the encrypted message holds neither a key nor WKS data")
        raise WksIgnored("neither a key nor WKS data")

    # -- submission --------------------------------------------------------------------------
    def _submission(self, sender: str, key_data: bytes) -> Outgoing:
        local, at, domain = sender.rpartition("@")
        if not at or not local:
            raise WksRejected("the From address of the submission is missing or malformed")
        if domain not in self.domains or sender == self.address:
            raise WksRejected(f"keys for {domain} are not published here")
        if any(char in self.delimiters for char in local[1:]):
            # The filter maps a sub-address to its base address: a key for it is never used.
            raise WksRejected("keys are registered for base addresses only, not sub-addresses")
        try:
            validated = validate_key(key_data, address=sender, gpg_binary=self.gpg_binary)
        except KeyRevoked:
            raise WksRejected("the key is revoked") from None
        except KeyRejected as error:
            raise WksRejected(f"the key is refused: {error}") from None
        key = validated.key
        if not any(parseaddr(uid)[1].strip().lower() == sender for uid in key.user_ids):
            raise WksRejected(f"the key has no user ID for {sender}, the sender of the request")
        now = int(self.clock())
        limit = self.max_requests_per_hour
        if self.store.hit(f"wks-request:{sender}", now, 3600, limit) > limit:
            raise WksRejected(f"too many key submissions for {sender}; try again in an hour")
        nonce = zbase32(secrets.token_bytes(20))
        request = self._confirmation_request(sender, key, nonce)
        self.store.add_pending(
            PendingChange(
                token_hash=token_hash(nonce),
                address=sender,
                key=key,
                created=now,
                expires=now + self.token_ttl,
                origin="wks",
            )
        )
        log.info("WKS: key %s submitted for %s, confirmation requested", key.fingerprint, sender)
        return Outgoing("", (sender,), request)

    def _confirmation_request(self, address: str, key: StoredKey, nonce: str) -> bytes:
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
        armored = _crlf(self._encrypt(self.encryptor.armor, body, key)).rstrip(b"\r\n")
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
        signature = _crlf(self.key.sign(signed)).rstrip(b"\r\n")
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
    def _response(self, data: bytes) -> list[Outgoing]:
        fields = _name_values(data)
        kind = fields.get("type", "")
        if kind != "confirmation-response":
            # The value is not quoted back: logs and replies never carry message content.
            raise WksRejected("not a confirmation response (unexpected WKS message type)")
        if fields.get("sender", "").lower() != self.address:
            raise WksRejected(f"the response is not addressed to {self.address}")
        address = fields.get("address", "").lower()
        nonce = fields.get("nonce", "")
        if "@" not in address or len(nonce) < 16:
            raise WksRejected("the response lacks the address or the nonce")
        now = int(self.clock())
        hashed = token_hash(nonce)
        waiting = [
            p
            for p in self.store.pending_for(address, now)
            if p.token_hash == hashed and p.origin == "wks"
        ]
        pending = self.store.take_pending(hashed, now) if waiting else None
        if pending is None or pending.address != address:
            log.info("WKS: confirmation for %s refused: no matching request", address)
            raise WksRejected(
                f"no pending key publication for {address} matches this confirmation"
                " (unknown, already used or expired): submit the key again"
            )
        key = pending.key
        if not publishable(key, now):
            raise WksRejected("the key can no longer encrypt: submit a renewed key")
        before = {k.fingerprint for k in self.store.keys_for(address)}
        key = self._bind_merged(address, key)
        action = "registered" if not before else "replaced"
        if before == {key.fingerprint}:
            action = "renewed"
        self.store.record_audit(AuditEntry(now, address, action, key.fingerprint, "wks"))
        log.info("WKS: key %s %s for %s", key.fingerprint, action, address)
        notice = self._published_notice(address, key)
        return [notice] if notice is not None else []

    def _bind_merged(self, address: str, key: StoredKey) -> StoredKey:
        """Bind the confirmed copy merged with the stored one (a key only moves forward);
        merged again when another host stored an update in between. A key ever revoked is
        refused, and a revocation found in the confirmed copy is remembered."""
        for _ in range(MERGE_ATTEMPTS):
            stored = self.store.key(key.fingerprint)
            merged = key
            if stored is not None:
                if stored.revoked:
                    raise WksRejected("this key was revoked: submit a new key")
                try:
                    merged = merge_key(stored, key.key_data, gpg_binary=self.gpg_binary).key
                except KeyRevoked:
                    self.store.revoke(key.fingerprint)
                    raise WksRejected("this key was revoked: submit a new key") from None
                except KeyRejected as error:
                    raise WksRejected(f"the key is refused: {error}") from None
            try:
                self.store.bind(address, merged, replace=True, expected=stored_state(stored))
            except KeyWasRevoked:
                raise WksRejected("this key was revoked: submit a new key") from None
            except StaleMerge:
                continue
            return merged
        raise WksRejected("the key was changed by other requests at the same moment: try again")

    def _published_notice(self, address: str, key: StoredKey) -> Outgoing | None:
        """The "key published" notice, encrypted to the new key: the user learns that it is the
        one mail to them is now encrypted to, and that it is found by WKD."""
        text = (
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"The key {key.fingerprint} is now registered for {address}.\r\n"
            "Mail to this address is encrypted to it from now on, and mail programs find it\r\n"
            "in the Web Key Directory.\r\n"
        ).encode()
        head = self._head(address, "Your key has been published", "done")
        try:
            message = self._encrypt(
                lambda entity, key: self.encryptor.pgp_mime(head, entity, key), text, key
            )
        except (GpgFailed, WksRejected) as error:
            log.warning("WKS: no notice for %s: %s", address, error)
            return None
        return Outgoing("", (address,), message, essential=False)

    def _encrypt(
        self,
        how: Callable[[bytes, StoredKey], Coroutine[Any, Any, bytes]],
        plaintext: bytes,
        key: StoredKey,
    ) -> bytes:
        """Run the (async) encryptor from :meth:`handle`, which runs in a worker thread of the
        loop that called :meth:`process` (or, called directly, without a loop)."""
        if not key.usable_encryption_keys():
            raise WksRejected("the key has no encryption key that is valid now")
        try:
            if self._loop is None:
                return asyncio.run(how(plaintext, key))
            return asyncio.run_coroutine_threadsafe(how(plaintext, key), self._loop).result()
        except EncryptionFailed as error:
            raise GpgFailed(str(error)) from None


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
