"""Asking the key store without blocking the event loop, and without waiting on it for ever.

Every connection of the filter and its health check share one event loop: a store call made on
it (a PostgreSQL that stopped answering, a SQLite file on a hung disk) would stall them all.
``StoreLookup`` runs each call in a small pool of threads of its own (the loop's default
executor is shared with other work, which must not queue behind a stuck store) and waits at
most ``timeout`` seconds: past it the caller gets ``StoreUnavailable`` and defers only the
recipient it was asking about.

A thread cannot be interrupted: one blocked in a frozen database stays blocked until the
database answers. Those threads are counted, and once every thread of the pool is stuck past
its deadline further calls fail at once rather than queue for another full timeout. When the
database answers again the threads come free and lookups work from the next message on. The
threads are daemons, so a stuck one never keeps the filter from stopping.

Handing a lookup to a thread and back costs more than the lookup (a few dozen futex calls and
the interpreter lock changing hands, for every recipient). So the keys of an enrolled address
are kept for as long as the store's change token (``KeyStore.change_token``, changed by the
schema's triggers on every write to keys, bindings and address settings, whoever writes) stays
the same, and the token is read again with a lookup at least every ``cache_seconds``: a change
to a registered key reaches the filter within that time, and a busy filter asks the store about
once per ``cache_seconds`` instead of once per recipient. An address without a key is never
kept: a key registered a moment ago is always found, so no mail for it is stored in clear.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar

from keystore.model import Binding, StoredKey
from keystore.store import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")
LookupSource = Literal["cache", "store"]
_Job = Callable[[], None]

DEFAULT_THREADS = 4
# Calls waiting for a thread at most; more than this at once means the store is far behind.
MAX_WAITING = 256
# Key data kept at most, in bytes: past it the cache starts again from empty.
CACHE_BYTES = 16 << 20


class BlockingStore(Protocol):
    """The part of ``keystore.store.KeyStore`` the filter's process uses."""

    def keys_for(self, address: str) -> list[StoredKey]: ...

    def change_token(self) -> str: ...

    def bindings(self) -> list[Binding]: ...

    def close(self) -> None: ...


class _DaemonPool:
    """A fixed number of daemon threads taking jobs from one queue."""

    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, function: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return  # given up on before a thread was free
            try:
                result = function(*args)
            except BaseException as error:  # handed to the waiting coroutine
                future.set_exception(error)
            else:
                future.set_result(result)

        self._jobs.put(job)
        return future

    def shutdown(self) -> None:
        """Let idle threads end; a stuck one ends once its call returns."""
        for _ in self._threads:
            self._jobs.put(None)


class StoreLookup:
    """``KeyLookup`` (and the listing the key-state metrics need) over a blocking store."""

    def __init__(
        self,
        store: BlockingStore,
        *,
        timeout: float,
        cache_seconds: float = 0.0,
        threads: int = DEFAULT_THREADS,
        max_waiting: int = MAX_WAITING,
        cache_bytes: int = CACHE_BYTES,
        answered: Callable[[LookupSource], None] | None = None,
    ) -> None:
        self.store = store
        self.answered = answered  # told who answered each keys_for: for the metrics
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.cache_bytes = cache_bytes
        # address -> its keys, all read while the store's change token was ``_token``.
        self._cache: dict[str, list[StoredKey]] = {}
        self._cached_bytes = 0
        self._token: str | None = None
        self._token_asked = -float("inf")  # when the lookup that read ``_token`` was asked
        self._threads = threads
        self._max_waiting = max_waiting
        self._pool = _DaemonPool(threads, "keystore-lookup")
        self._lock = threading.Lock()  # the counts below change in the pool's threads too
        self._pending = 0  # submitted, not finished
        self._stuck: set[concurrent.futures.Future[Any]] = set()  # running past the timeout

    @property
    def stuck(self) -> int:
        """Threads still waiting for the store after their caller gave up."""
        with self._lock:
            return len(self._stuck)

    async def keys_for(self, address: str) -> list[StoredKey]:
        """The address's keys: from the cache while the token was read less than
        ``cache_seconds`` ago, else from the store. The list is shared: do not change it."""
        asked = time.monotonic()
        if asked - self._token_asked < self.cache_seconds:
            cached = self._cache.get(address)
            if cached is not None:
                if self.answered is not None:
                    self.answered("cache")
                return cached
        token, keys = await self._call(self._read, address)
        if self.answered is not None:
            self.answered("store")
        self._learn(token, asked)
        if keys and token == self._token and self.cache_seconds > 0:
            self._keep(address, keys)
        return keys

    def _read(self, address: str) -> tuple[str, list[StoredKey]]:
        """In a pool thread. The token first: the keys read after it are at least as new
        as the token says, so a write in between only makes the cache start again."""
        token = self.store.change_token()
        return token, self.store.keys_for(address)

    def _learn(self, token: str, asked: float) -> None:
        if asked < self._token_asked:
            return  # an answer to an older question than the one the token came from
        if token != self._token:
            self._forget()
            self._token = token
        self._token_asked = asked

    def _keep(self, address: str, keys: list[StoredKey]) -> None:
        size = _size(keys)
        replaced = self._cache.pop(address, None)
        if replaced is not None:
            self._cached_bytes -= _size(replaced)
        if self._cached_bytes + size > self.cache_bytes:
            self._forget()  # bounded memory, whatever the number and size of keys
        self._cache[address] = keys
        self._cached_bytes += size

    def _forget(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    async def bindings(self) -> list[Binding]:
        return await self._call(self.store.bindings)

    async def close(self) -> None:
        """Close the store, unless a stuck call still holds it (closing would wait for that
        call); the process's exit then closes the connection."""
        try:
            await self._call(self.store.close)
        except StoreError as error:
            log.warning("key store left open: %s", error)
        finally:
            self._pool.shutdown()

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            if len(self._stuck) >= self._threads:
                raise StoreUnavailable(
                    f"the key store has not answered {len(self._stuck)} earlier lookups"
                    f" after {self.timeout:g}s; not asking again until it does"
                )
            if self._pending >= self._max_waiting:
                raise StoreUnavailable(f"{self._pending} key store lookups are already waiting")
            self._pending += 1
        future = self._pool.submit(function, *args)
        future.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            # wait_for cancelled the call; one that had already started cannot be, and keeps
            # its thread until the store answers.
            with self._lock:
                if not future.done():
                    self._stuck.add(future)
            raise StoreUnavailable(
                f"the key store did not answer within {self.timeout:g}s"
            ) from None

    def _finished(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending -= 1
            self._stuck.discard(future)


def _size(keys: list[StoredKey]) -> int:
    return sum(len(key.key_data) for key in keys)
