"""Wiring the filter together from a configuration and running it until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

from prometheus_client import start_http_server

from gpgfilter.config import Config
from gpgfilter.deliver import MailClient
from gpgfilter.engine import GnuPGEngine
from gpgfilter.filter import MailFilter
from gpgfilter.metrics import KeyStateCollector, Metrics
from gpgfilter.receive import Handler, start_server
from keystore.open import open_store

log = logging.getLogger(__name__)


@dataclass
class Service:
    config: Config
    filter: MailFilter
    server: asyncio.AbstractServer

    async def close(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting connections, let messages in progress finish (bounded), then stop.

        A message still unfinished after ``drain_seconds`` loses its connection before any
        reply, so Postfix keeps it and retries: nothing is lost either way.
        """
        self.server.close()
        if not await self.filter.drain(drain_seconds):
            log.warning("stopping with messages still in progress; Postfix will retry them")
        await self.server.wait_closed()
        await self.filter.deliverer.close()
        self.filter.store.close()


def build_filter(config: Config, metrics: Metrics) -> MailFilter:
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(config.keystore, config.keystore_path, create=True)
    engine = GnuPGEngine(
        home=config.gnupg_home,
        binary=config.gpg.binary,
        compress_level=config.gpg.compress_level,
    )
    client = MailClient(
        config.deliver_to,
        lmtp=config.mode == "lmtp",
        helo=config.hostname,
        timeout=config.delivery_timeout,
    )
    return MailFilter(
        store=store,
        engine=engine,
        deliverer=client,
        metrics=metrics,
        policy=config.policy,
        recipient_delimiter=config.recipient_delimiter,
        gpg_processes=config.gpg.max_processes,
        gpg_timeout=config.gpg.timeout,
        all_or_nothing=config.mode == "smtp",
    )


async def start(config: Config, metrics: Metrics | None = None) -> Service:
    metrics = metrics or Metrics()
    mail_filter = build_filter(config, metrics)
    metrics.registry.register(KeyStateCollector(mail_filter.store))
    handler = Handler(mail_filter, lmtp=config.mode == "lmtp", max_size=config.max_message_size)
    server = await start_server(
        handler,
        config.listen,
        hostname=config.hostname,
        data_size_limit=config.max_message_size,
    )
    log.info(
        "gpgfilter listening on %s (%s), delivering to %s",
        config.listen,
        config.mode,
        config.deliver_to,
    )
    return Service(config, mail_filter, server)


def _use_pidfd_child_watcher() -> None:
    """Python 3.11 waits for every subprocess (one gpg per message) in a thread of its own;
    a pidfd watcher needs none. Later Pythons choose it themselves."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def run(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    _use_pidfd_child_watcher()
    metrics = Metrics()
    if config.metrics.enabled:
        start_http_server(
            config.metrics.listen.port, addr=config.metrics.listen.host, registry=metrics.registry
        )
        log.info("metrics on http://%s/metrics", config.metrics.listen)

    async def main() -> None:
        service = await start(config, metrics)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping")
        await service.close()

    asyncio.run(main())
