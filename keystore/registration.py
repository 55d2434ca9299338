"""The rules of self-service key registration, independent of HTTP.

Only the owner of an address may bind a key to it: an upload stays pending
until its owner returns the token that was mailed, encrypted to the uploaded key, to that
address; the current key stays active until then. Two changes need no challenge because they
prove themselves: an update of the active key, merged with the stored copy so that only what
the key itself signed is added and nothing moves back (``keystore.validate.merge_key``), and a
revocation of the active key. A token is good only for the state it was issued against: any
change for the address voids the others (the store drops them with the change). A revoked key
stays bound until another key replaces it, so mail stays held. Only addresses of the served
mail domains are accepted, and never a sub-address. Every change is audited and announced to
the address in clear text, so an owner learns of a change they did not make.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from keystore.gpgbound import ValidationSlots
from keystore.model import AuditEntry, HeaderProtection, PendingChange, StoredKey
from keystore.ratelimit import RateLimiter
from keystore.store import (
    MERGE_ATTEMPTS,
    KeyStore,
    KeyWasRevoked,
    StaleMerge,
    stored_state,
)
from keystore.validate import (
    KeyRejected,
    KeyRevoked,
    MergedKey,
    ValidatedKey,
    check_revocation,
    looks_like_revocation,
    merge_key,
    validate_key,
)

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_FINGERPRINT = re.compile(r"^[0-9A-Fa-f]{40}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
TOKEN_BYTES = 32
ORIGIN_UPLOAD = "web"
ORIGIN_WITHDRAW = "withdraw"
ORIGIN_WKS = "wks"
ACTOR_WKS = "wks"
# A WKS nonce as this registry makes it (token_urlsafe) or as earlier versions did (z-base-32).
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
ORIGIN_PROTECT = "protect"

Purpose = Literal["confirm", "withdraw", "protect"]
_T = TypeVar("_T")


class Refused(Exception):
    """A request the rules turn down; ``code`` is stable for clients, the message is for people
    and never carries key material or tokens."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Notice:
    """A change (or a coming expiry) the owner of ``address`` is told about in clear text."""

    action: str  # registered, replaced, renewed, withdrawn, revoked, expiring, expired
    address: str
    fingerprint: str
    actor: str
    expires: int | None = None


class Mailer(Protocol):
    async def send_challenge(
        self, address: str, key: StoredKey, *, purpose: Purpose, token: str, expires: int
    ) -> None:
        """Mail ``token`` encrypted to ``key``; raises ``MailError`` when the relay refuses."""
        ...

    async def send_notice(self, notice: Notice) -> None: ...


class EnrolmentHook(Protocol):
    """Told, after a key is bound, that the address's mail already stored should be encrypted.

    It must only note the request and return quickly: the work needs rights (Dovecot's) that
    the key service does not have, so another process does it.
    """

    def request(self, address: str) -> None: ...


class MailError(Exception):
    """The relay did not take a mail."""


@dataclass(frozen=True, slots=True)
class Policy:
    token_ttl: int = 48 * 3600
    min_valid_days: int = 7
    max_key_bytes: int = 1024 * 1024
    expiry_notice_days: int = 14
    gpg_binary: str = "gpg"


@dataclass(frozen=True, slots=True)
class Outcome:
    action: str  # pending, renewed, unchanged, revoked, registered, replaced, withdrawn,
    # withdrawal-pending
    address: str
    fingerprint: str
    expires: int | None = None  # of the key, or of the token for pending changes


@dataclass(frozen=True, slots=True)
class Status:
    address: str
    fingerprint: str | None
    expires: int | None
    revoked: bool
    pending: bool


def normalise_address(address: str) -> str:
    cleaned = address.strip().lower()
    if len(cleaned) > 254 or not _ADDRESS.match(cleaned):
        raise Refused("bad-address", "not a valid e-mail address")
    return cleaned


def served_address(address: str, domains: frozenset[str], delimiters: str) -> str:
    """``address`` normalised, when it is a base address of a mail domain served here.

    Keys are registered for what the filter looks up: a sub-address (``alice+news@``) is
    mapped to its base address there, so a key for it would never be used; and a challenge is
    only ever mailed into a domain this server delivers for.
    """
    cleaned = normalise_address(address)
    local, _, domain = cleaned.rpartition("@")
    if domain not in domains:
        raise Refused("foreign-domain", f"this service registers keys for {_listed(domains)} only")
    cut = next((i for i, char in enumerate(local) if char in delimiters and i > 0), None)
    if cut is not None:
        base = f"{local[:cut]}@{domain}"
        raise Refused(
            "sub-address",
            f"register the key for {base}: mail to {cleaned} is encrypted to the key of {base}",
        )
    return cleaned


def _listed(domains: frozenset[str]) -> str:
    return ", ".join(sorted(domains)) or "no domain"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


class Registry:
    def __init__(
        self,
        store: KeyStore,
        mailer: Mailer,
        policy: Policy,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
        *,
        domains: Iterable[str],
        delimiters: str = "+",
        enrolment: EnrolmentHook | None = None,
    ) -> None:
        self.store = store
        self.mailer = mailer
        self.policy = policy
        self.limiter = limiter
        self.clock = clock
        self.domains = frozenset(d.lower() for d in domains)
        self.delimiters = delimiters
        # None: encrypting existing mail at enrolment is not offered (the default).
        self.enrolment = enrolment
        # Merge and store one update at a time: two merges from the same stored copy would
        # otherwise each drop what the other added.
        self._updating = asyncio.Lock()
        self.gpg_slots = ValidationSlots()  # gpg work at once, beside the mail's encryption

    def _address(self, address: str) -> str:
        return served_address(address, self.domains, self.delimiters)

    # -- self-service ------------------------------------------------------------------------
    async def upload(
        self,
        address: str,
        data: bytes,
        header_protection: HeaderProtection | None = None,
        *,
        encrypt_existing: bool = False,
    ) -> Outcome:
        """A key (new, replacement or update) or a revocation uploaded for ``address``.

        Only a new key costs a challenge mail, so only that counts toward the address's rate
        limit: a stranger's refused uploads never lock the owner out of updating or revoking.
        ``header_protection`` is the owner's choice for a new key, applied with its confirmation;
        an update needs no proof and so changes no choice (``request_header_protection`` does).
        ``encrypt_existing`` likewise travels with the new key and takes effect on confirmation.
        """
        address = self._address(address)
        self._check_size(data)
        if encrypt_existing and self.enrolment is None:
            raise Refused(
                "not-offered", "this server does not offer to encrypt the mail already stored"
            )
        if await asyncio.to_thread(looks_like_revocation, data):
            return await self._revoke(address, data, actor="self-service")
        try:
            validated = await self._validate(data, address, require_uid=True)
        except KeyRevoked as revoked:
            if any(k.fingerprint == revoked.fingerprint for k in await self._keys(address)):
                return await self._revoke(address, data, actor="self-service")
            await self._remember_revocation(revoked.fingerprint)
            raise Refused("key-rejected", str(revoked)) from None
        except KeyRejected as error:
            log.info("upload for %s refused: %s", address, error)
            raise Refused("key-rejected", str(error)) from None
        key = validated.key
        active = await self._keys(address)
        same = next((k for k in active if k.fingerprint == key.fingerprint), None)
        if same is not None:
            return await self._update(address, data, same, actor="self-service")
        await self._refuse_revoked(key.fingerprint)
        if self.limiter is not None:
            await self.limiter.address(address)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = int(self.clock())
        pending = PendingChange(
            token_hash(token),
            address,
            key,
            now,
            now + self.policy.token_ttl,
            ORIGIN_UPLOAD,
            header_protection=header_protection,
            encrypt_existing=encrypt_existing,
        )
        await self._challenge(pending, token, "confirm")
        log.info("key %s for %s waits for confirmation", key.fingerprint, address)
        return Outcome("pending", address, key.fingerprint, pending.expires)

    async def request_withdrawal(self, address: str) -> Outcome:
        """Mail a withdrawal token encrypted to the active key: only its holder can unbind it.
        A revoked key cannot be withdrawn: it keeps mail held until a new key is registered."""
        address = self._address(address)
        now = int(self.clock())
        keys = await self._keys(address)
        if any(k.revoked for k in keys):
            raise _revoked_stays()
        usable = [k for k in keys if k.usable_encryption_keys(now)]
        if not usable:
            raise Refused("nothing-registered", "no usable key is registered for this address")
        if self.limiter is not None:
            await self.limiter.address(address)
        key = usable[0]
        token = secrets.token_urlsafe(TOKEN_BYTES)
        pending = PendingChange(
            token_hash(token), address, key, now, now + self.policy.token_ttl, ORIGIN_WITHDRAW
        )
        await self._challenge(pending, token, "withdraw")
        log.info("withdrawal of %s for %s waits for confirmation", key.fingerprint, address)
        return Outcome("withdrawal-pending", address, key.fingerprint, pending.expires)

    async def request_header_protection(self, address: str, mode: HeaderProtection) -> Outcome:
        """Mail a token encrypted to the active key: only its holder changes how mail to the
        address is stored, with the same proof as a withdrawal."""
        address = self._address(address)
        now = int(self.clock())
        usable = [k for k in await self._keys(address) if k.usable_encryption_keys(now)]
        if not usable:
            raise Refused("nothing-registered", "no usable key is registered for this address")
        if self.limiter is not None:
            await self.limiter.address(address)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        pending = PendingChange(
            token_hash(token),
            address,
            usable[0],
            now,
            now + self.policy.token_ttl,
            ORIGIN_PROTECT,
            header_protection=mode,
        )
        await self._challenge(pending, token, "protect")
        log.info("header protection change for %s waits for confirmation", address)
        return Outcome("protection-pending", address, usable[0].fingerprint, pending.expires)

    async def admin_header_protection(
        self, address: str, mode: HeaderProtection | None, *, actor: str = "admin-api"
    ) -> Outcome:
        """The admin sets (or, with None, hands back to the default) an address's choice."""
        address = normalise_address(address)
        keys = await self._keys(address)
        if not keys:
            raise Refused("nothing-registered", "no key is registered for this address")
        await asyncio.to_thread(self.store.set_header_protection, address, mode)
        await self._audit("protection-changed", address, keys[-1], actor)
        return Outcome("protection-changed", address, keys[-1].fingerprint, keys[-1].expires)

    async def confirm(self, token: str) -> Outcome:
        """Carry out the change the token was mailed for; a token works once, until it expires."""
        if not _TOKEN.match(token):
            raise Refused("token-malformed", "this is not a confirmation code")
        now = int(self.clock())
        pending = await asyncio.to_thread(self.store.take_pending, token_hash(token), now)
        if pending is None:
            raise Refused(
                "token-invalid",
                "this code is unknown, was already used or has expired: start again",
            )
        address, key = pending.address, pending.key
        if pending.origin == ORIGIN_PROTECT:
            if not any(k.fingerprint == key.fingerprint for k in await self._keys(address)):
                raise Refused("stale", "the key this change was for is no longer registered")
            await asyncio.to_thread(
                self.store.set_header_protection, address, pending.header_protection
            )
            await self._audit("protection-changed", address, key, "self-service")
            return Outcome("protection-changed", address, key.fingerprint, key.expires)
        if pending.origin == ORIGIN_WITHDRAW:
            async with self._updating:
                active = await self._keys(address)
                # Any change since the token was mailed voided it; this guards the rest.
                if not any(k.fingerprint == key.fingerprint for k in active):
                    raise Refused(
                        "stale", "the key this withdrawal was for is no longer registered"
                    )
                if any(k.revoked for k in active):
                    raise _revoked_stays()
                await asyncio.to_thread(self.store.remove, address)
            await self._changed("withdrawn", address, key, "self-service")
            return Outcome("withdrawn", address, key.fingerprint, key.expires)

        return await self._bind_pending(pending, "self-service")

    async def _bind_pending(self, pending: PendingChange, actor: str) -> Outcome:
        """Bind the key a confirmed change was for, merged with any stored copy of it."""
        address = pending.address

        async def attempt() -> tuple[str, StoredKey]:
            active = await self._keys(address)
            merged, expected = await self._forward(pending.key)
            action = (
                "replaced"
                if any(k.fingerprint != merged.fingerprint for k in active)
                else "registered"
            )
            await asyncio.to_thread(
                self.store.bind, address, merged, replace=True, expected=expected
            )
            return action, merged

        action, key = await self._retrying(attempt)
        if pending.header_protection is not None:
            await asyncio.to_thread(
                self.store.set_header_protection, address, pending.header_protection
            )
        await self._changed(action, address, key, actor)
        if pending.encrypt_existing:
            self._enrolled(address)
        return Outcome(action, address, key.fingerprint, key.expires)

    def _enrolled(self, address: str) -> None:
        """Pass the request on; the key is bound whatever happens to it (it can be made again
        with ``gpgfilter mailbox encrypt ADDRESS``), so a failure is logged, not raised."""
        if self.enrolment is None:
            return
        try:
            self.enrolment.request(address)
        except OSError as error:
            log.error("encrypting the stored mail of %s not queued: %s", address, error)

    async def status(self, address: str) -> Status:
        """What a public WKD lookup would tell, plus whether an upload waits for confirmation."""
        address = self._address(address)
        now = int(self.clock())
        keys = await self._keys(address)
        pending = await asyncio.to_thread(self.store.pending_for, address, now)
        waiting = any(p.origin == ORIGIN_UPLOAD for p in pending)
        if not keys:
            return Status(address, None, None, False, waiting)
        key = keys[-1]
        return Status(address, key.fingerprint, key.expires, key.revoked, waiting)

    async def _validate(self, data: bytes, address: str, *, require_uid: bool) -> ValidatedKey:
        async with self.gpg_slots.hold():
            return await asyncio.to_thread(
                validate_key,
                data,
                address=address,
                require_uid=require_uid,
                min_valid_days=self.policy.min_valid_days,
                max_bytes=self.policy.max_key_bytes,
                gpg_binary=self.policy.gpg_binary,
            )

    # -- Web Key Service -------------------------------------------------------------------
    async def submit_wks(
        self, address: str, data: bytes, mailer: Mailer, *, token_ttl: int | None = None
    ) -> Outcome:
        """A key mailed by ``address`` to the WKS submission address, under the rules of an
        upload: an update of the active key or a revocation takes effect at once, a key ever
        revoked is refused, and a new key costs a challenge (counted toward the address's rate
        limit, shared with the HTTP uploads). The challenge is the draft's confirmation
        request, which ``mailer`` composes and sends; the change waits with origin ``wks``."""
        return await self._submit(
            address,
            data,
            actor=ACTOR_WKS,
            origin=ORIGIN_WKS,
            mailer=mailer,
            token_ttl=token_ttl or self.policy.token_ttl,
        )

    async def confirm_wks(self, address: str, nonce: str) -> Outcome:
        """A WKS confirmation response: binds the key only when ``nonce`` is that of a pending
        WKS change for ``address``. A response naming another address uses nothing up, so a
        guess cannot burn the owner's request."""
        if not _NONCE.match(nonce):
            raise Refused("token-malformed", "the confirmation carries no valid nonce")
        address = normalise_address(address)
        now = int(self.clock())
        hashed = token_hash(nonce)
        waiting = await asyncio.to_thread(self.store.pending_for, address, now)
        found = any(p.token_hash == hashed and p.origin == ORIGIN_WKS for p in waiting)
        pending = await asyncio.to_thread(self.store.take_pending, hashed, now) if found else None
        if pending is None or pending.address != address:
            log.info("WKS confirmation for %s refused: no matching request", address)
            raise Refused(
                "token-invalid",
                f"no pending key publication for {address} matches this confirmation"
                " (unknown, already used or expired): submit the key again",
            )
        if pending.key.revoked or not pending.key.usable_encryption_keys(now):
            raise Refused("key-rejected", "the key can no longer encrypt: submit a renewed key")
        return await self._bind_pending(pending, ACTOR_WKS)

    async def _submit(
        self,
        address: str,
        data: bytes,
        *,
        actor: str,
        origin: str,
        mailer: Mailer,
        token_ttl: int,
    ) -> Outcome:
        """The upload rules for a key that arrived by ``actor``'s way (see :meth:`upload`)."""
        address = self._address(address)
        self._check_size(data)
        if await asyncio.to_thread(looks_like_revocation, data):
            return await self._revoke(address, data, actor=actor)
        try:
            validated = await self._validate(data, address, require_uid=True)
        except KeyRevoked as revoked:
            if any(k.fingerprint == revoked.fingerprint for k in await self._keys(address)):
                return await self._revoke(address, data, actor=actor)
            await self._remember_revocation(revoked.fingerprint)
            raise Refused("key-rejected", str(revoked)) from None
        except KeyRejected as error:
            log.info("submission for %s refused: %s", address, error)
            raise Refused("key-rejected", str(error)) from None
        key = validated.key
        same = next(
            (k for k in await self._keys(address) if k.fingerprint == key.fingerprint), None
        )
        if same is not None:
            return await self._update(address, data, same, actor=actor)
        await self._refuse_revoked(key.fingerprint)
        if self.limiter is not None:
            await self.limiter.address(address)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = int(self.clock())
        pending = PendingChange(token_hash(token), address, key, now, now + token_ttl, origin)
        await self._challenge(pending, token, "confirm", mailer)
        log.info("key %s for %s waits for confirmation (%s)", key.fingerprint, address, actor)
        return Outcome("pending", address, key.fingerprint, pending.expires)

    # -- administrator ---------------------------------------------------------------------
    async def admin_bind(self, address: str, data: bytes, *, actor: str = "admin-api") -> Outcome:
        """Bind without a challenge: the provider has verified the owner some other way. A key
        already stored is merged, never rolled back, and a revoked one is never bound again."""
        address = self._address(address)
        self._check_size(data)
        try:
            validated = await self._validate(data, address, require_uid=False)
        except KeyRejected as error:
            raise Refused("key-rejected", str(error)) from None
        return await self._admin_store(address, data, validated, address, actor, dry_run=False)

    async def admin_import(
        self, data: bytes, *, actor: str = "cli", dry_run: bool = False
    ) -> list[Outcome]:
        """One key bound to each address of its user IDs in the served domains (moving in from
        another filter's keyring), by the rules of ``admin_bind``. A revoked key that is
        registered here is revoked here too (gpg proved the revocation); elsewhere refused."""
        self._check_size(data)
        try:
            validated = await self._validate(data, "", require_uid=False)
        except KeyRevoked as revoked:
            return await self._import_revocation(revoked.fingerprint, data, actor, dry_run)
        except KeyRejected as error:
            raise Refused("key-rejected", str(error)) from None
        served = []
        for address in validated.addresses:
            try:
                served.append(self._address(address))
            except Refused:
                continue
        if not served:
            raise Refused("foreign-domain", f"no user ID of the key is in {_listed(self.domains)}")
        return [
            await self._admin_store(address, data, validated, None, actor, dry_run=dry_run)
            for address in served
        ]

    async def _import_revocation(
        self, fingerprint: str, data: bytes, actor: str, dry_run: bool
    ) -> list[Outcome]:
        holders = [
            b.address
            for b in await asyncio.to_thread(self.store.bindings)
            if b.key.fingerprint == fingerprint and not b.key.revoked
        ]
        if not holders:
            raise Refused("key-rejected", "the key is revoked")
        if dry_run:
            return [Outcome("revoked", address, fingerprint) for address in holders]
        return [await self._revoke(address, data, actor=actor) for address in holders]

    async def _admin_store(
        self,
        address: str,
        data: bytes,
        validated: ValidatedKey,
        merge_address: str | None,
        actor: str,
        *,
        dry_run: bool,
    ) -> Outcome:
        async def attempt() -> tuple[str, StoredKey]:
            key = validated.key
            active = await self._keys(address)
            stored = await asyncio.to_thread(self.store.key, key.fingerprint)
            if stored is not None:
                if stored.revoked:
                    raise _key_revoked()
                merged = await self._merge(stored, data, merge_address or "", require_uid=False)
                if not merged.changed and any(k.fingerprint == key.fingerprint for k in active):
                    return "unchanged", stored
                key = merged.key
            elif await asyncio.to_thread(self.store.was_revoked, key.fingerprint):
                raise _key_revoked()
            if any(k.fingerprint == key.fingerprint for k in active):
                action = "renewed"
            elif active:
                action = "replaced"
            else:
                action = "registered"
            if not dry_run:
                await asyncio.to_thread(
                    self.store.bind, address, key, replace=True, expected=stored_state(stored)
                )
            return action, key

        action, key = await self._retrying(attempt)
        if action != "unchanged" and not dry_run:
            await self._changed(action, address, key, actor)
            # The provider vouched for the owner: a new key enrols the address (a renewal
            # does not), with the admin's choice of encrypting what is stored.
            if action in ("registered", "replaced"):
                self._enrolled(address)
        return Outcome(action, address, key.fingerprint, key.expires)

    async def admin_withdraw(self, address: str) -> Outcome:
        """Unbind an address's keys; a revoked key stays (it keeps mail held): bind another."""
        address = normalise_address(address)
        active = await self._keys(address)
        if not active:
            raise Refused("nothing-registered", "no key is registered for this address")
        if any(k.revoked for k in active):
            raise _revoked_stays()
        await asyncio.to_thread(self.store.remove, address)
        for key in active:
            await self._changed("withdrawn", address, key, "admin-api")
        return Outcome("withdrawn", address, active[-1].fingerprint, active[-1].expires)

    async def admin_remove(
        self, target: str, *, actor: str, revoked_too: bool = False
    ) -> list[Outcome]:
        """Unbind an address's keys, or a key (by fingerprint) from every address, audited.

        A revoked key keeps mail for its addresses held: it goes only when ``revoked_too``
        says the administrator means it (its revocation is still remembered: the key can
        never be bound again)."""
        wanted = target.replace(" ", "")
        by_fingerprint = bool(_FINGERPRINT.match(wanted))
        wanted = wanted.upper() if by_fingerprint else normalise_address(wanted)
        bindings = [
            b
            for b in await asyncio.to_thread(self.store.bindings)
            if (b.key.fingerprint == wanted if by_fingerprint else b.address == wanted)
        ]
        if not bindings:
            raise Refused("nothing-registered", f"nothing is registered for {wanted}")
        if not revoked_too and any(b.key.revoked for b in bindings):
            raise _revoked_stays()
        async with self._updating:
            await asyncio.to_thread(self.store.remove, wanted)
        outcomes = []
        for binding in bindings:
            await self._changed("withdrawn", binding.address, binding.key, actor)
            outcomes.append(
                Outcome("withdrawn", binding.address, binding.key.fingerprint, binding.key.expires)
            )
        return outcomes

    async def audit_log(self, address: str | None, limit: int) -> list[AuditEntry]:
        if address is not None:
            address = normalise_address(address)
        return await asyncio.to_thread(self.store.audit_log, address, limit)

    # -- expiry ----------------------------------------------------------------------------
    async def notify_expiry(self) -> int:
        """Tell owners before and when their key expires, each once per key and expiry date
        (a renewed key gets its own notices later); returns how many notices went out."""
        now = int(self.clock())
        horizon = now + self.policy.expiry_notice_days * 86400
        sent = 0
        for binding in await asyncio.to_thread(self.store.bindings):
            key = binding.key
            ends = last_usable_moment(key)
            if key.revoked or ends is None or ends > horizon:
                continue
            kind = "expired" if ends <= now else "expiring"
            first = await asyncio.to_thread(
                self.store.mark_notice, key.fingerprint, f"{kind}:{ends}"
            )
            if first:
                notice = Notice(kind, binding.address, key.fingerprint, "expiry", ends)
                if await self._notify(notice):
                    sent += 1
        return sent

    # -- helpers ---------------------------------------------------------------------------
    def _check_size(self, data: bytes) -> None:
        if len(data) > self.policy.max_key_bytes:
            raise Refused("too-large", f"a key may have at most {self.policy.max_key_bytes} bytes")

    async def _keys(self, address: str) -> list[StoredKey]:
        return await asyncio.to_thread(self.store.keys_for, address)

    async def _challenge(
        self, pending: PendingChange, token: str, purpose: Purpose, mailer: Mailer | None = None
    ) -> None:
        """Keep the change, then mail its token (by ``mailer``, else the registry's own); a
        change whose mail failed is dropped again."""
        await asyncio.to_thread(self.store.add_pending, pending)
        try:
            await (mailer or self.mailer).send_challenge(
                pending.address, pending.key, purpose=purpose, token=token, expires=pending.expires
            )
        except MailError as error:
            await asyncio.to_thread(self.store.take_pending, pending.token_hash, pending.created)
            log.warning("challenge mail to %s failed: %s", pending.address, error)
            raise Refused(
                "mail-failed", "the confirmation mail could not be sent: try later"
            ) from None

    async def _update(
        self, address: str, data: bytes, current: StoredKey, *, actor: str
    ) -> Outcome:
        """An update of the active key needs no challenge: it is merged with the stored copy,
        so only what the key itself signed is added, and nothing moves back."""
        if current.revoked:
            raise _key_revoked()

        async def attempt() -> tuple[Outcome, StoredKey]:
            stored = await asyncio.to_thread(self.store.key, current.fingerprint)
            if stored is None:
                raise Refused("stale", "the key was withdrawn meanwhile: upload it again")
            try:
                merged = await self._merge(stored, data, address, require_uid=True)
            except KeyRevoked:
                return await self._revoke(address, data, actor=actor), stored
            if not merged.changed:
                return Outcome("unchanged", address, stored.fingerprint, stored.expires), stored
            key = merged.key
            await asyncio.to_thread(
                self.store.bind, address, key, replace=False, expected=stored_state(stored)
            )
            return Outcome("renewed", address, key.fingerprint, key.expires), key

        outcome, key = await self._retrying(attempt)
        if outcome.action == "renewed":
            await self._changed("renewed", address, key, actor)
        return outcome

    async def _merge(
        self, stored: StoredKey, data: bytes, address: str, *, require_uid: bool
    ) -> MergedKey:
        try:
            async with self.gpg_slots.hold():  # gpg checks the merged copy: bounded, as uploads
                return await asyncio.to_thread(
                    merge_key,
                    stored,
                    data,
                    address=address,
                    require_uid=require_uid,
                    min_valid_days=self.policy.min_valid_days,
                    max_bytes=self.policy.max_key_bytes,
                    gpg_binary=self.policy.gpg_binary,
                )
        except KeyRevoked:
            raise
        except KeyRejected as error:
            log.info("update for %s refused: %s", address, error)
            raise Refused("key-rejected", str(error)) from None

    async def _forward(self, key: StoredKey) -> tuple[StoredKey, str]:
        """``key`` merged with the stored copy of the same key, if there is one (it may be
        bound to another address): a confirmation never rolls a stored key back. Also the
        ``stored_state`` merged against, for the store to check."""
        stored = await asyncio.to_thread(self.store.key, key.fingerprint)
        if stored is None:
            await self._refuse_revoked(key.fingerprint)
            return key, stored_state(None)
        if stored.revoked:
            raise _key_revoked()
        try:
            merged = await self._merge(stored, key.key_data, "", require_uid=False)
        except KeyRevoked:
            await self._remember_revocation(key.fingerprint)
            raise _key_revoked() from None
        return merged.key, stored_state(stored)

    async def _refuse_revoked(self, fingerprint: str) -> None:
        """A key revoked once is never registered again, even after its copy was deleted."""
        if await asyncio.to_thread(self.store.was_revoked, fingerprint):
            raise _key_revoked()

    async def _remember_revocation(self, fingerprint: str) -> None:
        """A revocation signed by the key itself came with an upload: the store keeps it, so
        no copy without it is ever accepted again."""
        holders = await asyncio.to_thread(self.store.revoke, fingerprint)
        log.info("key %s is revoked (bound to %d addresses)", fingerprint, holders)

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Read, merge and store, once more when the store refused the merge as stale: another
        host stored its own update in between, and merging again keeps both. The lock only
        orders the updates of this process."""
        for _ in range(MERGE_ATTEMPTS):
            try:
                async with self._updating:
                    return await attempt()
            except StaleMerge as error:
                log.info("update merged again: %s", error)
            except KeyWasRevoked:
                raise _key_revoked() from None
        raise Refused(
            "stale", "the key was changed by other requests at the same moment: try again"
        )

    async def _revoke(self, address: str, data: bytes, *, actor: str) -> Outcome:
        """A revocation signed by the active key takes effect at once: its holder said so."""
        for key in await self._keys(address):
            if key.revoked:
                continue
            try:
                async with self.gpg_slots.hold():
                    revokes = await asyncio.to_thread(
                        check_revocation, data, key, gpg_binary=self.policy.gpg_binary
                    )
            except KeyRejected:  # not for this key (or forged): try the address's others
                continue
            if revokes:
                await asyncio.to_thread(self.store.revoke, key.fingerprint)
                await self._changed("revoked", address, key, actor)
                return Outcome("revoked", address, key.fingerprint, key.expires)
        raise Refused(
            "revocation-unmatched", "this revocation is not for a key registered for this address"
        )

    async def _changed(self, action: str, address: str, key: StoredKey, actor: str) -> None:
        await self._audit(action, address, key, actor)
        await self._notify(Notice(action, address, key.fingerprint, actor, key.expires))

    async def _audit(self, action: str, address: str, key: StoredKey, actor: str) -> None:
        """Record a change (a setting's too, which mails no notice: its owner made it)."""
        entry = AuditEntry(int(self.clock()), address, action, key.fingerprint, actor)
        await asyncio.to_thread(self.store.record_audit, entry)
        log.info("key %s %s for %s by %s", key.fingerprint, action, address, actor)

    async def _notify(self, notice: Notice) -> bool:
        """A notice that cannot be sent does not undo the change; it is logged instead."""
        try:
            await self.mailer.send_notice(notice)
        except MailError as error:
            log.warning("notice (%s) to %s failed: %s", notice.action, notice.address, error)
            return False
        return True


def _key_revoked() -> Refused:
    return Refused(
        "key-revoked",
        "this key was revoked, and a revocation is forever: register a new key",
    )


def _revoked_stays() -> Refused:
    return Refused(
        "revoked-key-stays",
        "the key registered for this address is revoked and stays registered, so that mail"
        " for it is held rather than stored in clear: register a new key instead",
    )


def last_usable_moment(key: StoredKey) -> int | None:
    """When the key stops being able to encrypt: its primary key's or its last encryption
    subkey's expiry, whichever comes first; None for never."""
    ends: list[int] = []
    if key.encryption_keys and all(k.expires is not None for k in key.encryption_keys):
        ends.append(max(k.expires for k in key.encryption_keys if k.expires is not None))
    if key.expires is not None:
        ends.append(key.expires)
    return min(ends) if ends else None
