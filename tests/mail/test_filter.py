"""The filter's decisions and replies, end to end through its own SMTP/LMTP server, with real
gpg and a scriptable downstream (the real Dovecot is in the end-to-end tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gpgfilter.mail import rawmessage
from gpgfilter.mail.classify import Verdict, classify
from gpgfilter.mail.deliver import MailClient, Reply
from gpgfilter.openpgp.engine import EngineError, Recipient
from gpgfilter.process.config import Endpoint, PolicyConfig, load
from gpgfilter.process.metrics import Metrics
from gpgfilter.process.service import Service, start
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.validate import validate_key
from tests.support.fakes import Downstream
from tests.support.openpgp_tools import TestKey, decrypt_gpg, packet_recipients

PLAIN = (
    b"Received: from client (client [127.0.0.1])\r\n\tby mail.test (Postfix) with ESMTP id"
    b" 4AbCdEf123; Sat, 21 Nov 2026 10:00:00 +0000 (UTC)\r\n"
    b"From: Carol <carol@example.test>\r\nTo: alice@example.test\r\nSubject: plans\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nHello \xc3\xa4\r\n.leading dot\r\n"
)


def register(data_dir: Path, key: TestKey, address: str | None = None) -> None:
    store = SQLiteKeyStore(data_dir / "keys.sqlite", create=True)
    validated = validate_key(key.public, address=address)
    for bound in validated.addresses:
        store.bind(bound, validated.key)
    store.close()


class Harness:
    def __init__(self, service: Service, downstream: Downstream, metrics: Metrics) -> None:
        self.service = service
        self.downstream = downstream
        self.metrics = metrics
        self.client = MailClient(
            service.config.listen, lmtp=service.config.mode == "lmtp", helo="test", timeout=30
        )

    async def send(
        self, recipients: list[str], data: bytes = PLAIN, mail_from: str = "carol@example.test"
    ) -> list[Reply]:
        return await self.client.send(mail_from, recipients, data)

    def delivered_to(self, recipient: str) -> list[bytes]:
        return [d.data for d in self.downstream.deliveries if recipient in d.recipients]

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "gpgfilter_messages_total", {"outcome": outcome}
        )
        return value or 0.0


HarnessFactory = Callable[..., "asyncio.Future[Harness]"]


@pytest.fixture
async def harness(data_dir: Path) -> AsyncIterator[Callable[..., object]]:
    started: list[tuple[Service, Downstream]] = []

    async def make(mode: str = "lmtp", **overrides: object) -> Harness:
        downstream = Downstream(lmtp=mode == "lmtp")
        await downstream.start()
        config = load(
            None,
            {
                "mode": mode,
                "listen": "127.0.0.1:0",
                "deliver": f"127.0.0.1:{downstream.port}",
                "data_dir": str(data_dir),
                "hostname": "filter.test",
            },
        )
        config = replace(config, **overrides)  # type: ignore[arg-type]
        metrics = Metrics()
        service = await start(config, metrics)
        port = service.server.sockets[0].getsockname()[1]
        service.config = replace(config, listen=Endpoint("127.0.0.1", port))
        started.append((service, downstream))
        return Harness(service, downstream, metrics)

    yield make
    for service, downstream in started:
        await service.close()
        await downstream.stop()


def inner_plaintext(delivered: bytes, key: TestKey) -> bytes:
    message = rawmessage.split(delivered)
    assert classify(message) is Verdict.PGP_MIME
    armored = message.body[message.body.index(b"-----BEGIN PGP MESSAGE-----") :]
    armored = armored[: armored.index(b"-----END PGP MESSAGE-----") + 25]
    assert packet_recipients(armored) == set(fpr[-16:] for fpr in key.encryption_subkeys), (
        "the copy must be encrypted to this recipient's keys only"
    )
    return decrypt_gpg(key, armored)


async def test_each_recipient_gets_own_ciphertext_and_unenrolled_gets_original(
    harness: Callable[..., object], data_dir: Path, alice: TestKey, bob: TestKey
) -> None:
    register(data_dir, alice)
    register(data_dir, bob)
    h: Harness = await harness()  # type: ignore[misc]
    recipients = ["alice@example.test", "dave@example.test", "Bob+lists@EXAMPLE.test"]
    replies = await h.send(recipients)
    assert [r.code for r in replies] == [250, 250, 250]
    expected_inner = rawmessage.split(PLAIN).inner_entity()
    (to_alice,) = h.delivered_to("alice@example.test")
    (to_bob,) = h.delivered_to("Bob+lists@EXAMPLE.test")
    (to_dave,) = h.delivered_to("dave@example.test")
    assert inner_plaintext(to_alice, alice) == expected_inner
    assert inner_plaintext(to_bob, bob) == expected_inner
    assert to_dave == PLAIN
    # The outer message keeps the routing and display headers, and only those.
    outer = rawmessage.split(to_alice)
    names = [f.name for f in outer.fields]
    assert names[:4] == ["received", "from", "to", "subject"]
    assert names.count("content-type") == 1 and "content-transfer-encoding" not in names
    assert b"plans" in to_alice and b"Hello" not in to_alice
    assert h.count("encrypted") == 1


async def test_lmtp_replies_mirror_the_downstream_per_recipient(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    h.downstream.codes = {
        "b@example.test": "452 4.2.2 <b@example.test> Mailbox is full",
        "c@example.test": "550 5.1.1 <c@example.test> User doesn't exist",
    }
    replies = await h.send(["alice@example.test", "b@example.test", "c@example.test"])
    assert [str(r) for r in replies] == [
        "250 2.0.0 <alice@example.test> Saved",
        "452 4.2.2 <b@example.test> Mailbox is full",
        "550 5.1.1 <c@example.test> User doesn't exist",
    ]


async def test_rcpt_refusal_downstream_is_mirrored(harness: Callable[..., object]) -> None:
    h: Harness = await harness()  # type: ignore[misc]
    h.downstream.rcpt_codes = {"ghost@example.test": "550 5.1.1 <ghost@example.test> Unknown"}
    replies = await h.send(["x@example.test", "ghost@example.test"])
    assert [r.code for r in replies] == [250, 550]
    assert [d.recipients for d in h.downstream.deliveries] == [["x@example.test"]]


class BrokenEngine:
    def __init__(self, error: Exception | None = None, output: bytes = b"") -> None:
        self.error = error
        self.output = output

    async def encrypt(self, plaintext: bytes, recipient: Recipient) -> bytes:
        if self.error:
            raise self.error
        return self.output


@pytest.mark.parametrize(
    "engine",
    [
        BrokenEngine(EngineError("gpg failed (exit 2, status FAILURE)")),
        BrokenEngine(RuntimeError("a bug")),
    ],
    ids=["engine-error", "bug"],
)
async def test_encryption_failure_defers_only_that_recipient_in_lmtp_mode(
    harness: Callable[..., object], data_dir: Path, alice: TestKey, engine: BrokenEngine
) -> None:
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    h.service.filter.engine = engine
    replies = await h.send(["alice@example.test", "nokey@example.test"])
    assert str(replies[0]) == "451 4.3.0 Temporary failure, try again later"
    assert replies[1].code == 250
    assert h.delivered_to("alice@example.test") == []
    assert h.delivered_to("nokey@example.test") == [PLAIN]
    assert h.count("failed") == 1


async def test_gpg_output_is_checked_not_trusted(
    harness: Callable[..., object], data_dir: Path, alice: TestKey, bob: TestKey
) -> None:
    """An engine that exits 0 with empty output, garbage, or a ciphertext for someone else."""
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    real = h.service.filter.engine
    bob_key = validate_key(bob.public).key
    for_bob = await real.encrypt(
        b"x", Recipient(bob_key.key_data, bob_key.usable_encryption_keys())
    )
    for output in (b"", b"-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----\n"):
        h.service.filter.engine = BrokenEngine(output=output)
        replies = await h.send(["alice@example.test"])
        assert replies[0].code == 451
    # A real engine whose output is addressed to another key is caught by the check.
    from gpgfilter.openpgp.check import check_ciphertext

    alice_key = validate_key(alice.public).key
    with pytest.raises(EngineError, match="not addressed"):
        check_ciphertext(for_bob, Recipient(alice_key.key_data, alice_key.usable_encryption_keys()))
    assert h.downstream.deliveries == []


async def test_smtp_mode_is_all_or_nothing(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness("smtp")  # type: ignore[misc]
    h.service.filter.engine = BrokenEngine(EngineError("boom"))
    replies = await h.send(["alice@example.test", "nokey@example.test"])
    assert [r.code for r in replies] == [451, 451]
    assert h.downstream.deliveries == []


async def test_smtp_mode_delivers_separate_transactions(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness("smtp")  # type: ignore[misc]
    replies = await h.send(["alice@example.test", "nokey@example.test", "other@example.test"])
    assert [r.code for r in replies] == [250, 250, 250]
    assert sorted(len(d.recipients) for d in h.downstream.deliveries) == [1, 2]
    (to_alice,) = h.delivered_to("alice@example.test")
    assert inner_plaintext(to_alice, alice) == rawmessage.split(PLAIN).inner_entity()


async def test_key_store_failure_defers(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    store_file = data_dir / "keys.sqlite"
    for variant in ("missing", "garbage"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_file}{suffix}").unlink(missing_ok=True)
        if variant == "garbage":
            store_file.write_bytes(b"this is not a database" * 100)
        replies = await h.send(["alice@example.test", "nokey@example.test"])
        assert [r.code for r in replies] == [451, 451], variant
    assert h.downstream.deliveries == []


async def test_already_encrypted_passes_unchanged(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    first = await h.send(["alice@example.test"])
    assert first[0].code == 250
    (encrypted,) = h.delivered_to("alice@example.test")
    h.downstream.deliveries.clear()
    again = await h.send(["alice@example.test"], data=encrypted)
    assert again[0].code == 250
    assert h.delivered_to("alice@example.test") == [encrypted]
    assert h.count("already_encrypted") == 1


async def test_unusable_key_policy(
    harness: Callable[..., object], data_dir: Path, key_factory: object
) -> None:
    from tests.support.openpgp_tools import KeyFactory

    assert isinstance(key_factory, KeyFactory)
    key = key_factory.make("erin@example.test", expires="1d")
    register(data_dir, key)
    from gpgfilter.mail.lookup import StoreLookup
    from gpgfilter.process.metrics import KeyStateCollector

    fresh = Metrics()
    lookup = StoreLookup(SQLiteKeyStore(data_dir / "keys.sqlite"), timeout=5)
    collector = KeyStateCollector(lookup)
    fresh.registry.register(collector)
    await collector.refresh()
    await lookup.close()
    assert fresh.registry.get_sample_value("gpgfilter_registered_keys", {"state": "expiring"}) == 1
    store = SQLiteKeyStore(data_dir / "keys.sqlite")
    (stored,) = store.keys_for("erin@example.test")
    expired = replace(stored, expires=1)  # the key's expiry has passed
    store.bind("erin@example.test", expired)
    store.close()
    h: Harness = await harness()  # type: ignore[misc]
    state = h.metrics.registry.get_sample_value
    await h.service.refresh_metrics()  # what a scrape of /metrics does first
    assert state("gpgfilter_registered_keys", {"state": "unusable"}) == 1
    replies = await h.send(["erin@example.test"])
    assert replies[0].code == 451 and "expired" in replies[0].text
    assert h.downstream.deliveries == []
    h2: Harness = await harness(  # type: ignore[misc]
        policy=PolicyConfig(unusable_key="deliver")
    )
    replies = await h2.send(["erin@example.test"])
    assert replies[0].code == 250
    assert h2.delivered_to("erin@example.test") == [PLAIN]


async def test_no_key_policy_defer(harness: Callable[..., object]) -> None:
    h: Harness = await harness(policy=PolicyConfig(no_key="defer"))  # type: ignore[misc]
    replies = await h.send(["nokey@example.test"])
    assert replies[0].code == 451
    assert h.downstream.deliveries == []


async def test_downstream_down_defers(harness: Callable[..., object]) -> None:
    h: Harness = await harness()  # type: ignore[misc]
    await h.downstream.stop()
    replies = await h.send(["a@example.test", "b@example.test"])
    assert [str(r) for r in replies] == ["451 4.4.0 Downstream unavailable, try again later"] * 2


async def test_null_sender_is_passed_as_empty_path(harness: Callable[..., object]) -> None:
    h: Harness = await harness()  # type: ignore[misc]
    replies = await h.send(["a@example.test"], mail_from="")
    assert replies[0].code == 250
    assert h.downstream.deliveries[0].mail_from == "<>"


async def test_many_transactions_on_one_connection(harness: Callable[..., object]) -> None:
    """Postfix reuses connections: the server must serve transaction after transaction."""
    h: Harness = await harness()  # type: ignore[misc]
    endpoint = h.service.config.listen
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)

    async def say(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        await writer.drain()
        return await reader.readline()

    await reader.readline()
    writer.write(b"LHLO test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    for n in range(3):
        assert (await say(b"MAIL FROM:<s@example.test>")).startswith(b"250")
        assert (await say(b"RCPT TO:<a@example.test>")).startswith(b"250")
        assert (await say(b"RCPT TO:<b@example.test>")).startswith(b"250")
        assert (await say(b"DATA")).startswith(b"354")
        writer.write(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % n)
        assert (await reader.readline()).startswith(b"250")
        assert (await reader.readline()).startswith(b"250")
        assert (await say(b"RSET")).startswith(b"250")
    assert (await say(b"QUIT")).startswith(b"221")
    writer.close()
    assert len(h.downstream.deliveries) == 3


class SlowEngine:
    def __init__(self, real: object, delay: float) -> None:
        self.real = real
        self.delay = delay
        self.finished = False

    async def encrypt(self, plaintext: bytes, recipient: Recipient) -> bytes:
        await asyncio.sleep(self.delay)
        armored: bytes = await self.real.encrypt(plaintext, recipient)  # type: ignore[attr-defined]
        self.finished = True
        return armored


async def test_stopping_finishes_messages_in_progress(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    slow = SlowEngine(h.service.filter.engine, 1.0)
    h.service.filter.engine = slow
    sending = asyncio.create_task(h.send(["alice@example.test"]))
    for _ in range(500):  # until the message is inside the filter
        if h.metrics.registry.get_sample_value("gpgfilter_messages_in_flight"):
            break
        await asyncio.sleep(0.01)
    await h.service.close()
    assert slow.finished, "close() must wait for the message in progress"
    replies = await sending
    assert [r.code for r in replies] == [250]
    assert len(h.delivered_to("alice@example.test")) == 1


@pytest.mark.parametrize("mode", ["lmtp", "smtp"])
async def test_oversized_message_is_refused_cleanly(
    harness: Callable[..., object], mode: str
) -> None:
    """Over max_message_size: a clean 552 — in LMTP, once per recipient, as the protocol
    requires (a single reply would leave Postfix waiting and retrying)."""
    h: Harness = await harness(mode, max_message_size=2048)  # type: ignore[misc]
    big = PLAIN + b"x" * 70 + b"\r\n" * 40
    big += (b"y" * 76 + b"\r\n") * 40
    replies = await h.send(["a@example.test", "b@example.test", "c@example.test"], data=big)
    assert [r.code for r in replies] == [552] * 3
    assert h.downstream.deliveries == []
    # The connection is still in step: the next message goes through.
    replies = await h.send(["a@example.test"])
    assert [r.code for r in replies] == [250]


class CountingEngine:
    """Wraps a real engine and records how many encryptions ran at once."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.running = 0
        self.most = 0

    async def encrypt(self, plaintext: bytes, recipient: Recipient) -> bytes:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.05)
            armored: bytes = await self.real.encrypt(plaintext, recipient)  # type: ignore[attr-defined]
            return armored
        finally:
            self.running -= 1


async def test_large_message_copies_are_made_one_at_a_time(
    harness: Callable[..., object], data_dir: Path, key_factory: object
) -> None:
    """Memory stays bounded: a large message's encrypted copies are not all held at once."""
    from gpgfilter.mail.filter import LARGE_MESSAGE_BYTES
    from tests.support.openpgp_tools import KeyFactory

    assert isinstance(key_factory, KeyFactory)
    recipients = [f"big{n}@example.test" for n in range(3)]
    for address in recipients:
        register(data_dir, key_factory.make(address))
    h: Harness = await harness()  # type: ignore[misc]
    counting = CountingEngine(h.service.filter.engine)
    h.service.filter.engine = counting
    assert [r.code for r in await h.send(recipients)] == [250] * 3
    assert counting.most == 3, "small messages are encrypted in parallel"
    counting.most = 0
    large = PLAIN + (b"z" * 998 + b"\r\n") * (LARGE_MESSAGE_BYTES // 1000 + 10)
    assert [r.code for r in await h.send(recipients, data=large)] == [250] * 3
    assert counting.most == 1
    assert len(h.downstream.deliveries) == 6


async def test_new_transactions_during_shutdown_get_421(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    """Postfix keeps connections open between messages: while the filter drains, a new
    transaction on such a connection is told to come back later, and nothing is lost."""
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    h.service.filter.engine = SlowEngine(h.service.filter.engine, 1.0)
    listen = h.service.config.listen
    reader, writer = await asyncio.open_connection(listen.host, listen.port)
    await reader.readline()
    writer.write(b"LHLO idle.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    sending = asyncio.create_task(h.send(["alice@example.test"]))
    for _ in range(500):
        if h.service.filter.in_flight:
            break
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(h.service.close())
    await asyncio.sleep(0.05)
    writer.write(b"MAIL FROM:<carol@example.test>\r\n")
    assert (await reader.readline()).startswith(b"421 4.3.2")
    writer.close()
    await closing
    assert [r.code for r in await sending] == [250]


async def test_reload_applies_a_new_policy_and_keeps_the_old_on_a_bad_file(
    harness: Callable[..., object], tmp_path: Path
) -> None:
    h: Harness = await harness()  # type: ignore[misc]
    config_file = tmp_path / "gpgfilter.yaml"
    h.service.config_path = config_file
    h.service.overrides = {
        "listen": str(h.service.config.listen),
        "deliver": str(h.service.config.deliver_to),
        "data_dir": str(h.service.config.data_dir),
    }
    assert [r.code for r in await h.send(["nokey@example.test"])] == [250]

    config_file.write_text("policy:\n  no_key: defer\n")
    assert await h.service.reload()
    assert [r.code for r in await h.send(["nokey@example.test"])] == [451]

    config_file.write_text("policy:\n  no_key: sometimes\n")
    assert not await h.service.reload()
    assert h.service.config.policy.no_key == "defer"
    assert [r.code for r in await h.send(["nokey@example.test"])] == [451]


async def test_health_reports_an_unreadable_key_store(
    harness: Callable[..., object], data_dir: Path, alice: TestKey
) -> None:
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    assert (await h.service.health()).status == "ok"
    (data_dir / "keys.sqlite").rename(data_dir / "moved")
    health = await h.service.health()
    assert (health.ok, health.status) == (False, "failing")
    assert "missing" in health.checks["keystore"]
    (data_dir / "moved").rename(data_dir / "keys.sqlite")
    assert (await h.service.health()).ok


@pytest.mark.parametrize(
    "parameters", [b"name*=utf\0''x", b"name*=idna''%ff", b"name*=a; name*0=b"]
)
async def test_unreadable_content_type_parameter_is_encrypted_not_deferred(
    harness: Callable[..., object], data_dir: Path, alice: TestKey, parameters: bytes
) -> None:
    """Content-Type parameters the email package chokes on (a charset it cannot decode with,
    RFC 2231 sections it cannot order) once made the classifier raise: the message was
    deferred on every retry until Postfix bounced it."""
    register(data_dir, alice)
    h: Harness = await harness()  # type: ignore[misc]
    hostile = PLAIN.replace(b"charset=utf-8", parameters)
    assert [r.code for r in await h.send(["alice@example.test"], hostile)] == [250]
    (delivered,) = h.delivered_to("alice@example.test")
    assert inner_plaintext(delivered, alice) == rawmessage.split(hostile).inner_entity()
