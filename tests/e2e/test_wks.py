"""Web Key Service end to end: gpg-wks-client's mail goes through a real Postfix, routed by
``postfix/wks/main.cf`` to the WKS listener; the confirmation request reaches the user's
mailbox through Postfix, gpgfilter and Dovecot, is answered by gpg-wks-client, and the key is
active — mail to the user is encrypted to it from then on."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpgfilter.mail.deliver import MailClient
from gpgfilter.process.config import Endpoint, GpgConfig
from gpgfilter.process.keyserver import ThrowAwayEncryptor, relay_sender, start_wks_listener
from keystore.service.wks import ServiceKey, WksServer
from keystore.service.wks_listener import WksHandler
from keystore.storage.sqlite import SQLiteKeyStore
from tests.keystore.service.test_wks import DOMAIN, SUBMISSION, require_wks_client, user, wks_client
from tests.support.e2e_stack import Stack
from tests.support.mailstack import (
    SNIPPET_DIR,
    free_port,
    parse_main_cf,
    require_mail_stack,
    rewrite_ports,
)
from tests.support.openpgp_tools import KeyFactory

pytestmark = pytest.mark.e2e
ALICE = f"alice@{DOMAIN}"


class Listener:
    """The WKS listener on an event loop of its own, as the key service process would run it."""

    def __init__(self, server: WksServer, port: int, relay_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.client = MailClient(
            Endpoint("127.0.0.1", relay_port), lmtp=False, helo="wks.test", timeout=60
        )
        self.handler = WksHandler(server, relay_sender(self.client))
        self.port = port
        self.server: asyncio.AbstractServer | None = None

    def __enter__(self) -> Listener:
        self.thread.start()
        start = start_wks_listener(
            self.handler, Endpoint("127.0.0.1", self.port), hostname="wks.test"
        )
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
            await self.client.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def service_key() -> Iterator[ServiceKey]:
    home = Path(tempfile.mkdtemp(prefix="wks-", dir="/tmp"))
    key = ServiceKey.open(home / "home", SUBMISSION)
    yield key
    key.close()
    shutil.rmtree(home, ignore_errors=True)


def test_key_registered_by_mail_through_the_real_stack(
    tmp_path_factory: pytest.TempPathFactory, service_key: ServiceKey
) -> None:
    require_mail_stack()
    require_wks_client()
    wks_port = free_port()
    stack = Stack(tmp_path_factory.mktemp("wks-stack"), mode="lmtp", users=[ALICE])
    snippet = (SNIPPET_DIR / "wks" / "main.cf").read_text().replace("example.org", DOMAIN)
    stack.postfix.apply_main_cf(parse_main_cf(rewrite_ports(snippet, {10027: wks_port})))
    with KeyFactory(tmp_path_factory.mktemp("wkse2ekeys")) as factory, stack:
        assert stack.filter is not None
        store = SQLiteKeyStore(stack.filter.data_dir / "keys.sqlite", create=True)
        server = WksServer(
            store=store,
            service_key=service_key,
            encryptor=ThrowAwayEncryptor(GpgConfig()),
            domains=[DOMAIN],
        )
        alice = user(factory, service_key, ALICE)
        with Listener(server, wks_port, stack.postfix.smtp_port):
            submission = wks_client(alice, "--create", alice.fingerprint, ALICE)
            stack.postfix.send(ALICE, [SUBMISSION], submission)
            (request,) = stack.dovecot.wait_for(ALICE, 1, timeout=60)
            assert b"application/vnd.gnupg.wks" in request  # no key yet: delivered as sent
            assert store.keys_for(ALICE) == []

            response = wks_client(alice, "--receive", data=request)
            stack.postfix.send(ALICE, [SUBMISSION], response)
            deadline = time.monotonic() + 60
            while not store.keys_for(ALICE):
                assert time.monotonic() < deadline, stack.postfix.log()[-3000:]
                time.sleep(0.1)
            assert [k.fingerprint for k in store.keys_for(ALICE)] == [alice.fingerprint]
            stack.dovecot.wait_for(ALICE, 2, timeout=60)  # the "published" notice

        stack.postfix.send(f"bob@{DOMAIN}", [ALICE], b"Subject: hello\r\n\r\nsecret words\r\n")
        mails = stack.dovecot.wait_for(ALICE, 3, timeout=60)
        last = next(m for m in mails if b"Subject: hello" in m)
        assert b"multipart/encrypted" in last and b"secret words" not in last
        store.close()
