"""An in-process OpenPGP engine (Sequoia, through pysequoia): no process per message.

gpg's floor is its own start-up (~90 % of each run, 5-10 ms); Sequoia encrypts a 10 KB message
in about a millisecond with the certificate parsed once. Three things about pysequoia decide the
shape of this module (bench/engines.py measures them):

- It picks the encryption subkeys by its own policy, which can differ from gpg's view, and gpg
  stays the judge of which subkeys are usable. So it is handed a certificate reduced to the
  stored encryption subkeys (``Recipient.encryption_keys``): it cannot pick any other one.
- It writes PKESK v6 + SEIPD v2, which GnuPG 2.2, RNP and sq 0.27 cannot read, as soon as the
  key advertises SEIPDv2, and has no switch to prevent it. So each key is tried once, on a few
  bytes, and the output checked with :func:`check_ciphertext`: a key it cannot serve as the
  mail clients need is refused here (:class:`Unsupported`) and served by gpg instead.
- It holds the interpreter lock for the whole call and takes and returns whole byte strings
  (about four times the message in memory, as the gpg engine needs in this process), so a
  large message would stall the event loop: the caller leaves those to gpg
  (:mod:`gpgfilter.openpgp.choice`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import pysequoia
from pysequoia.packet import Packet, PacketPile, Tag

from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.engine import EngineError, Plaintext, Recipient, pieces

NAME = "sequoia"
VERSION = "pysequoia 0.1.35"  # pinned exactly in pyproject.toml: its API is not stable
_TRIAL = b"Content-Type: text/plain\r\n\r\ntrial\r\n"
_KEY_PACKETS = (Tag.PublicKey, Tag.PublicSubkey)


class Unsupported(EngineError):
    """This engine cannot encrypt to this key as the mail clients need: use gpg for it."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    certs: tuple[pysequoia.Cert, ...]


def key_id(recipient: Recipient) -> str:
    """What a decision about a key is attached to: the stored key and the subkeys gpg chose.
    A changed key, or gpg's changed view of its subkeys, gets a new decision."""
    digest = hashlib.sha256(recipient.key_data)
    digest.update(",".join(recipient.encryption_keys).encode("ascii"))
    return digest.hexdigest()


def reduce_to(key_data: bytes, wanted: tuple[str, ...]) -> list[pysequoia.Cert]:
    """The certificates in ``key_data``, each keeping only the subkeys in ``wanted`` (with their
    binding signatures); a certificate left with none of them is dropped.

    Packets are selected, never rewritten: every signature still verifies, and Sequoia still
    checks each binding itself (a subkey it does not accept yields no session-key packet for
    it, which the trial then refuses).
    """
    wanted_set = {f.lower() for f in wanted}
    try:
        packets = list(PacketPile.from_bytes(key_data))
    except Exception:  # pysequoia raises plain exceptions carrying Rust backtraces
        raise Unsupported("Sequoia cannot parse the stored key") from None
    groups: list[list[Packet]] = []
    keep = True  # whether the packets that follow belong to something we keep
    for packet in packets:
        if packet.tag == Tag.PublicKey:
            groups.append([])
            keep = True
        elif packet.tag == Tag.PublicSubkey:
            keep = (packet.fingerprint or "").lower() in wanted_set
        elif packet.tag != Tag.Signature:
            keep = True  # a user ID or attribute: it belongs to the primary key
        if not groups:
            raise Unsupported("the stored key does not start with a primary key")
        if keep:
            groups[-1].append(packet)
    certs: list[pysequoia.Cert] = []
    for group in groups:
        if not any(
            (p.fingerprint or "").lower() in wanted_set for p in group if p.tag in _KEY_PACKETS
        ):
            continue
        try:
            certs.append(pysequoia.Cert.from_packets(group))
        except Exception:
            raise Unsupported("Sequoia does not accept the stored key") from None
    return certs


class SequoiaEngine:
    """Encrypts in this process. Each key is prepared once (parsed, reduced, tried) and kept in
    a bounded cache, so a message costs one encryption and no parsing."""

    name = NAME
    version = VERSION

    def __init__(self, *, cache_size: int = 4096) -> None:
        self.cache_size = cache_size
        self._prepared: OrderedDict[str, _Prepared] = OrderedDict()

    def prepare(self, recipient: Recipient) -> None:
        """Make sure this engine can serve ``recipient``; raise :class:`Unsupported` if not.

        A trial encryption, checked exactly as every message is, decides: it catches the
        SEIPDv2 switch, a subkey Sequoia rejects that gpg accepts, and anything else that
        would make the output differ from what the clients read.
        """
        self._get(recipient)

    def _get(self, recipient: Recipient) -> _Prepared:
        ident = key_id(recipient)
        found = self._prepared.get(ident)
        if found is not None:
            self._prepared.move_to_end(ident)
            return found
        if not recipient.encryption_keys:
            raise Unsupported("the key has no usable encryption subkey")
        certs = tuple(reduce_to(recipient.key_data, recipient.encryption_keys))
        if not certs:
            raise Unsupported("none of the stored encryption subkeys is in the key")
        prepared = _Prepared(certs)
        try:
            check_ciphertext(self._encrypt(prepared, _TRIAL), recipient)
        except EngineError as error:
            raise Unsupported(f"trial encryption refused: {error}") from None
        self._prepared[ident] = prepared
        while len(self._prepared) > self.cache_size:
            self._prepared.popitem(last=False)
        return prepared

    @staticmethod
    def _encrypt(prepared: _Prepared, data: bytes) -> bytes:
        try:
            armored = pysequoia.encrypt(data, list(prepared.certs))
        except Exception:  # the message may carry Rust backtraces, never plaintext: drop it
            raise EngineError("Sequoia could not encrypt to the key") from None
        # Sequoia's armor ends lines with LF; mail needs CRLF (armor has no CR of its own).
        return armored.replace(b"\n", b"\r\n")

    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        prepared = self._get(recipient)
        parts = pieces(plaintext)
        data = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        return self._encrypt(prepared, data)

    def forget(self) -> None:
        """Drop every prepared key (on reload: the store may have changed under us)."""
        self._prepared.clear()
