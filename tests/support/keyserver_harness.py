"""A key service wired to a fake SMTP relay, and what a user does with the mail it sends.

The relay is tests.support.fakes.Downstream in SMTP mode; ``mails_to`` and ``challenge_token`` only
need the raw messages, so a later end-to-end test can take them from a real mailbox instead.
"""

from __future__ import annotations

import email
import email.policy
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpgfilter.process.config import Config, load
from gpgfilter.process.keyserver import build, open_store
from keystore.registration import Registry
from keystore.service.http import PathOnlyAccessLogger
from keystore.storage.sqlite import SQLiteKeyStore
from tests.support.fakes import Downstream
from tests.support.openpgp_tools import TestKey, decrypt_gpg

ADMIN_TOKEN = "admin-token-0123456789abcdef"
PUBLIC_URL = "https://keys.example.test"
TOKEN_IN_TEXT = re.compile(r"#token=([A-Za-z0-9_-]{43})")


def keyserver_config(tmp_path: Path, relay_port: int, **overrides: Any) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    values: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "hostname": "mx.example.test",
        "domains": ["example.test"],
        "keyserver.relay": f"127.0.0.1:{relay_port}",
        "keyserver.public_url": PUBLIC_URL,
        "keyserver.admin_token_file": str(token_file),
        "keyserver.expiry_check_interval": 0,
    }
    values.update(overrides)
    return load(None, values)


@dataclass
class Keyserver:
    app: web.Application
    registry: Registry
    store: SQLiteKeyStore
    relay: Downstream
    config: Config


@asynccontextmanager
async def running_keyserver(tmp_path: Path, **overrides: Any) -> AsyncIterator[Keyserver]:
    relay = Downstream(lmtp=False)
    await relay.start()
    config = keyserver_config(tmp_path, relay.port, **overrides)
    store = open_store(config)
    assert isinstance(store, SQLiteKeyStore)
    app, registry, _ = build(config, store)
    try:
        yield Keyserver(app, registry, store, relay, config)
    finally:
        await relay.stop()
        store.close()


@asynccontextmanager
async def api_client(server: Keyserver) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    test_server = TestServer(server.app)
    # As `gpgfilter keyserver` runs it (TestServer's constructor drops runner options).
    await test_server.start_server(access_log_class=PathOnlyAccessLogger)
    async with TestClient(test_server) as client:
        yield client


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def mails_to(relay: Downstream, address: str) -> list[EmailMessage]:
    return [parse(d.data) for d in relay.deliveries if address in d.recipients]


def ciphertext_of(message: EmailMessage) -> bytes:
    """The armored part of an RFC 3156 message, after checking its structure."""
    assert message.get_content_type() == "multipart/encrypted"
    assert message.get_param("protocol") == "application/pgp-encrypted"
    control, encrypted = message.get_payload()  # type: ignore[misc]
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_payload().strip() == "Version: 1"
    assert encrypted.get_content_type() == "application/octet-stream"
    payload = encrypted.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.startswith(b"-----BEGIN PGP MESSAGE-----")
    return payload


def challenge_token(relay: Downstream, key: TestKey, address: str | None = None) -> str:
    """Decrypt the newest challenge to ``address`` with ``key``'s secret, as its owner would."""
    challenges = [
        m for m in mails_to(relay, address or key.address) if m.get_content_type() != "text/plain"
    ]
    assert challenges, "no challenge mail was sent"
    plaintext = decrypt_gpg(key, ciphertext_of(challenges[-1]))
    found = TOKEN_IN_TEXT.search(plaintext.decode("utf-8"))
    assert found, "no token in the decrypted challenge"
    return found.group(1)


def product_log(records: list[logging.LogRecord]) -> str:
    """What the service logged; the fake relay's own chatter (aiosmtpd's mail.log) is not
    part of the product."""
    return "\n".join(r.getMessage() for r in records if not r.name.startswith("mail.log"))
