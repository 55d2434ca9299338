"""Real OpenPGP keys made with gpg, and decryption by three independent implementations.

The product's output is only worth something if other people's software can read it, so the test
suite checks it with the programs mail users actually run: GnuPG 2.2 (Enigmail, GPGTools, mutt),
Sequoia's ``sq`` and RNP (the library inside Thunderbird). Nothing here imports product code:
a helper that shared the product's parser would share its bugs.

Keys have no passphrase and each lives in its own gpg homedir under the factory's root, so
tests can run in parallel and a key's state (revocations, subkeys) never leaks into another.
Variants that must look old (expired keys and subkeys) are created with ``--faked-system-time``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

# Generous: RSA generation and the first gpg-agent start can be slow on a loaded CI machine.
TIMEOUT = 120.0
_YEAR = 365 * 86400
# gpg-agent puts its sockets in the homedir when /run/user/UID is absent; a Unix socket path
# must stay under ~107 bytes, so long homedir paths are moved to a short temporary directory.
_MAX_HOME_LEN = 80

_ALGOS: dict[str, tuple[str, str]] = {
    "ed25519": ("ed25519", "cv25519"),
    "rsa2048": ("rsa2048", "rsa2048"),
    "rsa3072": ("rsa3072", "rsa3072"),
}
_UNUSABLE = frozenset("erid")  # gpg validity: expired, revoked, invalid, disabled

# Section titles printed by `sq packet dump` (sequoia-openpgp 1.x) for the packets we inspect.
_SQ_PKESK = "Public-Key Encrypted Session Key Packet"
_SQ_SEIPD = "Sym. Encrypted and Integrity Protected Data Packet"
_SQ_LEGACY = ("Symmetrically Encrypted Data Packet", "AEAD Encrypted Data Packet")
_SQ_UNKNOWN = "Unknown or Unsupported Packet"
_HEX_VERSION = re.compile(r"^\s*[0-9a-f]{8}\s+([0-9a-f]{2})\s+version\s*$")


class ToolError(RuntimeError):
    """An external OpenPGP program failed or produced nothing; carries its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: bytes, why: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.decode("utf-8", "replace")
        super().__init__(f"{why}: {' '.join(self.argv)} (exit {returncode})\n{self.stderr}")


@dataclass(frozen=True)
class TestKey:
    """One generated key and where to find it; immutable so fixtures can share it."""

    __test__ = False  # not a pytest test class, despite the name

    address: str
    fingerprint: str
    encryption_subkeys: tuple[str, ...]
    public: bytes
    secret: bytes
    home: Path


def _run(
    argv: Sequence[str],
    *,
    input: bytes = b"",
    why: str = "command failed",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program without a shell; raise ToolError with its stderr unless it exits 0."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, timeout=TIMEOUT, check=False, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(argv, None, exc.stderr or b"", f"timed out after {TIMEOUT} s") from exc
    if proc.returncode != 0:
        raise ToolError(argv, proc.returncode, proc.stderr, why)
    return proc


def _gpg(
    home: Path, *args: str, input: bytes = b"", faked_time: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    """gpg in batch mode with an empty loopback passphrase, so nothing ever prompts."""
    argv = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--status-fd", "2"]
    argv += ["--pinentry-mode", "loopback", "--passphrase", ""]
    if faked_time is not None:
        argv += ["--faked-system-time", str(faked_time)]
    return _run([*argv, *args], input=input, why="gpg failed")


def _colon_records(home: Path) -> list[list[str]]:
    out = _gpg(home, "--with-colons", "--fixed-list-mode", "--list-keys").stdout
    return [line.split(":") for line in out.decode("utf-8", "replace").splitlines()]


def _subkey_fingerprints(home: Path) -> list[str]:
    records = _colon_records(home)
    return [b[9] for a, b in itertools.pairwise(records) if a[0] == "sub" and b[0] == "fpr"]


def _usable_encryption_subkeys(records: list[list[str]]) -> tuple[str, ...]:
    """Subkeys gpg would accept for encryption now, read from its own validity verdicts."""
    found: list[str] = []
    primary_ok = False
    current: list[str] | None = None
    for rec in records:
        if rec[0] == "pub":
            primary_ok = rec[1] not in _UNUSABLE
            current = None
        elif rec[0] == "sub":
            current = rec
        elif rec[0] == "fpr" and current is not None:
            if primary_ok and current[1] not in _UNUSABLE and "e" in current[11]:
                found.append(rec[9])
            current = None
    return tuple(found)


def stop_gpg_daemons(home: Path) -> None:
    """Stop the gpg-agent (and dirmngr) that gpg may have started in ``home``: they outlive
    the test otherwise."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True,
            timeout=30,
            check=False,
        )


class KeyFactory:
    """Makes keys in homedirs under ``root``; ``close()`` stops the gpg-agents they started."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._homes: list[Path] = []
        self._own_tmp: list[Path] = []  # short-path homedirs outside root, removed on close
        self._count = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every agent/dirmngr started in our homedirs (they outlive the test otherwise)."""
        for home in self._homes:
            stop_gpg_daemons(home)
        self._homes.clear()
        for path in self._own_tmp:
            shutil.rmtree(path, ignore_errors=True)
        self._own_tmp.clear()

    def _new_home(self, label: str) -> Path:
        self._count += 1
        home = self.root / f"{label}{self._count:03d}"
        if len(str(home)) > _MAX_HOME_LEN:
            home = Path(tempfile.mkdtemp(prefix="okt-", dir="/tmp"))
            self._own_tmp.append(home)
        else:
            home.mkdir(mode=0o700)
        os.chmod(home, 0o700)
        self._homes.append(home)
        return home

    # -- building blocks ---------------------------------------------------------------------

    @staticmethod
    def _gen_primary(
        home: Path, uid: str, algo: str, usage: str, expires: str, faked_time: int | None
    ) -> str:
        proc = _gpg(home, "--quick-gen-key", uid, algo, usage, expires, faked_time=faked_time)
        for line in proc.stderr.decode("utf-8", "replace").splitlines():
            if line.startswith("[GNUPG:] KEY_CREATED "):
                return line.split()[3]
        raise ToolError(["gpg", "--quick-gen-key"], 0, proc.stderr, "no KEY_CREATED status")

    @staticmethod
    def _add_subkey(
        home: Path, fpr: str, algo: str, expires: str = "never", faked_time: int | None = None
    ) -> str:
        """Add an encryption subkey and return its fingerprint (the newest ``sub`` listed)."""
        before = _subkey_fingerprints(home)
        _gpg(home, "--quick-add-key", fpr, algo, "encr", expires, faked_time=faked_time)
        added = [f for f in _subkey_fingerprints(home) if f not in before]
        if len(added) != 1:
            raise ToolError(["gpg", "--quick-add-key"], 0, b"", f"expected one new subkey: {added}")
        return added[0]

    def _finish(self, home: Path, address: str, fpr: str) -> TestKey:
        public = _gpg(home, "--armor", "--export", fpr).stdout
        secret = _gpg(home, "--armor", "--export-secret-keys", fpr).stdout
        if not public or not secret:
            raise ToolError(["gpg", "--export"], 0, b"", f"empty export of {fpr}")
        (home / "public.asc").write_bytes(public)
        (home / "secret.asc").write_bytes(secret)
        return TestKey(
            address=address,
            fingerprint=fpr,
            encryption_subkeys=_usable_encryption_subkeys(_colon_records(home)),
            public=public,
            secret=secret,
            home=home,
        )

    # -- key variants --------------------------------------------------------------------------

    def make(
        self,
        address: str,
        *,
        algo: str = "ed25519",
        name: str = "Test User",
        expires: str | None = None,
    ) -> TestKey:
        """A signing primary plus one encryption subkey, both expiring per ``expires``."""
        if algo not in _ALGOS:
            raise ValueError(f"algo must be one of {sorted(_ALGOS)}, not {algo!r}")
        primary, sub = _ALGOS[algo]
        home = self._new_home("k")
        exp = expires or "never"
        fpr = self._gen_primary(home, f"{name} <{address}>", primary, "sign", exp, None)
        self._add_subkey(home, fpr, sub, exp)
        return self._finish(home, address, fpr)

    def make_expired(self, address: str) -> TestKey:
        """Made two years ago with a one-year lifetime: gpg lists it as expired (``e``)."""
        home = self._new_home("x")
        past = int(time.time()) - 2 * _YEAR
        fpr = self._gen_primary(home, f"Expired <{address}>", "ed25519", "sign", "1y", past)
        self._add_subkey(home, fpr, "cv25519", "1y", past)
        return self._finish(home, address, fpr)

    def make_with_expired_encryption_subkey(self, address: str) -> TestKey:
        """Valid primary, but its only encryption subkey expired a year ago."""
        home = self._new_home("s")
        past = int(time.time()) - 2 * _YEAR
        fpr = self._gen_primary(home, f"Old Subkey <{address}>", "ed25519", "sign", "never", past)
        self._add_subkey(home, fpr, "cv25519", "1y", past)
        return self._finish(home, address, fpr)

    def make_with_two_encryption_subkeys(self, address: str) -> TestKey:
        """Two valid encryption subkeys, a day apart, so "the newest" is well defined."""
        home = self._new_home("t")
        past = int(time.time()) - 86400
        fpr = self._gen_primary(home, f"Two Subkeys <{address}>", "ed25519", "sign", "never", past)
        self._add_subkey(home, fpr, "cv25519", "never", past)
        self._add_subkey(home, fpr, "cv25519", "never")
        return self._finish(home, address, fpr)

    def make_with_old_expired_and_new_valid_subkey(self, address: str) -> TestKey:
        """Subkey rotation done right: an expired old subkey and a valid new one."""
        home = self._new_home("o")
        past = int(time.time()) - 2 * _YEAR
        fpr = self._gen_primary(home, f"Rotated <{address}>", "ed25519", "sign", "never", past)
        self._add_subkey(home, fpr, "cv25519", "1y", past)
        self._add_subkey(home, fpr, "cv25519", "never")
        return self._finish(home, address, fpr)

    def make_revoked(self, address: str) -> TestKey:
        """Primary key revoked with the revocation certificate gpg wrote at creation."""
        home = self._new_home("r")
        fpr = self._gen_primary(home, f"Revoked <{address}>", "ed25519", "sign", "never", None)
        self._add_subkey(home, fpr, "cv25519")
        cert = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_bytes()
        # gpg prefixes the armor line with ':' so the file cannot be imported by accident.
        cert = cert.replace(b"\n:-----BEGIN", b"\n-----BEGIN")
        _gpg(home, "--import", input=cert)
        return self._finish(home, address, fpr)

    def make_with_revoked_subkey_and_new_valid(self, address: str) -> TestKey:
        """A compromised subkey revoked and replaced by a fresh one."""
        home = self._new_home("v")
        past = int(time.time()) - 30 * 86400
        fpr = self._gen_primary(home, f"Replaced <{address}>", "ed25519", "sign", "never", past)
        old = self._add_subkey(home, fpr, "cv25519", "never", past)
        # No --quick-revoke for subkeys in gpg 2.2: answer --edit-key's prompts on stdin
        # (select, revkey, confirm, reason 1 = compromised, empty description, confirm, save).
        script = f"key {old}\nrevkey\ny\n1\n\ny\nsave\n".encode()
        _gpg(home, "--command-fd", "0", "--edit-key", fpr, input=script)
        self._add_subkey(home, fpr, "cv25519")
        return self._finish(home, address, fpr)

    def make_sign_only(self, address: str) -> TestKey:
        """A certify/sign primary with no encryption subkey at all."""
        home = self._new_home("n")
        fpr = self._gen_primary(home, f"Sign Only <{address}>", "ed25519", "sign", "never", None)
        return self._finish(home, address, fpr)

    def make_multi_uid(self, addresses: list[str]) -> TestKey:
        """One key carrying several addresses; ``address`` is the first (primary) one."""
        if not addresses:
            raise ValueError("make_multi_uid needs at least one address")
        home = self._new_home("m")
        first, *rest = addresses
        fpr = self._gen_primary(home, f"Test User <{first}>", "ed25519", "sign", "never", None)
        for addr in rest:
            _gpg(home, "--quick-add-uid", fpr, f"Test User <{addr}>")
        self._add_subkey(home, fpr, "cv25519")
        return self._finish(home, first, fpr)

    def make_with_expiring_encryption_subkey(self, address: str, expires: str) -> TestKey:
        """A primary key without expiry whose only encryption subkey expires after ``expires``
        (gpg's notation: "3d", "1y")."""
        home = self._new_home("e")
        fpr = self._gen_primary(home, f"Short Sub <{address}>", "ed25519", "sign", "never", None)
        self._add_subkey(home, fpr, "cv25519", expires)
        return self._finish(home, address, fpr)

    def make_with_photo(self, address: str) -> TestKey:
        """An ordinary key plus a photo ID (a user attribute packet holding a tiny JPEG)."""
        home = self._new_home("p")
        fpr = self._gen_primary(home, f"Photo <{address}>", "ed25519", "sign", "never", None)
        self._add_subkey(home, fpr, "cv25519")
        photo = home / "photo.jpg"
        # A bare JFIF header and end-of-image marker: gpg only checks the JPEG signature.
        photo.write_bytes(bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9"))
        _gpg(
            home,
            "--command-fd",
            "0",
            "--edit-key",
            fpr,
            input=f"addphoto\n{photo}\nsave\n".encode(),
        )
        return self._finish(home, address, fpr)

    def adopt(self, address: str, secret: bytes) -> TestKey:
        """A key made by another program (OpenPGP.js, Sequoia), given as its unprotected secret
        key: imported into a home of its own, so the decryption helpers can use it."""
        home = self._new_home("a")
        proc = _gpg(home, "--import", input=secret)
        status = proc.stderr.decode("utf-8", "replace")
        imported = re.findall(r"^\[GNUPG:\] IMPORT_OK \d+ ([0-9A-F]{40})", status, re.M)
        if not imported:
            raise ToolError(["gpg", "--import"], 0, proc.stderr, "no key imported")
        return self._finish(home, address, imported[0])

    def revocation_certificate(self, key: TestKey) -> bytes:
        """An armored revocation certificate for ``key`` as ``gpg --gen-revoke`` writes it
        (reason 0, no description). The key's home is left unrevoked."""
        # --gen-revoke refuses --batch; --command-fd answers its questions instead.
        argv = ["gpg", "--homedir", str(key.home), "--no-tty", "--status-fd", "2"]
        argv += ["--pinentry-mode", "loopback", "--passphrase", "", "--command-fd", "0"]
        argv += ["--armor", "--gen-revoke", key.fingerprint]
        return _run(argv, input=b"y\n0\n\ny\n", why="gpg --gen-revoke failed").stdout

    def renew(self, key: TestKey, expires: str) -> TestKey:
        """Set a new expiry on ``key``'s primary key and all its subkeys. gpg replaces the
        self-signatures; the old copy is then imported back, so the export carries old and new
        self-signatures side by side, as a keyserver's merged copy would. Changes ``key``'s
        home: use a key of your own."""
        old = _gpg(key.home, "--export", key.fingerprint).stdout
        _gpg(key.home, "--quick-set-expire", key.fingerprint, expires)
        _gpg(key.home, "--quick-set-expire", key.fingerprint, expires, "*")
        _gpg(key.home, "--import", input=old)
        return self._finish(key.home, key.address, key.fingerprint)

    def add_encryption_subkey(self, key: TestKey) -> TestKey:
        """A new encryption subkey on ``key`` (made now). Changes ``key``'s home: use a key of
        your own; the old ``TestKey`` keeps the copy from before."""
        _, sub = _ALGOS["ed25519"]
        self._add_subkey(key.home, key.fingerprint, sub)
        return self._finish(key.home, key.address, key.fingerprint)

    def revoke_subkey(self, key: TestKey, subkey: str) -> TestKey:
        """``key`` with the subkey ``subkey`` revoked (reason: compromised). Changes ``key``'s
        home, like ``add_encryption_subkey``."""
        script = f"key {subkey}\nrevkey\ny\n1\n\ny\nsave\n".encode()
        _gpg(key.home, "--command-fd", "0", "--edit-key", key.fingerprint, input=script)
        return self._finish(key.home, key.address, key.fingerprint)

    def set_expiry(self, key: TestKey, expires: str) -> TestKey:
        """``key`` with a new expiry (gpg's notation: "2y", "never") on its primary key and all
        subkeys, made by new self-signatures; unlike ``renew``, the export carries only the new
        ones. Changes ``key``'s home."""
        _gpg(key.home, "--quick-set-expire", key.fingerprint, expires)
        _gpg(key.home, "--quick-set-expire", key.fingerprint, expires, "*")
        return self._finish(key.home, key.address, key.fingerprint)

    def flooded(self, key: TestKey, count: int = 1500, *, signers: int = 25) -> bytes:
        """``key``'s armored public export plus ``count`` third-party certifications of its UID.

        gpg cannot do this quickly (one process per certification, and it refuses to certify a
        UID twice with the same key), so PGPy makes the certifications: ``signers`` throwaway
        Ed25519 keys each certify the UID repeatedly with distinct creation times (Ed25519 is
        deterministic, so equal timestamps would give identical, de-duplicated packets). The
        packets are spliced after the UID (attaching 1,500 signatures through PGPy's object
        model is quadratic) and the result goes through a gpg import/export, which proves gpg
        parses every one of them. About 1 s for 1,500 signatures (0.9-1.4 s measured).
        """
        if count < 1 or signers < 1:
            raise ValueError("count and signers must be positive")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PGPy warns about imghdr and cryptography on use
            import pgpy
            from pgpy.constants import (
                EllipticCurveOID,
                HashAlgorithm,
                KeyFlags,
                PubKeyAlgorithm,
            )
            from pgpy.packet import Packet

            target, _ = pgpy.PGPKey.from_blob(key.public.decode("ascii"))
            uid = next((u for u in target.userids if u.email == key.address), target.userids[0])
            now = datetime.now(UTC).replace(microsecond=0)
            keys = []
            for i in range(signers):
                signer = pgpy.PGPKey.new(
                    PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519, created=now - timedelta(days=1)
                )
                signer.add_uid(
                    pgpy.PGPUID.new(f"Flood {i}", email=f"flood{i}@example.invalid"),
                    usage={KeyFlags.Certify},
                    hashes=[HashAlgorithm.SHA256],
                )
                keys.append(signer)
            certs = b"".join(
                bytes(keys[n % signers].certify(uid, created=now - timedelta(seconds=n // signers)))
                for n in range(count)
            )

            # Find where the UID's own signatures end in gpg's binary export; insert there.
            binary = _gpg(key.home, "--export", key.fingerprint).stdout
            rest = bytearray(binary)
            insert_at: int | None = None
            in_uid = False
            while rest:
                offset = len(binary) - len(rest)
                packet = Packet(rest)  # consumes its bytes from `rest`
                tag = int(packet.header.tag)
                if in_uid and tag != 2:
                    insert_at = offset
                    break
                if tag == 13 and getattr(packet, "uid", None) == uid.userid:
                    in_uid = True
            if insert_at is None:
                insert_at = len(binary) if in_uid else -1
            if insert_at < 0:
                raise ValueError(f"UID of {key.address} not found in the export")

        home = self._new_home("f")
        _gpg(home, "--import", input=binary[:insert_at] + certs + binary[insert_at:])
        return _gpg(home, "--armor", "--export", key.fingerprint).stdout


# -- decryption -------------------------------------------------------------------------------


def _require_output(argv: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> bytes:
    if not proc.stdout:
        raise ToolError(argv, proc.returncode, proc.stderr, "decryption produced no output")
    return proc.stdout


def _gpg_decrypt(key: TestKey, armored: bytes) -> tuple[bytes, str]:
    """gpg's plaintext and the literal packet's format letter (from the PLAINTEXT status)."""
    proc = _gpg(key.home, "--decrypt", input=armored)
    status = proc.stderr.decode("utf-8", "replace")
    if "[GNUPG:] DECRYPTION_OKAY" not in status:
        raise ToolError(["gpg", "--decrypt"], proc.returncode, proc.stderr, "no DECRYPTION_OKAY")
    match = re.search(r"^\[GNUPG:\] PLAINTEXT ([0-9a-fA-F]{2}) ", status, re.MULTILINE)
    fmt = chr(int(match.group(1), 16)) if match else "?"
    return _require_output(["gpg", "--decrypt"], proc), fmt


def decrypt_gpg(key: TestKey, armored: bytes) -> bytes:
    """GnuPG 2.2's plaintext. Exact for binary ('b') literals; for text ('t'/'u') literals gpg
    drops every CR on output, which decrypt_all then reports as a disagreement."""
    return _gpg_decrypt(key, armored)[0]


def literal_format(key: TestKey, armored: bytes) -> str:
    """The literal data packet's format letter ('b', 't', 'u', 'm'), as gpg reports it."""
    return _gpg_decrypt(key, armored)[1]


def _secret_file(key: TestKey) -> Path:
    path = key.home / "secret.asc"
    if not path.exists() or path.read_bytes() != key.secret:
        tmp = path.with_name(f".secret.{os.getpid()}.tmp")
        tmp.write_bytes(key.secret)
        tmp.replace(path)
    return path


def decrypt_sq(key: TestKey, armored: bytes) -> bytes:
    """Sequoia ``sq`` 0.27, reading the secret key from a file (no keystore involved)."""
    argv = ["sq", "decrypt", "--recipient-key", str(_secret_file(key))]
    return _require_output(argv, _run(argv, input=armored, why="sq decrypt failed"))


def _rnp_home(key: TestKey) -> Path:
    """RNP keeps its own keyring format: import the secret key once into ``home/rnp``."""
    home = key.home / "rnp"
    if home.is_dir():
        return home
    staging = Path(tempfile.mkdtemp(prefix=".rnp-", dir=key.home))
    try:
        argv = ["rnpkeys", "--homedir", str(staging), "--notty", "--import"]
        _run([*argv, str(_secret_file(key))], why="rnpkeys --import failed")
        try:
            staging.rename(home)  # atomic; a concurrent worker may have won the race
        except OSError:
            if not home.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def decrypt_rnp(key: TestKey, armored: bytes) -> bytes:
    """RNP 0.16 (Thunderbird's OpenPGP library) with its own homedir."""
    argv = ["rnp", "--homedir", str(_rnp_home(key)), "--notty", "--decrypt", "--output", "-"]
    return _require_output(argv, _run(argv, input=armored, why="rnp --decrypt failed"))


def decrypt_all(key: TestKey, armored: bytes) -> bytes:
    """Decrypt with gpg, sq and rnp; they must agree byte for byte. Returns the plaintext."""
    gpg_out, fmt = _gpg_decrypt(key, armored)
    results = {"gpg": gpg_out, "sq": decrypt_sq(key, armored), "rnp": decrypt_rnp(key, armored)}
    if len(set(results.values())) != 1:
        detail = "\n".join(
            f"  {tool}: {len(out)} bytes {out[:60]!r}" for tool, out in results.items()
        )
        raise AssertionError(
            f"implementations disagree (literal format {fmt!r}; gpg strips CR from text "
            f"literals):\n{detail}"
        )
    return gpg_out


# -- packet inspection ------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedPacket:
    """One top-level packet as ``gpg --list-packets`` sees it."""

    tag: int
    raw: bytes  # the packet with its header, cut from the input at gpg's offsets
    issuer: str | None  # for signatures: the issuer key ID gpg reads from it
    sigclass: int | None  # for signatures: the signature type (0x20 = key revocation)


_GPG_PACKET_HEAD = re.compile(r"^# off=(\d+) ctb=[0-9a-f]+ tag=(\d+) hlen=(\d+) plen=(\d+)")


def list_packets(binary: bytes) -> list[ListedPacket]:
    """The packets of binary OpenPGP data, framed and attributed by gpg (not our parser)."""
    with tempfile.TemporaryDirectory(prefix="lp-", dir="/tmp") as home:
        argv = ["gpg", "--homedir", home, "--batch", "--no-autostart", "--list-packets"]
        text = _run(argv, input=binary, why="gpg --list-packets failed").stdout.decode()
    found: list[tuple[int, bytes]] = []
    issuers: dict[int, str] = {}
    classes: dict[int, int] = {}
    for line in text.splitlines():
        head = _GPG_PACKET_HEAD.match(line)
        if head:
            off, tag, hlen, plen = (int(g) for g in head.groups())
            found.append((tag, binary[off : off + hlen + plen]))
        elif line.startswith(":signature packet:") and found:
            match = re.search(r"keyid ([0-9A-F]{16})", line)
            if match:
                issuers[len(found) - 1] = match.group(1)
        elif (sigclass := re.search(r"\bsigclass 0x([0-9a-f]{2})", line)) and found:
            classes[len(found) - 1] = int(sigclass.group(1), 16)
    return [
        ListedPacket(tag, raw, issuers.get(i), classes.get(i)) for i, (tag, raw) in enumerate(found)
    ]


def _sq_sections(text: str) -> list[tuple[str, list[str]]]:
    """Split ``sq packet dump`` output into (title, indented lines) per top-level packet."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            sections.append((line.split(",")[0].strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def _packet_kind(title: str, body: list[str]) -> str:
    """The packet's type name; for packets sq could not parse, the name on its ``Tag:`` line."""
    if title != _SQ_UNKNOWN:
        return title
    for line in body:
        if line.strip().startswith("Tag:"):
            return line.split(":", 1)[1].strip()
    return title


def _sq_dump(armored: bytes, *extra: str) -> list[tuple[str, list[str]]]:
    argv = ["sq", "packet", "dump", *extra]
    proc = _run(argv, input=armored, why="sq packet dump failed")
    sections = _sq_sections(proc.stdout.decode("utf-8", "replace"))
    if not sections:
        raise ToolError(argv, proc.returncode, proc.stderr, "sq packet dump found no packets")
    return sections


def packet_recipients(armored: bytes) -> set[str]:
    """Key IDs (16 upper-case hex) of every PKESK, as Sequoia reads them (not our parser).

    Raises ValueError for a PKESK sq cannot parse (e.g. v6), rather than silently skip it.
    """
    found: set[str] = set()
    for title, body in _sq_dump(armored):
        if _packet_kind(title, body) != _SQ_PKESK:
            continue
        if title == _SQ_UNKNOWN:
            raise ValueError("a PKESK that sq 0.27 cannot parse: " + " ".join(body))
        ids = [ln.split(":", 1)[1].strip() for ln in body if ln.strip().startswith("Recipient:")]
        if len(ids) != 1:
            raise ValueError(f"PKESK without one recipient line: {body}")
        found.add(ids[0].upper())
    return found


def packet_versions(armored: bytes) -> tuple[set[int], set[int]]:
    """(PKESK versions, SEIPD versions) of the top-level packets, read by sq.

    sq 0.27 predates RFC 9580, so it labels PKESK v6 / SEIPD v2 "unknown version"; their
    version octet is then read from sq's annotated hex dump. A legacy SED (no MDC) or a
    GnuPG-style AEAD packet raises ValueError: neither belongs in our output.
    """
    pkesk: set[int] = set()
    seipd: set[int] = set()
    unknown = False
    for title, body in _sq_dump(armored):
        kind = _packet_kind(title, body)
        if kind in _SQ_LEGACY:
            raise ValueError(f"message contains a {kind}")
        if kind not in (_SQ_PKESK, _SQ_SEIPD):
            continue
        if title == _SQ_UNKNOWN:
            unknown = True
            continue
        versions = [ln.split(":", 1)[1].strip() for ln in body if ln.strip().startswith("Version:")]
        (pkesk if kind == _SQ_PKESK else seipd).add(int(versions[0]))
    if unknown:  # only then pay for the hex dump, which is as long as the message
        for title, body in _sq_dump(armored, "--hex"):
            kind = _packet_kind(title, body)
            if title != _SQ_UNKNOWN or kind not in (_SQ_PKESK, _SQ_SEIPD):
                continue
            version = next((m.group(1) for ln in body if (m := _HEX_VERSION.match(ln))), None)
            if version is None:
                raise ValueError(f"no version octet in sq's hex dump of a {kind}")
            (pkesk if kind == _SQ_PKESK else seipd).add(int(version, 16))
    return pkesk, seipd
