"""Wiring the filter together from a configuration and running it until told to stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpgfilter.mail.deliver import MailClient
from gpgfilter.mail.filter import MailFilter
from gpgfilter.mail.lookup import StoreLookup
from gpgfilter.mail.receive import Handler, start_server
from gpgfilter.openpgp.engine import EngineError
from gpgfilter.openpgp.factory import engine_summary, make_engine
from gpgfilter.process.config import Config, ConfigError, load
from gpgfilter.process.metrics import KeyStateCollector, Metrics
from gpgfilter.process.monitoring import Health, start_monitoring
from keystore.storage.open import open_store
from keystore.store import StoreError

log = logging.getLogger(__name__)


class Service:
    """The running filter: its listener, its current configuration and its health."""

    def __init__(
        self,
        config: Config,
        handler: Handler,
        server: asyncio.AbstractServer,
        metrics: Metrics,
        lookup: StoreLookup,
        *,
        config_path: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.server = server
        self.metrics = metrics
        self.config_path = config_path
        self.overrides = overrides
        self.lookup = lookup  # the store behind handler.filter.keys
        self._collector = KeyStateCollector(lookup)
        metrics.registry.register(self._collector)
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def filter(self) -> MailFilter:
        return self.handler.filter

    async def reload(self) -> bool:
        """Re-read the configuration file and reopen the key store, gpg and the downstream
        (SIGHUP). Messages in progress finish with what they started with. A configuration
        that does not load leaves everything as it was."""
        try:
            new = load(self.config_path, self.overrides)
        except ConfigError as error:
            log.error("configuration not reloaded: %s", error)
            return False
        for name in ("mode", "listen", "max_message_size", "max_connections", "metrics"):
            if getattr(new, name) != getattr(self.config, name):
                log.warning("%s changed: it takes effect only after a restart", name)
        new = dataclasses.replace(
            new,
            mode=self.config.mode,
            listen=self.config.listen,
            max_message_size=self.config.max_message_size,
            max_connections=self.config.max_connections,
            metrics=self.config.metrics,
        )
        try:
            # Opening the store connects to it: off the loop, like every other store call.
            lookup = await asyncio.to_thread(open_lookup, new, self.metrics)
        except (StoreError, OSError) as error:
            log.error("configuration not reloaded: %s", error)
            return False
        try:
            mail_filter = build_filter(new, self.metrics, lookup)
        except (OSError, EngineError) as error:
            await lookup.close()
            log.error("configuration not reloaded: %s", error)
            return False
        old, old_lookup = self.handler.filter, self.lookup
        self.handler.filter = mail_filter
        self.lookup = lookup
        self.config = new
        self._collector.source = lookup
        logging.getLogger().setLevel(new.log_level.upper())
        task = asyncio.create_task(_retire(old, old_lookup))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("configuration reloaded (engine %s)", engine_summary(new.gpg))
        return True

    async def health(self) -> Health:
        checks: dict[str, str] = {"listener": str(self.config.listen)}
        checks["in_flight"] = str(self.filter.in_flight)
        if self.handler.closing:
            return Health(False, "draining", checks)
        try:
            await self.lookup.keys_for("health-check@invalid")
            checks["keystore"] = "ok"
        except StoreError as error:
            checks["keystore"] = str(error)
            return Health(False, "failing", checks)
        return Health(True, "ok", checks)

    async def close(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting mail, let messages in progress finish (bounded), then stop.

        New transactions, on connections Postfix keeps open, get a 421 and are retried later.
        A message still unfinished after ``drain_seconds`` loses its connection before any
        reply, so Postfix keeps it and retries: nothing is lost either way.
        """
        self.handler.closing = True
        self.server.close()
        if not await self.filter.drain(drain_seconds):
            log.warning("stopping with messages still in progress; Postfix will retry them")
        await self.server.wait_closed()
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=drain_seconds)
        await self.filter.deliverer.close()
        await self.lookup.close()

    async def refresh_metrics(self) -> None:
        """Read the key store for the metrics that come from it, before a scrape."""
        await self._collector.refresh()


async def _retire(old: MailFilter, lookup: StoreLookup, seconds: float = 300.0) -> None:
    """Close a replaced filter's connections once its messages are done."""
    await old.drain(seconds)
    await old.deliverer.close()
    await lookup.close()


def open_lookup(config: Config, metrics: Metrics | None = None) -> StoreLookup:
    """The configured store, asked off the event loop within ``keystore.lookup_timeout``."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(config.keystore, config.keystore_path, create=True)
    return StoreLookup(
        store,
        timeout=config.keystore.lookup_timeout,
        cache_seconds=config.keystore.lookup_cache,
        answered=metrics.looked_up if metrics is not None else None,
    )


def build_filter(config: Config, metrics: Metrics, lookup: StoreLookup) -> MailFilter:
    # A new engine on every reload: keys are decided again (the store may have changed), and
    # a changed gpg.engine takes effect.
    engine = make_engine(config.gpg, home=config.gnupg_home, served=metrics.served)
    client = MailClient(
        config.deliver_to,
        lmtp=config.mode == "lmtp",
        helo=config.hostname,
        timeout=config.delivery_timeout,
    )
    return MailFilter(
        keys=lookup,
        engine=engine,
        deliverer=client,
        metrics=metrics,
        policy=config.policy,
        recipient_delimiter=config.recipient_delimiter,
        gpg_processes=config.gpg.max_processes,
        gpg_timeout=config.gpg.timeout,
        all_or_nothing=config.mode == "smtp",
    )


async def start(
    config: Config,
    metrics: Metrics | None = None,
    *,
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Service:
    metrics = metrics or Metrics()
    lookup = await asyncio.to_thread(open_lookup, config, metrics)
    mail_filter = build_filter(config, metrics, lookup)
    handler = Handler(mail_filter, lmtp=config.mode == "lmtp", max_size=config.max_message_size)
    server = await start_server(
        handler,
        config.listen,
        hostname=config.hostname,
        data_size_limit=config.max_message_size,
        max_connections=config.max_connections,
    )
    log.info(
        "gpgfilter listening on %s (%s), delivering to %s, engine %s, event loop %s",
        config.listen,
        config.mode,
        config.deliver_to,
        engine_summary(config.gpg),
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    return Service(
        config, handler, server, metrics, lookup, config_path=config_path, overrides=overrides
    )


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


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed, else asyncio's own (None).

    The filter's own work per message is small next to the event loop's: reading DATA,
    writing to the downstream, waking tasks. uvloop (libuv) does that in C; measured with
    bench/throughput.py it cuts the filter's CPU per message (docs/design.md has the figures).
    ``GPGFILTER_EVENT_LOOP=asyncio`` chooses asyncio's loop, to compare or to rule uvloop out.
    """
    if os.environ.get("GPGFILTER_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415  # optional: asyncio's loop serves when it is missing
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(
    config: Config, *, config_path: Path | None = None, overrides: dict[str, Any] | None = None
) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    loop_factory = event_loop_factory()
    if loop_factory is None:
        _use_pidfd_child_watcher()  # uvloop waits for its children itself

    async def main() -> None:
        service = await start(config, config_path=config_path, overrides=overrides)
        monitoring = None
        if config.metrics.enabled:
            monitoring = await start_monitoring(
                config.metrics.listen,
                service.metrics.registry,
                service.health,
                service.refresh_metrics,
            )
            log.info("metrics and health on http://%s/", config.metrics.listen)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        reloads: set[asyncio.Task[bool]] = set()

        def reload() -> None:
            task = asyncio.create_task(service.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()
        log.info("stopping: finishing messages in progress")
        await service.close()
        if monitoring is not None:
            await monitoring.cleanup()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
