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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from keystore.model import Binding, StoredKey
from keystore.store import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Job = Callable[[], None]

DEFAULT_THREADS = 4
# Calls waiting for a thread at most; more than this at once means the store is far behind.
MAX_WAITING = 256


class BlockingStore(Protocol):
    """The part of ``keystore.store.KeyStore`` the filter's process uses."""

    def keys_for(self, address: str) -> list[StoredKey]: ...

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
        threads: int = DEFAULT_THREADS,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.store = store
        self.timeout = timeout
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
        return await self._call(self.store.keys_for, address)

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
