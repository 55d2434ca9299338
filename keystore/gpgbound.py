"""Bounds on the gpg work anonymous uploads can cause, on a machine that also encrypts mail.

Checking an upload runs gpg, which verifies every signature left after the packet-level
cleaning. That is bounded per upload (keystore.sanitize caps what gpg sees), and here in two
more ways: how many validations run at once (the rest wait briefly, then get 503 with
Retry-After) and how much CPU and time each gpg process may take (it is killed past that, and
the upload is refused with the reason). Those gpg processes also run at a lower priority than
the filter's, so mail goes first when both want the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import threading
from collections.abc import AsyncIterator
from typing import Any

import gnupg

GPG_CPU_SECONDS = 5  # a key gpg cannot check in this much CPU time is no key in use
GPG_WALL_SECONDS = 20  # the same bound on a loaded machine, and on a gpg that hangs
GPG_NICENESS = 10


class Busy(Exception):
    """Every validation slot stayed taken: try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the service is busy checking other keys: try again shortly")
        self.retry_after = retry_after


class ValidationSlots:
    """At most ``slots`` gpg validations at once; a request waits at most ``wait`` seconds
    for one, and at most ``queue`` requests wait (the others are told at once)."""

    def __init__(self, slots: int | None = None, *, wait: float = 10.0, queue: int = 8) -> None:
        # Half the CPUs: the other half stays with the filter's encryption.
        self.slots = slots or max(1, (os.cpu_count() or 2) // 2)
        self.wait = wait
        self.queue = queue
        self._running = 0
        self._waiting = 0
        self._free: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if self._free is None:
            self._free = asyncio.Condition()
        free = self._free
        async with free:
            if self._running >= self.slots:
                if self._waiting >= self.queue:
                    raise Busy(round(self.wait))
                self._waiting += 1
                try:
                    await asyncio.wait_for(
                        free.wait_for(lambda: self._running < self.slots), self.wait
                    )
                except TimeoutError:
                    raise Busy(round(self.wait)) from None
                finally:
                    self._waiting -= 1
            self._running += 1
        try:
            yield
        finally:
            async with free:
                self._running -= 1
                free.notify()


class BoundedGPG(gnupg.GPG):  # type: ignore[misc]
    """python-gnupg whose gpg processes get a CPU-time limit and a wall-clock deadline; an
    overrun is a KeyRejected saying so (gpg's partial result is never used)."""

    def _open_subprocess(self, args: Any, passphrase: bool = False) -> subprocess.Popen[bytes]:
        process: subprocess.Popen[bytes] = super()._open_subprocess(args, passphrase)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            cpu = (GPG_CPU_SECONDS, GPG_CPU_SECONDS + 1)  # SIGXCPU, then SIGKILL
            resource.prlimit(process.pid, resource.RLIMIT_CPU, cpu)
            # Not RLIMIT_CORE: gpg turns core dumps off itself at start, and lowering the hard
            # limit under it at that moment makes its own setrlimit fail ("Fatal: can't
            # disable core dumps"), refusing a good key at random.
            # The filter's own gpg (the mail) goes first when both want the CPU.
            os.setpriority(os.PRIO_PROCESS, process.pid, GPG_NICENESS)
        return process

    def _collect_output(
        self, process: subprocess.Popen[bytes], result: Any, writer: Any = None, stdin: Any = None
    ) -> int:
        timer = threading.Timer(GPG_WALL_SECONDS, process.kill)
        timer.daemon = True
        timer.start()
        try:
            code: int = super()._collect_output(process, result, writer, stdin)
        finally:
            timer.cancel()
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            from keystore.validate import KeyRejected  # noqa: PLC0415 (validate imports us)

            raise KeyRejected(
                f"checking the key took gpg more than {GPG_CPU_SECONDS} s of CPU time (or"
                f" {GPG_WALL_SECONDS} s): it carries too many or too costly signatures"
            )
        return code
