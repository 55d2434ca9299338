"""Reading the OpenPGP packet framing (RFC 4880 section 4, RFC 9580 section 4).

No cryptography happens here: only the framing is read, to answer two structural questions —
"is this an OpenPGP *encrypted message*?" (classification) and "to which keys is this ciphertext
addressed?" (checking what the engine produced). Packet bodies are never interpreted beyond the
first bytes of a public-key encrypted session key packet. ``iter_spans`` also gives each packet's
position, so a key can be cut down packet by packet (keystore.sanitize) without re-encoding it.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass

TAG_PKESK = 1
TAG_SIGNATURE = 2
TAG_SKESK = 3
TAG_SECRET_KEY = 5
TAG_PUBLIC_KEY = 6
TAG_SECRET_SUBKEY = 7
TAG_SED = 9
TAG_MARKER = 10
TAG_TRUST = 12
TAG_USER_ID = 13
TAG_PUBLIC_SUBKEY = 14
TAG_USER_ATTRIBUTE = 17
TAG_SEIPD = 18
TAG_AEAD = 20
ENCRYPTED_DATA_TAGS = frozenset({TAG_SED, TAG_SEIPD, TAG_AEAD})

_ARMOR_BEGIN = re.compile(rb"^-----BEGIN PGP ([A-Z ,/0-9]+)-----[ \t]*\r?$", re.MULTILINE)


class PacketError(ValueError):
    """The bytes are not a well-framed OpenPGP packet sequence."""


@dataclass(frozen=True, slots=True)
class Packet:
    tag: int
    # The first bytes of the body (at most 64): enough for version fields and key IDs.
    head: bytes
    # False when the data ended before the packet did (a prefix was read on purpose).
    complete: bool


@dataclass(frozen=True, slots=True)
class Armored:
    label: str  # "MESSAGE", "PUBLIC KEY BLOCK", ...
    data: bytes  # the decoded binary
    before: bytes  # text before the BEGIN line
    after: bytes  # text after the END line


def _body_length(data: bytes, pos: int) -> tuple[int, int, bool]:
    """New-format length at ``pos``: (length, header size, is_partial)."""
    first = data[pos]
    if first < 192:
        return first, 1, False
    if first < 224:
        if pos + 1 >= len(data):
            raise PacketError("truncated length")
        return ((first - 192) << 8) + data[pos + 1] + 192, 2, False
    if first == 255:
        if pos + 5 > len(data):
            raise PacketError("truncated length")
        return int.from_bytes(data[pos + 1 : pos + 5], "big"), 5, False
    return 1 << (first & 0x1F), 1, True


@dataclass(frozen=True, slots=True)
class Span:
    """Where one packet lies in the data: ``data[start:end]`` is the whole packet as framed,
    ``data[body:end]`` its body (for a partial-length packet, the body with its chunk headers)."""

    tag: int
    start: int
    body: int
    end: int
    partial: bool  # new-format partial body lengths (only data packets may use them)
    complete: bool  # False when the data ended inside the packet (prefix mode only)


def iter_spans(data: bytes, *, prefix: bool = False) -> Iterator[Span]:
    """Walk the packet sequence, yielding each packet's position. With ``prefix``, data ending
    inside a packet is not an error: that packet comes with ``complete=False`` and the walk
    stops."""
    pos = 0
    size = len(data)
    while pos < size:
        first = pos
        ctb = data[pos]
        if not ctb & 0x80:
            raise PacketError(f"invalid packet header at offset {pos}")
        pos += 1
        if ctb & 0x40:  # new format
            tag = ctb & 0x3F
            if pos >= size:
                raise PacketError("truncated packet header")
            length, hsize, partial = _body_length(data, pos)
            pos += hsize
            start = pos
            chunked = partial
            while partial:
                pos += length
                if pos >= size:
                    if prefix:
                        yield Span(tag, first, start, size, True, False)
                        return
                    raise PacketError("truncated partial body")
                length, hsize, partial = _body_length(data, pos)
                pos += hsize
        else:  # old format
            tag = (ctb >> 2) & 0x0F
            chunked = False
            length_type = ctb & 0x03
            if length_type == 3:
                # Indeterminate length: the packet runs to the end of the data.
                yield Span(tag, first, pos, size, False, True)
                return
            width = 1 << length_type
            if pos + width > size:
                raise PacketError("truncated packet header")
            length = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            start = pos
        end = pos + length
        if end > size:
            if prefix:
                yield Span(tag, first, start, size, chunked, False)
                return
            raise PacketError("packet runs past the end of the data")
        yield Span(tag, first, start, end, chunked, True)
        pos = end


def iter_packets(data: bytes, *, prefix: bool = False) -> Iterator[Packet]:
    """Walk the packet sequence. With ``prefix``, data ending inside a packet is not an error:
    the last packet is yielded with ``complete=False`` and the walk stops."""
    for span in iter_spans(data, prefix=prefix):
        yield Packet(span.tag, data[span.body : min(span.end, span.body + 64)], span.complete)


def find_armor(text: bytes, *, max_decode: int | None = None) -> Armored | None:
    """Find the first ASCII-armored block and decode its payload.

    ``max_decode`` limits decoding to about that many binary bytes (the CRC and the END line
    are still required to be present), for callers that only need the leading packets.
    Returns None when there is no complete, decodable armor.
    """
    if b"-----BEGIN PGP " not in text:  # the common case, without the regex
        return None
    begin = _ARMOR_BEGIN.search(text)
    if begin is None:
        return None
    label = begin.group(1).decode("ascii")
    end_line = b"-----END PGP " + begin.group(1) + b"-----"
    end = text.find(end_line, begin.end())
    if end < 0:
        return None
    budget = None if max_decode is None else (max_decode // 3 + 1) * 4
    # Only cut out what will be decoded: a 30 MB ciphertext is checked from its first lines.
    stop = end if budget is None else min(end, begin.end() + 2 * budget + 4096)
    lines = text[begin.end() : stop].replace(b"\r\n", b"\n").split(b"\n")
    index = 1  # lines[0] is the rest of the BEGIN line
    # Armor headers ("Key: value") run up to the first blank line.
    while index < len(lines) and lines[index].strip() and b":" in lines[index]:
        index += 1
    if index < len(lines) and not lines[index].strip():
        index += 1
    payload: list[bytes] = []
    used = 0
    for line in lines[index:]:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(b"=") and len(stripped) == 5:
            break  # CRC24 line
        payload.append(stripped)
        used += len(stripped)
        if budget is not None and used >= budget:
            break
    joined = b"".join(payload)
    if budget is not None:
        joined = joined[: len(joined) - len(joined) % 4]
    try:
        data = binascii.a2b_base64(joined, strict_mode=True) if joined else b""
    except binascii.Error:
        return None
    after_start = end + len(end_line)
    return Armored(label, data, text[: begin.start()], text[after_start:])


def is_encrypted_message(data: bytes) -> bool:
    """True when ``data`` is an OpenPGP encrypted message: one or more session-key packets,
    then exactly one encrypted-data packet that ends the data (RFC 4880 section 11.3)."""
    try:
        packets = list(iter_packets(data))
    except PacketError:
        return False
    if len(packets) < 2:
        return False
    *keys, last = packets
    return all(p.tag in (TAG_PKESK, TAG_SKESK) for p in keys) and last.tag in ENCRYPTED_DATA_TAGS


@dataclass(frozen=True, slots=True)
class Addressing:
    """Who a ciphertext is addressed to, read from its leading packets."""

    key_ids: tuple[str, ...]  # 16 upper-case hex digits each, in packet order
    pkesk_versions: frozenset[int]
    data_tag: int | None  # tag of the encrypted-data packet after the session keys
    data_version: int | None  # its version octet (SEIPD: 1 = MDC, 2 = AEAD)


def read_addressing(data: bytes) -> Addressing:
    """Read the PKESK packets at the start of ``data`` (which may be a prefix of a message)."""
    key_ids: list[str] = []
    versions: set[int] = set()
    data_tag: int | None = None
    data_version: int | None = None
    for packet in iter_packets(data, prefix=True):
        if packet.tag == TAG_PKESK:
            if len(packet.head) < 10:
                raise PacketError("short public-key encrypted session key packet")
            versions.add(packet.head[0])
            key_ids.append(packet.head[1:9].hex().upper())
            continue
        data_tag = packet.tag
        data_version = packet.head[0] if packet.head else None
        break
    return Addressing(tuple(key_ids), frozenset(versions), data_tag, data_version)


def key_id(fingerprint: str) -> str:
    """The v4 key ID: the low 64 bits of the fingerprint."""
    return fingerprint[-16:].upper()
