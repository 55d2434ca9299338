"""What happens to one message: classify it, decide per recipient, encrypt, deliver, answer.

This module holds the policy and speaks neither SMTP nor OpenPGP itself: it meets the protocol
side (``receive``), the engine (``engine``), the store (``keystore.store.KeyLookup``: one
asynchronous, time-bounded question) and the downstream (``deliver``) through small
interfaces, so each can be tested and replaced on its own.

The rules it enforces (docs/design.md, "Decisions"): one ciphertext per recipient with only that
recipient's keys; "enrolled" comes from the store, never from gpg; every internal failure is a
4xx for the recipients it touches; and a recipient is reported delivered only when the
downstream said so.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from gpgfilter.mail import protect, storedcopy
from gpgfilter.mail.classify import Verdict, classify
from gpgfilter.mail.deliver import Reply
from gpgfilter.mail.rawmessage import RawMessage, split
from gpgfilter.mail.recipients import canonical_address
from gpgfilter.openpgp.engine import Engine, EngineError, Plaintext, Recipient
from gpgfilter.process.config import PolicyConfig
from gpgfilter.process.metrics import Metrics
from keystore.model import HeaderProtection
from keystore.store import KeyLookup, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TEMPORARY_FAILURE = Reply(451, "4.3.0 Temporary failure, try again later")
NO_KEY_DEFERRED = Reply(451, "4.7.1 No encryption key is registered for this recipient yet")
KEY_UNUSABLE = Reply(
    451, "4.7.1 The recipient's encryption key has expired or was revoked; held until renewed"
)
LARGE_MESSAGE_BYTES = 4 * 1024 * 1024
_POSTFIX_QUEUE_ID = re.compile(r"\(Postfix\)[^;]*?\bid ([0-9A-Za-z]+)")
_PLAIN_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


class Outcome(enum.Enum):
    ENCRYPTED = "encrypted"
    ALREADY_ENCRYPTED = "already_encrypted"
    NO_KEY = "no_key"
    UNUSABLE_KEY = "unusable_key"
    DEFERRED = "deferred"
    FAILED = "failed"


class Deliverer(Protocol):
    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes | Sequence[bytes],
        *,
        smtputf8: bool = False,
    ) -> list[Reply]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str  # "" for the null sender
    recipients: tuple[str, ...]
    content: bytes
    smtputf8: bool = False


@dataclass(slots=True)
class _Decision:
    outcome: Outcome
    recipient: Recipient | None = None  # set when the copy must be encrypted
    protection: HeaderProtection = "off"
    reply: Reply | None = None  # set when we answer without delivering
    payload: list[bytes] | None = None


@dataclass(slots=True)
class _Report:
    queue_id: str
    size: int
    verdict: Verdict
    started: float
    encrypt_seconds: float = 0.0
    deliver_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class MailFilter:
    def __init__(
        self,
        *,
        keys: KeyLookup,
        engine: Engine,
        deliverer: Deliverer,
        metrics: Metrics,
        policy: PolicyConfig,
        recipient_delimiter: str = "+",
        gpg_processes: int = 4,
        gpg_timeout: float = 120.0,
        all_or_nothing: bool = False,
    ) -> None:
        self.keys = keys
        self.engine = engine
        self.deliverer = deliverer
        self.metrics = metrics
        self.policy = policy
        self.delimiters = recipient_delimiter
        self.gpg_timeout = gpg_timeout
        # SMTP mode answers once per message: one recipient's failure must then stop them all
        # before anything is delivered.
        self.all_or_nothing = all_or_nothing
        self._gpg_slots = asyncio.Semaphore(gpg_processes)
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._active

    async def drain(self, seconds: float) -> bool:
        """Wait until no message is being processed (at most ``seconds``); True if none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def process(self, envelope: Envelope) -> list[Reply]:
        """One reply per recipient, in envelope order. Never raises."""
        self.metrics.in_flight.inc()
        self._active += 1
        self._idle.clear()
        try:
            return await self._process(envelope)
        except Exception:  # a bug of ours: defer, never bounce, never lose
            log.exception("internal error while processing a message; deferring it")
            self.metrics.messages.labels("failed").inc()
            return [TEMPORARY_FAILURE] * len(envelope.recipients)
        finally:
            self.metrics.in_flight.dec()
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _process(self, envelope: Envelope) -> list[Reply]:
        started = time.monotonic()
        message = split(envelope.content)
        verdict = classify(message)
        report = _Report(_queue_id(message), len(envelope.content), verdict, started)
        self.metrics.message_bytes.observe(report.size)
        decisions = await _together([self._decide(r, verdict) for r in envelope.recipients])
        if not self.all_or_nothing:
            replies = await self._encrypt_and_deliver(message, envelope, decisions, report)
        else:
            await self._encrypt_all(message, decisions, report)
            refusals = [d.reply for d in decisions if d.reply is not None and not d.reply.ok]
            if refusals:
                # One answer for the whole transaction: nothing is delivered unless all can be.
                replies = [refusals[0]] * len(decisions)
            else:
                replies = await self._deliver(envelope, decisions, report)
        self._account(envelope, decisions, replies, report)
        return replies

    async def _decide(self, recipient: str, verdict: Verdict) -> _Decision:
        if verdict.already_encrypted:
            return _Decision(Outcome.ALREADY_ENCRYPTED)
        address = canonical_address(recipient, self.delimiters)
        try:
            keys = await self.keys.keys_for(address)
        except StoreUnavailable as error:
            # The one line an admin sees when the database hangs: which mail waits, and why.
            self.metrics.keystore_up.set(0)
            log.warning(
                "key store did not answer for a recipient at %s; deferring it (451): %s",
                _log_domain(address),
                error,
            )
            return _Decision(Outcome.FAILED, reply=TEMPORARY_FAILURE)
        except StoreError as error:
            self.metrics.keystore_up.set(0)
            log.error("key store unavailable, deferring: %s", error)
            return _Decision(Outcome.FAILED, reply=TEMPORARY_FAILURE)
        self.metrics.keystore_up.set(1)
        if not keys:
            if self.policy.no_key == "defer":
                return _Decision(Outcome.DEFERRED, reply=NO_KEY_DEFERRED)
            return _Decision(Outcome.NO_KEY)
        recipient_key = storedcopy.recipient_for(keys)
        if recipient_key is None:
            if self.policy.unusable_key == "deliver":
                return _Decision(Outcome.UNUSABLE_KEY)
            return _Decision(Outcome.DEFERRED, reply=KEY_UNUSABLE)
        protection = storedcopy.protection_for(keys, self.policy.header_protection)
        return _Decision(Outcome.ENCRYPTED, recipient=recipient_key, protection=protection)

    async def _encrypt_all(
        self, message: RawMessage, decisions: list[_Decision], report: _Report
    ) -> None:
        todo = [d for d in decisions if d.recipient is not None]
        if not todo:
            return
        layouts = _Layouts(message)
        started = time.monotonic()
        results: list[bytes | BaseException | None] = await asyncio.gather(
            *(
                self._encrypt(layouts.of(d).inner, d.recipient)
                for d in todo
                if d.recipient is not None
            ),
            return_exceptions=True,
        )
        report.encrypt_seconds = time.monotonic() - started
        for position, decision in enumerate(todo):
            result = results[position]
            results[position] = None  # a large ciphertext is not kept twice
            if isinstance(result, bytes):
                decision.payload = storedcopy.assemble(
                    message, result, outer=layouts.of(decision).outer
                )
                del result
            elif result is not None:
                self._failed(decision, result, report)

    def _failed(self, decision: _Decision, error: BaseException, report: _Report) -> None:
        decision.outcome = Outcome.FAILED
        decision.reply = TEMPORARY_FAILURE
        if isinstance(error, EngineError):
            report.notes.append(f"encryption failed: {error}")
        elif isinstance(error, TimeoutError):
            report.notes.append("encryption timed out")
        else:
            log.error("unexpected encryption error", exc_info=error)
            report.notes.append(f"encryption error: {type(error).__name__}")

    async def _encrypt_and_deliver(
        self,
        message: RawMessage,
        envelope: Envelope,
        decisions: list[_Decision],
        report: _Report,
    ) -> list[Reply]:
        """Per-recipient answers (LMTP): each copy is delivered as soon as it is encrypted and
        then let go, so a large message to many recipients is never held encrypted N times."""
        replies: list[Reply | None] = [d.reply for d in decisions]
        layouts = _Layouts(message)
        # A large message's copies are made one after the other: each costs ~1.4x the message
        # plus the engine's buffers, and N of them at once would multiply that by N.
        one_at_a_time = asyncio.Lock() if len(envelope.content) > LARGE_MESSAGE_BYTES else None

        async def send(payload: bytes | list[bytes], indexes: list[int]) -> None:
            started = time.monotonic()
            answers = await self.deliverer.send(
                envelope.mail_from,
                [envelope.recipients[i] for i in indexes],
                payload,
                smtputf8=_needs_smtputf8(envelope, indexes),
            )
            report.deliver_seconds = max(report.deliver_seconds, time.monotonic() - started)
            for index, reply in zip(indexes, answers, strict=True):
                replies[index] = reply

        async def copy(index: int, decision: _Decision, recipient: Recipient) -> None:
            if one_at_a_time is None:
                await make_and_send(index, decision, recipient)
                return
            async with one_at_a_time:
                await make_and_send(index, decision, recipient)

        async def make_and_send(index: int, decision: _Decision, recipient: Recipient) -> None:
            started = time.monotonic()
            try:
                layout = layouts.of(decision)
                armored = await self._encrypt(layout.inner, recipient)
                payload = storedcopy.assemble(message, armored, outer=layout.outer)
            except Exception as error:
                self._failed(decision, error, report)
                replies[index] = decision.reply
                return
            finally:
                report.encrypt_seconds = max(report.encrypt_seconds, time.monotonic() - started)
            del armored
            await send(payload, [index])

        unchanged = [i for i, d in enumerate(decisions) if d.reply is None and d.recipient is None]
        tasks = [send(envelope.content, unchanged)] if unchanged else []
        tasks += [
            copy(i, d, d.recipient)
            for i, d in enumerate(decisions)
            if d.reply is None and d.recipient is not None
        ]
        await _together(tasks)
        return [r or TEMPORARY_FAILURE for r in replies]

    async def _encrypt(self, inner: Plaintext, recipient: Recipient) -> bytes:
        async with self._gpg_slots:  # a bounded number of engine processes at once
            started = time.monotonic()
            armored = await storedcopy.encrypt_checked(
                self.engine, inner, recipient, timeout=self.gpg_timeout
            )
            self.metrics.encryption_seconds.observe(time.monotonic() - started)
        return armored

    async def _deliver(
        self, envelope: Envelope, decisions: list[_Decision], report: _Report
    ) -> list[Reply]:
        replies: list[Reply | None] = [d.reply for d in decisions]
        groups: list[tuple[bytes | list[bytes], list[int]]] = []
        unchanged = [i for i, d in enumerate(decisions) if d.reply is None and d.payload is None]
        if unchanged:
            groups.append((envelope.content, unchanged))
        groups += [
            (d.payload, [i]) for i, d in enumerate(decisions) if d.reply is None and d.payload
        ]
        started = time.monotonic()
        answers = await asyncio.gather(
            *(
                self.deliverer.send(
                    envelope.mail_from,
                    [envelope.recipients[i] for i in indexes],
                    payload,
                    smtputf8=_needs_smtputf8(envelope, indexes),
                )
                for payload, indexes in groups
            )
        )
        report.deliver_seconds = time.monotonic() - started
        for (_payload, indexes), group_replies in zip(groups, answers, strict=True):
            for index, reply in zip(indexes, group_replies, strict=True):
                replies[index] = reply
        return [r or TEMPORARY_FAILURE for r in replies]

    def _account(
        self,
        envelope: Envelope,
        decisions: list[_Decision],
        replies: list[Reply],
        report: _Report,
    ) -> None:
        outcomes = {d.outcome for d in decisions}
        for candidate in (
            Outcome.FAILED,
            Outcome.DEFERRED,
            Outcome.ENCRYPTED,
            Outcome.ALREADY_ENCRYPTED,
            Outcome.UNUSABLE_KEY,
            Outcome.NO_KEY,
        ):
            if candidate in outcomes:
                message_outcome = candidate
                break
        label = "no_key" if message_outcome is Outcome.UNUSABLE_KEY else message_outcome.value
        self.metrics.messages.labels(label).inc()
        elapsed = time.monotonic() - report.started
        self.metrics.processing_seconds.observe(elapsed)
        log.info(
            "message queue_id=%s size=%d recipients=%d verdict=%s outcome=%s ms=%.1f"
            " encrypt_ms=%.1f deliver_ms=%.1f%s",
            report.queue_id,
            report.size,
            len(decisions),
            report.verdict.value,
            message_outcome.value,
            elapsed * 1000,
            report.encrypt_seconds * 1000,
            report.deliver_seconds * 1000,
            "".join(f" note={note!r}" for note in report.notes),
        )
        for recipient, decision, reply in zip(envelope.recipients, decisions, replies, strict=True):
            result = "delivered" if reply.ok else "deferred" if reply.temporary else "rejected"
            self.metrics.recipients.labels(decision.outcome.value, result).inc()
            log.info(
                "recipient queue_id=%s to=<%s> outcome=%s result=%s reply=%r",
                report.queue_id,
                recipient,
                decision.outcome.value,
                result,
                str(reply),
            )


class _Layouts:
    """Each header-protection layout of one message, made once however many copies use it."""

    def __init__(self, message: RawMessage) -> None:
        self.message = message
        self.made: dict[HeaderProtection, protect.Layout] = {}

    def of(self, decision: _Decision) -> protect.Layout:
        mode = decision.protection
        if mode not in self.made:
            self.made[mode] = protect.layout(self.message, mode)
        return self.made[mode]


async def _together(work: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """``asyncio.gather``, without its task per coroutine when there is only one (most mail
    has a single recipient)."""
    if len(work) == 1:
        return [await work[0]]
    return list(await asyncio.gather(*work))


def _needs_smtputf8(envelope: Envelope, indexes: list[int]) -> bool:
    """Ask the downstream for SMTPUTF8 only when the envelope itself is not ASCII.

    Raw UTF-8 in header fields alone does not need it: Dovecot 2.3 stores such mail, but does
    not offer SMTPUTF8, and Postfix bounces (5.6.7) a message flagged SMTPUTF8 rather than hand
    it to Dovecot. Not passing the flag on for header-only UTF-8 keeps that mail deliverable.
    """
    if not envelope.smtputf8:
        return False
    addresses = [envelope.mail_from, *(envelope.recipients[i] for i in indexes)]
    return not all(address.isascii() for address in addresses)


def _log_domain(address: str) -> str:
    """The address's domain as a log may show it: a plain DNS name as is, anything else (it
    came from the client) as a short hash."""
    domain = address.rpartition("@")[2]
    if _PLAIN_DOMAIN.fullmatch(domain):
        return domain
    return "sha256:" + hashlib.sha256(domain.encode("utf-8", "replace")).hexdigest()[:16]


def _queue_id(message: RawMessage) -> str:
    """Postfix's queue id from the Received field it added on top, or "-"."""
    received = message.first("received")
    if received is None:
        return "-"
    found = _POSTFIX_QUEUE_ID.search(received.value)
    return found.group(1) if found else "-"
