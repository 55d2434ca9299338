"""The OpenPGP engine: turn plaintext bytes into an armored message for one recipient.

The rest of the filter only sees :class:`Engine`, so the engine can be swapped for a cheaper one
without touching anything else. Every engine's output is checked the same way
(:func:`check_ciphertext`): gpg's exit status alone proves nothing (traps.md, 3).

The GnuPG engine keeps one small gpg home per distinct key set, named after a hash of the keys:
gpg then never scans a large keyring (a linear scan, 8-19 ms at 10,000 keys), a changed key
simply gets a new home, and every home is derived state, rebuilt from the store on demand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gnupg

from gpgfilter import openpgp

log = logging.getLogger(__name__)


class EngineError(Exception):
    """Encryption failed or produced something we will not deliver. Never carries plaintext."""


@dataclass(frozen=True, slots=True)
class Recipient:
    """What an engine needs to encrypt to one mailbox owner."""

    key_data: bytes  # the owner's transferable public key(s), binary
    encryption_keys: tuple[str, ...]  # fingerprints of the (sub)keys to encrypt to, all of them


class Engine(Protocol):
    def encrypt(self, plaintext: bytes, recipient: Recipient) -> bytes:
        """Return an ASCII-armored OpenPGP message readable with exactly the recipient's keys."""
        ...


def check_ciphertext(armored: bytes, recipient: Recipient) -> None:
    """Refuse output that is empty, not one armored encrypted message, or addressed to other
    keys than the recipient's — or in a form (PKESK v6, SEIPD v2) mail clients cannot read."""
    if not armored.strip():
        raise EngineError("the engine produced no output")
    block = openpgp.find_armor(armored, max_decode=16384)
    if block is None or block.label != "MESSAGE":
        raise EngineError("the engine's output is not an armored OpenPGP message")
    if block.before.strip() or block.after.strip():
        raise EngineError("the engine's output has text around the armored message")
    try:
        addressing = openpgp.read_addressing(block.data)
    except openpgp.PacketError as error:
        raise EngineError(f"the engine's output is malformed: {error}") from None
    expected = sorted(openpgp.key_id(f) for f in recipient.encryption_keys)
    if sorted(addressing.key_ids) != expected:
        raise EngineError("the ciphertext is not addressed to exactly the recipient's keys")
    if addressing.pkesk_versions != {3}:
        raise EngineError("the ciphertext uses a session-key packet version clients cannot read")
    if addressing.data_tag != openpgp.TAG_SEIPD or addressing.data_version != 1:
        raise EngineError("the ciphertext is not integrity-protected data clients can read")


_GPG_OPTIONS = [
    # Every gpg process locks the random seed file: concurrent encryptions queue on it.
    "--no-random-seed-file",
    # Never look keys up anywhere: we name each key by fingerprint from our own store.
    "--no-auto-key-retrieve",
    "--auto-key-locate",
    "local",
    "--no-greeting",
    # Public-key work needs no agent; without this, importing starts one per gpg home.
    "--no-autostart",
    "--no-permission-warning",
]


class GnuPGEngine:
    """Encrypts with gpg through python-gnupg; thread-safe (one gpg process per call)."""

    def __init__(self, *, home: Path, binary: str = "gpg", compress_level: int = 0) -> None:
        self.home = home
        self.binary = binary
        self.compress_level = compress_level
        self._homes = home / "keysets"
        self._homes.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
        self._build_lock = threading.Lock()
        try:
            self._gpg = gnupg.GPG(gpgbinary=binary, gnupghome=str(home), options=_GPG_OPTIONS)
        except (OSError, ValueError) as error:
            raise EngineError(f"cannot run gpg ({binary}): {error}") from None

    @property
    def version(self) -> str:
        version = getattr(self._gpg, "version", None)
        return ".".join(map(str, version)) if version else "unknown"

    def encrypt(self, plaintext: bytes, recipient: Recipient) -> bytes:
        home = self._home_for(recipient)
        result = self._gpg.encrypt(
            plaintext,
            [f"{fpr}!" for fpr in recipient.encryption_keys],
            armor=True,
            always_trust=True,
            extra_args=["--homedir", str(home), "--compress-level", str(self.compress_level)],
        )
        if not result.ok:
            keywords = sorted({line.split()[0] for line in _status_lines(result.stderr)})
            raise EngineError(
                f"gpg failed (exit {result.returncode}, status {' '.join(keywords) or 'none'})"
            )
        armored: bytes = result.data
        return armored

    def _home_for(self, recipient: Recipient) -> Path:
        home = self._homes / hashlib.sha256(recipient.key_data).hexdigest()[:32]
        if home.is_dir():
            return home
        with self._build_lock:
            if not home.is_dir():
                self._build_home(home, recipient.key_data, recipient.encryption_keys)
        return home

    def _build_home(self, home: Path, key_data: bytes, wanted: tuple[str, ...]) -> None:
        building = Path(tempfile.mkdtemp(prefix=".build-", dir=self._homes))
        try:
            base = [self.binary, "--homedir", str(building), "--batch", *_GPG_OPTIONS]
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


def _status_lines(stderr: str) -> list[str]:
    return [
        line[len("[GNUPG:] ") :]
        for line in stderr.splitlines()
        if line.startswith("[GNUPG:] ") and len(line.split()) > 1
    ]
