"""Which engine serves each recipient: the in-process one where it can, gpg where it cannot.

The choice is made once per key (the stored key data plus gpg's list of its encryption
subkeys, so a changed key is decided again) and remembered in a bounded cache: a key the fast
engine cannot serve costs one trial when it is first seen, never a failed attempt per message.
Nothing is deferred because the fast engine declined: that recipient simply goes to gpg.

Messages above ``large`` bytes go to gpg too: Sequoia holds the interpreter lock for the
whole call (a 20 MB message would stall every other connection for a quarter of a second),
where gpg works in its own process, on another core; its start-up is a few per cent of the
work at that size. Memory is alike either way (bench/engines.py: about four times the message
in this process, plus gpg's own for gpg).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable

from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.engine import (
    Engine,
    EngineError,
    EngineName,
    Plaintext,
    Recipient,
    pieces,
)
from gpgfilter.openpgp.sequoia import SequoiaEngine, Unsupported, key_id

log = logging.getLogger(__name__)

LARGE = 1 << 20  # bytes; above this, Sequoia would stall the event loop for over ~10 ms


class AutoEngine:
    """An :class:`~gpgfilter.openpgp.engine.Engine` that sends each recipient to the engine decided
    for its key. ``served`` (if given) is told which engine served each encryption: for the
    metrics. ``large=None`` sends messages of any size to Sequoia (``gpg.engine: sequoia``)."""

    def __init__(
        self,
        fast: SequoiaEngine,
        fallback: Engine,
        *,
        large: int | None = LARGE,
        cache_size: int = 65536,
        served: Callable[[EngineName], None] | None = None,
    ) -> None:
        self.fast = fast
        self.fallback = fallback
        self.large = large
        self.cache_size = cache_size
        self.served = served
        self.counts: Counter[EngineName] = Counter()
        self._decisions: OrderedDict[str, EngineName] = OrderedDict()

    def decide(self, recipient: Recipient) -> EngineName:
        """The engine for this key, decided on first sight and then remembered."""
        ident = key_id(recipient)
        known = self._decisions.get(ident)
        if known is not None:
            self._decisions.move_to_end(ident)
            return known
        try:
            self.fast.prepare(recipient)
            choice: EngineName = "sequoia"
        except Unsupported as why:
            log.info("key %s… is served by gpg: %s", ident[:12], why)
            choice = "gnupg"
        self._remember(ident, choice)
        return choice

    def _remember(self, ident: str, choice: EngineName) -> None:
        self._decisions[ident] = choice
        self._decisions.move_to_end(ident)
        while len(self._decisions) > self.cache_size:
            self._decisions.popitem(last=False)

    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        small = self.large is None or sum(len(p) for p in pieces(plaintext)) <= self.large
        if small and self.decide(recipient) == "sequoia":
            try:
                armored = await self.fast.encrypt(plaintext, recipient)
                check_ciphertext(armored, recipient)
            except EngineError as error:
                # The trial passed, so this is new (a subkey's binding expiring in Sequoia's
                # view, say): serve this message with gpg and keep gpg for this key, rather
                # than defer, or fail and retry on every message.
                log.warning("key %s… moves to gpg: %s", key_id(recipient)[:12], error)
                self._remember(key_id(recipient), "gnupg")
            else:
                self._count("sequoia")
                return armored
        armored = await self.fallback.encrypt(plaintext, recipient)
        self._count("gnupg")
        return armored

    def _count(self, name: EngineName) -> None:
        self.counts[name] += 1
        if self.served is not None:
            self.served(name)

    def forget(self) -> None:
        """Decide every key again (on reload, or after upgrading an engine)."""
        self._decisions.clear()
        self.fast.forget()

    def summary(self) -> dict[EngineName, int]:
        """How many remembered keys each engine serves: for ``doctor`` and the metrics."""
        return dict(Counter(self._decisions.values()))
