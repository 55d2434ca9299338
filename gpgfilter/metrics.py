"""Prometheus metrics: what an operator needs to see that mail is flowing and encrypted."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.keystore_up = Gauge(
            "gpgfilter_keystore_up",
            "1 when the last key store lookup succeeded, 0 when it failed",
            registry=self.registry,
        )
