"""Running the key registration service as its own process (``gpgfilter keyserver``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gpgfilter.mail import pgpmime, rawmessage
from gpgfilter.mail.deliver import MailClient
from gpgfilter.mail.receive import listen
from gpgfilter.mailbox.queue import EnrolmentQueue
from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.engine import EngineError, Recipient
from gpgfilter.openpgp.factory import EngineSettings, make_engine
from gpgfilter.process.config import Config, ConfigError, Endpoint
from keystore.model import StoredKey
from keystore.ratelimit import RateLimiter
from keystore.registration import Policy, Registry
from keystore.service.http import PathOnlyAccessLogger, Settings, create_app
from keystore.service.mailer import Mailer
from keystore.service.outbound import EncryptionFailed, Send
from keystore.service.wkd import StoreWkdLookup, wkd_routes
from keystore.service.wks import MAX_MESSAGE_BYTES, ServiceKey, WksServer
from keystore.service.wks_listener import WksHandler
from keystore.storage.open import open_store as open_keystore
from keystore.store import KeyStore

log = logging.getLogger(__name__)

# WKS mail is a trickle (a submission and a confirmation per key): a few connections at once
# are plenty, and cap the listener's memory at a few MAX_MESSAGE_BYTES.
WKS_MAX_CONNECTIONS = 8


class ThrowAwayEncryptor:
    """The key service's :class:`~keystore.service.outbound.Encryptor`: the filter's engine,
    output check and PGP/MIME assembly, each call in a throw-away engine home, so that uploaded
    keys (most never confirmed) do not pile up on the server."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    async def armor(self, plaintext: bytes, key: StoredKey) -> bytes:
        recipient = Recipient(key.key_data, key.usable_encryption_keys())
        if not recipient.encryption_keys:
            raise EncryptionFailed("the key cannot encrypt")
        home = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="gpgfilter-ks-"))
        try:
            engine = await asyncio.to_thread(make_engine, self.settings, home=home)
            armored = await engine.encrypt(plaintext, recipient)
            check_ciphertext(armored, recipient)
        except EngineError as error:
            raise EncryptionFailed(f"encryption failed: {error}") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, home, True)
        return armored

    async def pgp_mime(self, header: bytes, entity: bytes, key: StoredKey) -> bytes:
        armored = await self.armor(entity, key)
        return b"".join(pgpmime.assemble(rawmessage.split(header + b"\r\n"), armored))


def open_store(config: Config) -> KeyStore:
    return open_keystore(config.keystore, config.keystore_path, create=True)


def admin_token(config: Config) -> str | None:
    path = config.keyserver.admin_token_file
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(
            f"keyserver.admin_token_file: cannot read {path}: {error.strerror}"
        ) from None
    if len(token) < 16:
        raise ConfigError("keyserver.admin_token_file: the token must have 16 characters or more")
    return token


def enrolment_queue(config: Config) -> EnrolmentQueue | None:
    """Where confirmations queue their address for its stored mail to be encrypted; None
    when the admin has not turned that on."""
    if not config.mailbox.encrypt_on_enrolment:
        return None
    return EnrolmentQueue.under(config.data_dir)


def build(config: Config, store: KeyStore) -> tuple[web.Application, Registry, Mailer]:
    """The application and its parts, wired from the configuration (tests use this too)."""
    # python-gnupg logs the keys it imports at DEBUG: never let key material reach a log.
    logging.getLogger("gnupg").setLevel(logging.WARNING)
    ks = config.keyserver
    relay = MailClient(ks.relay, lmtp=False, helo=config.hostname, timeout=60.0)
    mailer = Mailer(
        send=relay_sender(relay),
        encryptor=ThrowAwayEncryptor(config.gpg),
        mail_from=config.keyserver_mail_from,
        hostname=config.hostname,
        public_url=config.keyserver_url,
        close=relay.close,
    )
    limiter = RateLimiter(
        store,
        per_address=ks.rate_limit.per_address,
        per_client=ks.rate_limit.per_client,
        window=ks.rate_limit.window,
    )
    policy = Policy(
        token_ttl=ks.token_ttl,
        min_valid_days=ks.min_valid_days,
        max_key_bytes=ks.max_key_bytes,
        expiry_notice_days=ks.expiry_notice_days,
        gpg_binary=config.gpg.binary,
    )
    registry = Registry(
        store,
        mailer,
        policy,
        limiter,
        domains=config.served_domains,
        delimiters=config.recipient_delimiter,
        enrolment=enrolment_queue(config),
    )
    settings = Settings(
        max_key_bytes=ks.max_key_bytes,
        admin_token=admin_token(config),
        trusted_proxies=ks.trusted_proxies,
    )
    app = create_app(registry, settings, limiter)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        task = None
        if ks.expiry_check_interval:
            task = asyncio.create_task(_expiry_loop(registry, ks.expiry_check_interval))
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await mailer.close()

    app.cleanup_ctx.append(lifecycle)
    return app, registry, mailer


async def _expiry_loop(registry: Registry, interval: int) -> None:
    while True:
        try:
            sent = await registry.notify_expiry()
            if sent:
                log.info("sent %d expiry notice(s)", sent)
            await asyncio.to_thread(registry.store.purge_pending, int(registry.clock()))
        except Exception:
            log.exception("expiry check failed")
        await asyncio.sleep(interval)


def add_publication(
    config: Config, store: KeyStore, app: web.Application, registry: Registry
) -> None:
    """Web Key Directory routes and the Web Key Service mail listener, when
    ``publication.domains`` names domains; WKS goes through ``registry``, the HTTP API's, so
    both follow the same rules and share its validation slots and rate limits. Blocking (makes
    the submission key on first use): call it before the event loop runs."""
    publication = config.publication
    if not publication.domains:
        return
    wks, relay = wks_from_config(config, registry)
    lookup = StoreWkdLookup(
        store,
        publication.domains,
        submission_address=wks.address,
        submission_key=wks.key.public_key,
        pending_seconds=publication.token_ttl,
    )
    app.add_routes(wkd_routes(lookup))

    async def listener(_app: web.Application) -> AsyncIterator[None]:
        handler = WksHandler(wks, relay_sender(relay))
        server = await start_wks_listener(handler, publication.wks_listen, hostname=config.hostname)
        log.info("web key service listening on %s for %s", publication.wks_listen, wks.address)
        yield
        server.close()
        await server.wait_closed()
        await relay.close()
        wks.key.close()

    app.cleanup_ctx.append(listener)


def run(config: Config) -> None:
    config.require_served_domains()  # before anything is opened or made
    store = open_store(config)
    app, registry, _ = build(config, store)
    add_publication(config, store, app, registry)
    listen = config.keyserver.listen
    log.info("key service on %s, public URL %s", listen, config.keyserver_url)
    try:
        web.run_app(
            app,
            host=None if listen.is_unix else listen.host,
            port=None if listen.is_unix else listen.port,
            path=listen.path or None,
            access_log_class=PathOnlyAccessLogger,
            print=None,
        )
    finally:
        store.close()


def relay_sender(client: MailClient) -> Send:
    """A :data:`Send` handing mail to an SMTP server (Postfix); raises unless all accepted."""

    async def send(mail_from: str, recipients: list[str], data: bytes) -> None:
        smtputf8 = not all(address.isascii() for address in recipients)
        replies = await client.send(mail_from, recipients, data, smtputf8=smtputf8)
        refused = [reply for reply in replies if not reply.ok]
        if refused:
            raise OSError(f"relay refused the message: {refused[0].code}")

    return send


async def start_wks_listener(
    handler: WksHandler, endpoint: Endpoint, *, hostname: str
) -> asyncio.AbstractServer:
    return await listen(
        handler,
        endpoint,
        lmtp=handler.lmtp,
        hostname=hostname,
        data_size_limit=MAX_MESSAGE_BYTES,
        max_connections=WKS_MAX_CONNECTIONS,
        ident="gpgfilter-wks",
    )


def wks_from_config(config: Config, registry: Registry) -> tuple[WksServer, MailClient]:
    """The WKS server and its relay client as ``config.publication`` describes them; the
    submission key is made on first use. Blocking (gpg): call it before the event loop runs
    or in a thread."""
    publication = config.publication
    if not publication.domains:
        raise ValueError("publication.domains is empty: nothing to publish")
    key = ServiceKey.open(config.wks_home, publication.submission, gpg_binary=config.gpg.binary)
    server = WksServer(
        registry=registry,
        service_key=key,
        encryptor=ThrowAwayEncryptor(config.gpg),
        domains=publication.domains,
        token_ttl=publication.token_ttl,
    )
    client = MailClient(
        publication.wks_relay, lmtp=False, helo=config.hostname, timeout=config.delivery_timeout
    )
    return server, client
