"""Rate limits kept in the store, so they hold across restarts and across several servers.

A request over the limit writes nothing, and old events are pruned, so a flood from one client
costs at most ``limit`` rows and a stream of one-off clients leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from keystore.store import KeyStore


class RateLimited(Exception):
    """Too many requests in the window; ``retry_after`` is in seconds."""

    def __init__(self, scope_kind: str, retry_after: int) -> None:
        super().__init__(f"too many requests for this {scope_kind}: try again later")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(
        self,
        store: KeyStore,
        *,
        per_address: int,
        per_client: int,
        window: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.per_address = per_address
        self.per_client = per_client
        self.window = window
        self.clock = clock

    async def address(self, address: str) -> None:
        """Count a costly request for ``address`` (an upload mails a challenge to it)."""
        await self._check("address", address, self.per_address)

    async def client(self, ip: str) -> None:
        await self._check("client", ip, self.per_client)

    async def _check(self, kind: str, value: str, limit: int) -> None:
        now = int(self.clock())
        count = await asyncio.to_thread(self.store.hit, f"{kind}:{value}", now, self.window, limit)
        if count > limit:
            # The window slides: the oldest counted request leaves it at the latest then.
            raise RateLimited(kind, self.window)
