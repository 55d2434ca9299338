"""A key store that hangs costs the recipients it is asked about a deferral, never the filter:
the lookup adapter's bounds, the filter's answer and log line, and the running filter against
a real PostgreSQL frozen with SIGSTOP."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpgfilter.mail import rawmessage
from gpgfilter.mail.classify import Verdict, classify
from gpgfilter.mail.deliver import MailClient
from gpgfilter.mail.filter import Envelope, MailFilter
from gpgfilter.mail.lookup import StoreLookup
from gpgfilter.process.config import Endpoint, PolicyConfig
from gpgfilter.process.metrics import Metrics
from keystore.model import Binding, StoredKey
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.store import StoreError, StoreUnavailable
from keystore.validate import validate_key
from tests.support.e2e_stack import FilterProcess
from tests.support.fakes import Downstream, FakeDeliverer, FakeEngine, FakeLookup, stored_key
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import TestKey, decrypt_gpg
from tests.support.postgres_server import PostgresServer

PLAIN = (
    b"From: Carol <carol@example.test>\r\nTo: alice@example.test\r\nSubject: plans\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n"
)


class HangingStore:
    """A blocking store whose calls wait until ``release`` is set, as on a frozen database."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked: list[str] = []

    def keys_for(self, address: str) -> list[StoredKey]:
        self.asked.append(address)
        self.release.wait(30)
        return []

    def change_token(self) -> str:
        return "unchanged"

    def bindings(self) -> list[Binding]:
        self.release.wait(30)
        return []

    def close(self) -> None:
        pass


@pytest.fixture
async def hanging() -> AsyncIterator[HangingStore]:
    store = HangingStore()
    yield store
    store.release.set()  # no thread stays blocked after the test


async def _ticks_while(awaitable: asyncio.Future[object]) -> int:
    """How often the event loop ran another coroutine (every 10 ms) while ``awaitable`` ran."""
    ticks = 0
    while not awaitable.done():
        await asyncio.sleep(0.01)
        ticks += 1
    return ticks


async def test_a_hanging_store_costs_the_caller_its_bound_never_the_loop(
    hanging: HangingStore,
) -> None:
    lookup = StoreLookup(hanging, timeout=0.5)
    started = time.monotonic()
    call = asyncio.ensure_future(lookup.keys_for("alice@example.test"))
    ticks = await _ticks_while(call)
    with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5s"):
        call.result()
    assert 0.5 <= time.monotonic() - started < 2
    assert ticks >= 20  # the loop kept serving others all along
    assert lookup.stuck == 1


async def test_once_every_thread_is_stuck_lookups_fail_at_once_then_recover(
    hanging: HangingStore,
) -> None:
    lookup = StoreLookup(hanging, timeout=0.3, threads=2)
    for outcome in await asyncio.gather(
        lookup.keys_for("a@example.test"), lookup.keys_for("b@example.test"), return_exceptions=True
    ):
        assert isinstance(outcome, StoreUnavailable)
    assert lookup.stuck == 2
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="has not answered 2 earlier lookups"):
        await lookup.keys_for("c@example.test")
    assert time.monotonic() - started < 0.3  # not another wait for the bound
    assert hanging.asked == ["a@example.test", "b@example.test"]  # nor a third thread
    hanging.release.set()  # the database answers again
    deadline = time.monotonic() + 5
    while lookup.stuck:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert await lookup.keys_for("c@example.test") == []
    await lookup.close()


async def test_a_lookup_given_up_while_queued_never_reaches_the_store(
    hanging: HangingStore,
) -> None:
    lookup = StoreLookup(hanging, timeout=0.3, threads=1, max_waiting=2)
    outcomes = await asyncio.gather(
        lookup.keys_for("a@example.test"),
        lookup.keys_for("b@example.test"),  # waits for the one thread, in vain
        lookup.keys_for("c@example.test"),  # one more than may wait
        return_exceptions=True,
    )
    assert [type(o) for o in outcomes] == [StoreUnavailable] * 3
    assert "already waiting" in str(outcomes[2])
    hanging.release.set()
    await asyncio.sleep(0.1)
    assert hanging.asked == ["a@example.test"]


async def test_store_errors_pass_through_unchanged() -> None:
    class Broken(HangingStore):
        def keys_for(self, address: str) -> list[StoredKey]:
            raise StoreError("key store /x is missing")

    lookup = StoreLookup(Broken(), timeout=1)
    with pytest.raises(StoreError, match="missing") as raised:
        await lookup.keys_for("a@example.test")
    assert not isinstance(raised.value, StoreUnavailable)
    await lookup.close()


# -- the filter's answer, with fakes (no sockets, no gpg) --------------------------------------


def _filter(keys: FakeLookup, **kwargs: object) -> tuple[MailFilter, FakeEngine, FakeDeliverer]:
    engine, deliverer = FakeEngine(), FakeDeliverer()
    mail_filter = MailFilter(
        keys=keys,
        engine=engine,
        deliverer=deliverer,
        metrics=Metrics(),
        policy=PolicyConfig(),
        **kwargs,  # type: ignore[arg-type]
    )
    return mail_filter, engine, deliverer


async def test_mail_filter_encrypts_to_the_looked_up_key_and_passes_the_rest() -> None:
    alice = stored_key("A" * 40)
    mail_filter, engine, deliverer = _filter(FakeLookup({"alice@example.test": [alice]}))
    replies = await mail_filter.process(
        Envelope("carol@example.test", ("Alice+x@Example.TEST", "dave@example.test"), PLAIN)
    )
    assert [r.code for r in replies] == [250, 250]
    assert [r.encryption_keys for _, r in engine.encrypted] == [alice.usable_encryption_keys()]
    by_recipient = {tuple(rcpts): data for _, rcpts, data in deliverer.sent}
    assert by_recipient[("dave@example.test",)] == PLAIN
    encrypted = rawmessage.split(by_recipient[("Alice+x@Example.TEST",)])
    assert classify(encrypted) is Verdict.PGP_MIME
    armored = encrypted.body[encrypted.body.index(b"-----BEGIN PGP MESSAGE-----") :]
    assert FakeEngine.plaintext(armored) == rawmessage.split(PLAIN).inner_entity()


async def test_a_lookup_without_answer_defers_that_recipient_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = FakeLookup(error=StoreUnavailable("the key store did not answer within 2s"))
    mail_filter, engine, deliverer = _filter(keys)
    with caplog.at_level(logging.INFO, logger="gpgfilter.mail.filter"):
        replies = await mail_filter.process(
            Envelope("carol@example.test", ("alice@example.test", "x@b\r\nad.test"), PLAIN)
        )
    assert [(r.code, r.text[:5]) for r in replies] == [(451, "4.3.0")] * 2
    assert engine.encrypted == [] and deliverer.sent == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("key store did not answer for a recipient at example.test;")
    assert "within 2s" in warnings[0] and "alice" not in warnings[0]
    assert "sha256:" in warnings[1] and "\n" not in warnings[1]  # client input never raw
    assert mail_filter.metrics.keystore_up._value.get() == 0


async def test_a_slow_lookup_of_one_message_holds_up_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The filter awaits its lookups: another message is handled meanwhile."""
    slow = FakeLookup(delay=0.5)
    mail_filter, _engine, deliverer = _filter(slow)
    waiting = asyncio.ensure_future(
        mail_filter.process(Envelope("", ("slow@example.test",), PLAIN))
    )
    await asyncio.sleep(0.05)
    slow.delay = 0
    assert [r.code for r in await mail_filter.process(Envelope("", ("b@x.test",), PLAIN))] == [250]
    assert not waiting.done() and [rcpts for _, rcpts, _ in deliverer.sent] == [["b@x.test"]]
    assert [r.code for r in await waiting] == [250]


# -- the running filter against a frozen PostgreSQL --------------------------------------------

BOUND = 2  # keystore.lookup_timeout in the test's configuration


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=BOUND + 5) as got:
            return got.status, got.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def _greeting(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.readline()
    finally:
        writer.close()


async def test_a_frozen_postgresql_defers_one_recipient_and_the_filter_keeps_answering(
    tmp_path: Path, postgres_server: PostgresServer, postgres_dsn: str, alice: TestKey
) -> None:
    downstream = Downstream(lmtp=True)
    await downstream.start()
    process = FilterProcess(
        tmp_path,
        mode="lmtp",
        port=free_port(),
        deliver_port=downstream.port,
        extra_yaml=(
            f"keystore:\n  backend: postgresql\n  dsn: {postgres_dsn}\n  lookup_timeout: {BOUND}\n"
            "  lookup_cache: 0\n"  # every message asks the store: this test freezes it
        ),
    )
    client = MailClient(Endpoint("127.0.0.1", process.port), lmtp=True, helo="t", timeout=60)
    try:
        await asyncio.to_thread(process.import_key, alice.public)
        await asyncio.to_thread(process.start)
        assert [r.code for r in await client.send("c@example.test", [alice.address], PLAIN)] == [
            250
        ]
        with postgres_server.frozen():
            started = time.monotonic()
            stuck = asyncio.ensure_future(client.send("c@example.test", [alice.address], PLAIN))
            await asyncio.sleep(0.5)  # its lookup waits on the frozen database now
            assert not stuck.done()
            greeting = await asyncio.wait_for(_greeting(process.port), 2)
            assert greeting.startswith(b"220 "), "another connection gets its greeting"
            health = asyncio.to_thread(_get, process.metrics_port, "/health")
            scrape = asyncio.to_thread(_get, process.metrics_port, "/metrics")
            (status, body), (scraped, _) = await asyncio.gather(health, scrape)
            assert (status, json.loads(body)["status"]) == (503, "failing")
            assert scraped == 200
            replies = await asyncio.wait_for(stuck, BOUND + 5)
            waited = time.monotonic() - started
            assert [(r.code, r.text[:5]) for r in replies] == [(451, "4.3.0")]
            assert waited < BOUND + 2, f"deferred after {waited:.1f}s, bound {BOUND}s"
            # The message's lookup, /health's and the scrape's each hold a thread (of 4) until
            # the database answers. One more message takes the last thread...
            assert [r.code for r in await client.send("c@x.test", [alice.address], PLAIN)] == [451]
            # ...and from then on lookups are deferred without waiting for the bound again.
            started = time.monotonic()
            assert [r.code for r in await client.send("c@x.test", [alice.address], PLAIN)] == [451]
            assert time.monotonic() - started < BOUND
        log = process.log()
        warning = "WARNING gpgfilter.mail.filter: key store did not answer for a recipient at"
        assert f"{warning} example.test; deferring it (451)" in log
        assert "Traceback" not in log and "plans" not in log
        assert "outcome=failed" in log  # the deferred message has its line too

        # Thawed: the held threads get their answers and mail is encrypted again.
        deadline = time.monotonic() + 20
        while True:
            replies = await client.send("c@example.test", [alice.address], PLAIN)
            if replies[0].code == 250 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert [r.code for r in replies] == [250]
        last = rawmessage.split(downstream.deliveries[-1].data)
        assert classify(last) is Verdict.PGP_MIME
        armored = last.body[last.body.index(b"-----BEGIN PGP MESSAGE-----") :]
        assert decrypt_gpg(alice, armored).endswith(b"Hello\r\n")
        assert (await asyncio.to_thread(_get, process.metrics_port, "/health"))[0] == 200
    finally:
        postgres_server.thaw()  # whatever happened above, the database runs again
        await client.close()
        await asyncio.to_thread(process.stop)
        await downstream.stop()


# -- what the filter keeps between lookups ------------------------------------------------------


class CountingStore:
    """A real SQLite store, counting what the filter asks of it."""

    def __init__(self, path: Path) -> None:
        self.store = SQLiteKeyStore(path, create=True)
        self.asked: list[str] = []

    def keys_for(self, address: str) -> list[StoredKey]:
        self.asked.append(address)
        return self.store.keys_for(address)

    def change_token(self) -> str:
        return self.store.change_token()

    def bindings(self) -> list[Binding]:
        return self.store.bindings()

    def close(self) -> None:
        self.store.close()


async def test_an_enrolled_address_is_asked_once_until_the_store_changes(
    tmp_path: Path, alice: TestKey, bob: TestKey
) -> None:
    counting = CountingStore(tmp_path / "k.sqlite")
    # The key service, another process, writes through a connection of its own.
    service = SQLiteKeyStore(tmp_path / "k.sqlite", create=False)
    service.bind(alice.address, validate_key(alice.public).key)
    answered: list[str] = []
    lookup = StoreLookup(counting, timeout=5, cache_seconds=0.3, answered=answered.append)
    try:
        first = await lookup.keys_for(alice.address)
        assert [k.fingerprint for k in first] == [alice.fingerprint]
        assert await lookup.keys_for(alice.address) is first
        assert counting.asked == [alice.address], "the second lookup came from the cache"
        assert answered == ["store", "cache"]  # what gpgfilter_keystore_lookups counts

        # A key registered a moment ago: an address without a key is never kept.
        assert await lookup.keys_for(bob.address) == []
        service.bind(bob.address, validate_key(bob.public).key)
        assert [k.fingerprint for k in await lookup.keys_for(bob.address)] == [bob.fingerprint]
        assert counting.asked == [alice.address, bob.address, bob.address]

        # Bob's new key changed the token: what was kept went, Alice is asked again.
        assert [k.fingerprint for k in await lookup.keys_for(alice.address)] == [alice.fingerprint]
        assert counting.asked[-1] == alice.address

        # A change to a kept key reaches the filter once cache_seconds have passed...
        service.revoke(alice.fingerprint)
        assert not (await lookup.keys_for(alice.address))[0].revoked, "within the bound"
        await asyncio.sleep(0.35)
        assert (await lookup.keys_for(alice.address))[0].revoked
        # ...and the changed token dropped every kept address, Bob's too.
        asked = len(counting.asked)
        await lookup.keys_for(bob.address)
        assert len(counting.asked) == asked + 1

        # Past the bound with nothing changed: one lookup reads the token, the rest is kept.
        await asyncio.sleep(0.35)
        await lookup.keys_for(alice.address)
        asked = len(counting.asked)
        await lookup.keys_for(bob.address)
        await lookup.keys_for(alice.address)
        assert len(counting.asked) == asked
    finally:
        service.close()
        await lookup.close()


async def test_with_no_cache_every_lookup_asks_the_store(tmp_path: Path, alice: TestKey) -> None:
    counting = CountingStore(tmp_path / "k.sqlite")
    counting.store.bind(alice.address, validate_key(alice.public).key)
    lookup = StoreLookup(counting, timeout=5, cache_seconds=0)
    try:
        for _ in range(3):
            assert len(await lookup.keys_for(alice.address)) == 1
        assert counting.asked == [alice.address] * 3
    finally:
        await lookup.close()


async def test_the_cache_holds_at_most_its_bytes(
    tmp_path: Path, alice: TestKey, bob: TestKey
) -> None:
    counting = CountingStore(tmp_path / "k.sqlite")
    counting.store.bind(alice.address, validate_key(alice.public).key)
    counting.store.bind(bob.address, validate_key(bob.public).key)
    size = len(counting.store.keys_for(alice.address)[0].key_data)
    lookup = StoreLookup(counting, timeout=5, cache_seconds=60, cache_bytes=size + 10)
    try:
        await lookup.keys_for(alice.address)
        await lookup.keys_for(bob.address)  # does not fit beside Alice's: she is let go
        await lookup.keys_for(bob.address)
        await lookup.keys_for(alice.address)
        assert counting.asked == [alice.address, bob.address, alice.address]
    finally:
        await lookup.close()
