"""The GnuPG engine: one gpg process per call, driven by asyncio.

It keeps one small gpg home per distinct key set, named after a hash of the keys: gpg then
never scans a large keyring (a linear scan, 8-19 ms at 10,000 keys), a changed key simply gets
a new home, and every home is derived state, rebuilt from the store on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gpgfilter.openpgp.engine import EngineError, Plaintext, Recipient, pieces
from keystore.gpg import GPG_OPTIONS, status_keywords


class GnuPGEngine:
    """Encrypts with one gpg process per call, driven by asyncio.

    The process is fed and read concurrently on the event loop, in chunks: no thread per call
    (python-gnupg starts two per call, which measured ~1.5 ms of CPU and contention for the
    interpreter lock on the hot path; it stays in use where its parsing helps, for keys). A
    call that is cancelled — by the caller's timeout — kills its gpg process.
    """

    def __init__(self, *, home: Path, binary: str = "gpg", compress_level: int = 0) -> None:
        self.home = home
        self.binary = binary
        self.compress_level = compress_level
        self._homes = home / "keysets"
        self._homes.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
        self._build_lock = asyncio.Lock()
        try:
            done = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise EngineError(f"cannot run gpg ({binary}): {error}") from None
        first = done.stdout.splitlines()[:1]
        if done.returncode != 0 or not first:
            raise EngineError(f"cannot run gpg ({binary}): exit {done.returncode}")
        self.version = first[0].rsplit(" ", 1)[-1]

    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        home = await self._home_for(recipient)
        command = [
            self.binary,
            "--homedir",
            str(home),
            "--batch",
            "--no-tty",
            "--status-fd",
            "2",
            *GPG_OPTIONS,
            "--trust-model",
            "always",
            # A key set's home is written once, when it is built, and only read after that:
            # without this, every gpg takes a lock file on the keyring, and concurrent mail
            # for one recipient queues on it.
            "--lock-never",
            "--compress-level",
            str(self.compress_level),
            "--armor",
            "--encrypt",
        ]
        for fingerprint in recipient.encryption_keys:
            command += ["--recipient", f"{fingerprint}!"]  # this exact (sub)key, no lookup
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, armored, errors = await asyncio.gather(
                _feed(process.stdin, pieces(plaintext)),
                _drain(process.stdout, crlf=True),
                _drain(process.stderr),
            )
            await process.wait()
        except BaseException:
            if process.returncode is None:
                process.kill()
                with contextlib.suppress(ProcessLookupError, asyncio.CancelledError):
                    await process.wait()
            raise
        keywords = status_keywords(errors)
        if process.returncode != 0 or "END_ENCRYPTION" not in keywords:
            # The home may be what is broken (a damaged keyring): it is derived state, so drop
            # it and let the retry that Postfix will make rebuild it from the store.
            await asyncio.to_thread(shutil.rmtree, home, True)
            raise EngineError(
                f"gpg failed (exit {process.returncode}, status {' '.join(sorted(keywords))})"
            )
        return armored

    async def _home_for(self, recipient: Recipient) -> Path:
        home = self._homes / hashlib.sha256(recipient.key_data).hexdigest()[:32]
        if home.is_dir():
            return home
        async with self._build_lock:
            if not home.is_dir():
                await asyncio.to_thread(
                    self._build_home, home, recipient.key_data, recipient.encryption_keys
                )
        return home

    def _build_home(self, home: Path, key_data: bytes, wanted: tuple[str, ...]) -> None:
        building = Path(tempfile.mkdtemp(prefix=".build-", dir=self._homes))
        try:
            base = [self.binary, "--homedir", str(building), "--batch", *GPG_OPTIONS]
            # gpg's exit status after an import also reflects a failed (and useless) attempt
            # to reach an agent, e.g. when the home's path is too long for a socket: judge
            # the result by what the new home holds instead.
            subprocess.run(
                [*base, "--import"], input=key_data, capture_output=True, timeout=60, check=False
            )
            listing = subprocess.run(
                [*base, "--with-colons", "--fixed-list-mode", "--with-subkey-fingerprint", "-k"],
                capture_output=True,
                timeout=60,
                check=False,
                text=True,
            )
            present = {
                line.split(":")[9] for line in listing.stdout.splitlines() if line[:4] == "fpr:"
            }
            if not set(wanted) <= present:
                raise EngineError("gpg could not import a stored key")
            os.rename(building, home)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise


_CHUNK = 1 << 16


async def _feed(stdin: asyncio.StreamWriter | None, parts: Sequence[bytes | memoryview]) -> None:
    """Write in chunks, waiting for the pipe each time: the event loop never buffers (that is,
    copies) a whole large message."""
    assert stdin is not None
    try:
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), _CHUNK):
                stdin.write(view[start : start + _CHUNK])
                await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # gpg stopped reading: its exit status says why
    finally:
        stdin.close()


async def _drain(stream: asyncio.StreamReader | None, *, crlf: bool = False) -> bytes:
    """Read to the end. With ``crlf``, turn gpg's LF line ends (armor has no CR) into the CRLF
    that mail needs, chunk by chunk rather than with one more copy of the whole output."""
    assert stream is not None
    output = io.BytesIO()  # getvalue() hands over its buffer: no second copy from a join
    while chunk := await stream.read(_CHUNK):
        output.write(chunk.replace(b"\n", b"\r\n") if crlf else chunk)
    return output.getvalue()
