"""Prometheus metrics: what an operator needs to see that mail is flowing and encrypted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpgfilter.mail.lookup import LookupSource
from gpgfilter.openpgp.engine import EngineName
from keystore.model import Binding
from keystore.store import StoreError

EXPIRING_SOON_SECONDS = 14 * 86400

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = tuple(float(1 << n) for n in range(10, 28, 2))  # 1 KiB .. 128 MiB


class Metrics:
    """All of the filter's metrics, on a registry of their own (one per filter instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.messages = Counter(
            "gpgfilter_messages",
            "Messages handled, by outcome: encrypted, already_encrypted, no_key, deferred, failed",
            ["outcome"],
            registry=self.registry,
        )
        self.recipients = Counter(
            "gpgfilter_recipients",
            "Recipients handled, by what was done and how the downstream answered",
            ["outcome", "result"],
            registry=self.registry,
        )
        self.encryptions = Counter(
            "gpgfilter_encryptions",
            "Copies encrypted, by the engine that served the recipient: sequoia or gnupg",
            ["engine"],
            registry=self.registry,
        )
        for engine in ("sequoia", "gnupg"):
            self.encryptions.labels(engine)  # both series exist from the start, at 0
        self.encryption_seconds = Histogram(
            "gpgfilter_encryption_duration_seconds",
            "Time to encrypt one copy of a message for one recipient",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.processing_seconds = Histogram(
            "gpgfilter_message_duration_seconds",
            "Time from the end of DATA to the last reply, downstream delivery included",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.message_bytes = Histogram(
            "gpgfilter_message_size_bytes",
            "Size of the messages received",
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gpgfilter_messages_in_flight",
            "Messages being processed right now",
            registry=self.registry,
        )
        self.lookups = Counter(
            "gpgfilter_keystore_lookups",
            "Key lookups for recipients, by what answered: cache (the keys of an enrolled"
            " address while the store reports no change) or store",
            ["answered_by"],
            registry=self.registry,
        )
        for source in ("cache", "store"):
            self.lookups.labels(source)
        self.keystore_up = Gauge(
            "gpgfilter_keystore_up",
            "1 when the last key store lookup succeeded, 0 when it failed or timed out",
            registry=self.registry,
        )

    def looked_up(self, answered_by: LookupSource) -> None:
        """Count one recipient's key lookup (the lookup's ``answered`` callback)."""
        self.lookups.labels(answered_by).inc()

    def served(self, engine: EngineName) -> None:
        """Count one encryption by ``engine`` (the engine factory's ``served`` callback)."""
        self.encryptions.labels(engine).inc()


class BindingSource(Protocol):
    async def bindings(self) -> list[Binding]: ...


class KeyStateCollector(Collector):
    """``gpgfilter_registered_keys{state}``: how many registered keys are usable, expire within
    14 days, or can no longer encrypt (their mail is held).

    Prometheus collects on the event loop, inside the HTTP handler, so ``collect`` only reports
    the counts ``refresh`` took just before (off the loop, bounded in time). A store that does
    not answer leaves the metric out, so a stale count never passes for a current one."""

    def __init__(self, source: BindingSource) -> None:
        self.source = source
        self._counts: dict[str, int] | None = None

    async def refresh(self) -> None:
        try:
            bindings = await self.source.bindings()
        except StoreError:
            self._counts = None
            return
        now = time.time()
        counts = {"usable": 0, "expiring": 0, "unusable": 0}
        for key in {b.key.fingerprint: b.key for b in bindings}.values():
            if not key.usable_encryption_keys(now):
                counts["unusable"] += 1
            elif not key.usable_encryption_keys(now + EXPIRING_SOON_SECONDS):
                counts["expiring"] += 1
            else:
                counts["usable"] += 1
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._counts is None:
            return
        family = GaugeMetricFamily(
            "gpgfilter_registered_keys",
            "Registered keys by state: usable, expiring (within 14 days), unusable",
            labels=["state"],
        )
        for state, count in self._counts.items():
            family.add_metric([state], count)
        yield family
