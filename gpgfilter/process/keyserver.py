"""Running the key registration service as its own process (``gpgfilter keyserver``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gpgfilter.process.config import Config, ConfigError
from keystore.ratelimit import RateLimiter
from keystore.registration import Policy, Registry
from keystore.service.http import PathOnlyAccessLogger, Settings, create_app
from keystore.service.mailer import Mailer
from keystore.service.wkd import StoreWkdLookup, wkd_routes
from keystore.service.wks_listener import (
    WksHandler,
    relay_sender,
    start_wks_listener,
    wks_from_config,
)
from keystore.storage.open import open_store as open_keystore
from keystore.store import KeyStore

log = logging.getLogger(__name__)


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


def build(config: Config, store: KeyStore) -> tuple[web.Application, Registry, Mailer]:
    """The application and its parts, wired from the configuration (tests use this too)."""
    # python-gnupg logs the keys it imports at DEBUG: never let key material reach a log.
    logging.getLogger("gnupg").setLevel(logging.WARNING)
    ks = config.keyserver
    mailer = Mailer(
        relay=ks.relay,
        mail_from=config.keyserver_mail_from,
        hostname=config.hostname,
        public_url=config.keyserver_url,
        gpg_binary=config.gpg.binary,
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
    registry = Registry(store, mailer, policy, limiter)
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


def add_publication(config: Config, store: KeyStore, app: web.Application) -> None:
    """Web Key Directory routes and the Web Key Service mail listener, when
    ``publication.domains`` names domains. Blocking (makes the submission key on first use):
    call it before the event loop runs."""
    publication = config.publication
    if not publication.domains:
        return
    wks, relay = wks_from_config(config, store)
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
    store = open_store(config)
    app, _, _ = build(config, store)
    add_publication(config, store, app)
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
