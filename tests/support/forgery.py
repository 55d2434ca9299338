"""Keys carrying thousands of forged "self-signatures", the costliest upload a stranger can make.

Anybody can take a public key, copy its user ID's self-signature and change the creation time
in it (about 150 bytes each for an Ed25519 key, so 7,000 fit in 1 MB): the issuer still names
the primary key, the packets are all distinct, and the two-byte hash prefix is recomputed so
gpg cannot reject them cheaply; it has to run the public-key verification of each (which
fails). Only framing and hashing here, with a packet reader of its
own (it must not share the product's parser); binary keys as gpg exports them, no partial
lengths.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_HASHES = {2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}


@dataclass(frozen=True)
class _Packet:
    tag: int
    body: bytes


def _packets(data: bytes) -> list[_Packet]:
    found: list[_Packet] = []
    pos = 0
    while pos < len(data):
        first = data[pos]
        if first & 0x40:  # new format
            tag = first & 0x3F
            octet = data[pos + 1]
            if octet < 192:
                length, pos = octet, pos + 2
            elif octet < 224:
                length, pos = ((octet - 192) << 8) + data[pos + 2] + 192, pos + 3
            else:
                length, pos = int.from_bytes(data[pos + 2 : pos + 6], "big"), pos + 6
        else:
            tag = (first >> 2) & 0x0F
            width = {0: 1, 1: 2, 2: 4}[first & 3]
            length = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        found.append(_Packet(tag, data[pos : pos + length]))
        pos += length
    return found


def _frame(tag: int, body: bytes) -> bytes:
    """New-format header, with the shortest length encoding (RFC 4880 4.2.2)."""
    size = len(body)
    if size < 192:
        return bytes([0xC0 | tag, size]) + body
    if size < 8384:
        size -= 192
        return bytes([0xC0 | tag, (size >> 8) + 192, size & 0xFF]) + body
    return bytes([0xC0 | tag, 0xFF]) + size.to_bytes(4, "big") + body


def forged_self_signatures(binary_key: bytes, count: int, *, newer: bool = True) -> bytes:
    """``binary_key`` (one key, v4 signatures) with ``count`` forged copies of its first user
    ID's self-signature after the genuine one, dated after it (gpg then verifies every one
    before it reaches the genuine one: ~0.8 ms each for Ed25519) or, with ``newer=False``,
    before it."""
    packets = _packets(binary_key)
    primary = packets[0].body
    uid_index = next(i for i, p in enumerate(packets) if p.tag == 13)
    uid = packets[uid_index].body
    genuine = packets[uid_index + 1].body
    assert packets[uid_index + 1].tag == 2 and genuine[0] == 4
    hashed_len = int.from_bytes(genuine[4:6], "big")
    hashed = genuine[6 : 6 + hashed_len]
    rest = genuine[6 + hashed_len :]
    unhashed_len = int.from_bytes(rest[:2], "big")
    unhashed, mpis = rest[: 2 + unhashed_len], rest[2 + unhashed_len + 2 :]
    time_at = _creation_time_offset(hashed)
    created = int.from_bytes(hashed[time_at : time_at + 4], "big")
    prefix = (
        b"\x99" + len(primary).to_bytes(2, "big") + primary
        + b"\xb4" + len(uid).to_bytes(4, "big") + uid
    )  # fmt: skip
    forged: list[bytes] = []
    for n in range(1, count + 1):
        moment = created + n if newer else created - n
        area = hashed[:time_at] + moment.to_bytes(4, "big") + hashed[time_at + 4 :]
        head = genuine[:4] + hashed_len.to_bytes(2, "big") + area
        digest = hashlib.new(_HASHES[genuine[3]], prefix + head)
        digest.update(b"\x04\xff" + len(head).to_bytes(4, "big"))
        forged.append(_frame(2, head + unhashed + digest.digest()[:2] + mpis))
    before = b"".join(_frame(p.tag, p.body) for p in packets[: uid_index + 2])
    after = b"".join(_frame(p.tag, p.body) for p in packets[uid_index + 2 :])
    return before + b"".join(forged) + after


def _creation_time_offset(area: bytes) -> int:
    pos = 0
    while pos < len(area):
        first = area[pos]
        if first < 192:
            length, pos = first, pos + 1
        elif first < 255:
            length, pos = ((first - 192) << 8) + area[pos + 1] + 192, pos + 2
        else:
            length, pos = int.from_bytes(area[pos + 1 : pos + 5], "big"), pos + 5
        if area[pos] & 0x7F == 2:
            return pos + 1
        pos += length
    raise ValueError("no creation time subpacket")


def forged_user_ids(binary_key: bytes, user_ids: int, count: int) -> bytes:
    """``binary_key`` plus ``user_ids`` made-up user IDs, each carrying ``count`` forged
    self-signatures (copies of the first user ID's, re-dated and re-hashed for the new user
    ID): the most gpg verification one upload can ask for under the packet-level caps."""
    packets = _packets(binary_key)
    primary = packets[0].body
    uid_index = next(i for i, p in enumerate(packets) if p.tag == 13)
    template = packets[uid_index + 1].body
    extra: list[bytes] = []
    for n in range(user_ids):
        uid = _frame(13, f"Forged {n} <forged{n}@example.test>".encode())
        fake = _frame(6, primary) + uid + _frame(2, template)
        forged = forged_self_signatures(fake, count)[len(fake) :]  # the forgeries only
        extra.append(uid + forged)
    head = b"".join(_frame(p.tag, p.body) for p in packets[: uid_index + 2])
    tail = b"".join(_frame(p.tag, p.body) for p in packets[uid_index + 2 :])
    return head + b"".join(extra) + tail
