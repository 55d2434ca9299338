"""Cutting a key down at the packet level, before gpg (or anything slow) reads it.

A key fetched from the internet can carry thousands of certifications by strangers (the 2019
keyserver flood): gpg keeps them all on a plain import, and PGPy needs seconds to parse them.
Which key made a signature needs no cryptography — its issuer subpacket names it — so the flood
is cut out here, with our own packet framing, in a few milliseconds. We keep only what the
primary key itself claims to have issued; gpg then verifies those claims, so a forged
"self-signature" survives this step but not the import that follows. Verifying costs gpg about
a millisecond per signature, and anybody can forge thousands of "self-signatures" on a public
key, so each component (the primary key, each user ID, each subkey) keeps only its newest few,
and a key with absurdly many user IDs or subkeys is refused.

Nothing here trusts the data: every malformed structure is an ``UnfitKey`` with a message meant
for the person who uploaded it, and no message ever quotes the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from keystore import packets as openpgp

SIG_KEY_REVOCATION = 0x20
_REVOCATIONS = frozenset({SIG_KEY_REVOCATION, 0x28, 0x30})  # key, subkey, certification
# What gpg sees of one upload. gpg's minimal export keeps only the newest self-signature of
# each component, and a revocation is always the newest, so a few per component lose nothing
# real; the component counts are far above any key in use (gpg itself warns past a dozen).
MAX_SIGNATURES_PER_COMPONENT = 4
MAX_SIGNATURES_SEEN = 100  # more on one component is no key in use: refused, with the reason
MAX_USER_IDS = 64
MAX_SUBKEYS = 64
_SUBPACKET_CREATION_TIME = 2
_SUBPACKET_ISSUER_KEY_ID = 16
_SUBPACKET_ISSUER_FINGERPRINT = 33
# Packets that mean nothing in an uploaded key (keyring trust, marker, RFC 9580 padding):
# dropped silently rather than refused, since some tools emit them.
_IGNORED_TAGS = frozenset({openpgp.TAG_TRUST, openpgp.TAG_MARKER, 21})


class UnfitKey(ValueError):
    """The data is not a single public v4 key; the message says why, for the uploader."""


@dataclass(frozen=True, slots=True)
class Signature:
    """What a signature packet says about itself, read without verifying it."""

    version: int
    sig_type: int
    issuer_fingerprints: frozenset[str]  # upper-case hex, from issuer fingerprint subpackets
    issuer_key_ids: frozenset[str]  # 16 upper-case hex digits, from issuer key ID subpackets
    created: int = 0  # the claimed creation time (hashed subpacket), 0 when absent

    def claims_issuer(self, fingerprint: str) -> bool:
        """True when the signature names ``fingerprint`` as its issuer and no other key.

        The fingerprint subpacket decides when there is one; a signature naming no issuer at
        all cannot be attributed and counts as foreign.
        """
        if self.issuer_fingerprints:
            return self.issuer_fingerprints == {fingerprint.upper()}
        return self.issuer_key_ids == {openpgp.key_id(fingerprint)}


@dataclass(frozen=True, slots=True)
class StrippedKey:
    fingerprint: str  # of the primary key, computed from its packet
    data: bytes  # the kept packets, byte for byte as uploaded
    dropped_signatures: int  # third-party or unattributable signatures
    dropped_attributes: int  # user attribute packets (photo IDs)
    trimmed_signatures: int = 0  # self-signatures over MAX_SIGNATURES_PER_COMPONENT


@dataclass(slots=True)
class _Component:
    """The primary key, a user ID or a subkey, and the self-signatures that follow it (each
    with its rank: revocation first, then newest)."""

    name: str
    packet: bytes
    signatures: list[tuple[tuple[bool, int], bytes]] = field(default_factory=list)


def v4_fingerprint(body: bytes) -> str:
    """The v4 fingerprint of a public key packet body (RFC 4880 section 12.2)."""
    framed = b"\x99" + len(body).to_bytes(2, "big") + body
    return hashlib.sha1(framed, usedforsecurity=False).hexdigest().upper()


def parse_signature(body: bytes) -> Signature | None:
    """The type and claimed issuers of a signature packet; None when it cannot be read
    (unknown version, truncated or malformed subpacket areas)."""
    if not body:
        return None
    version = body[0]
    if version == 3:
        # RFC 4880 5.2.2: version, 5, type, time(4), key ID(8), algorithms, hash prefix.
        if len(body) < 19 or body[1] != 5:
            return None
        created = int.from_bytes(body[3:7], "big")
        return Signature(3, body[2], frozenset(), frozenset({body[7:15].hex().upper()}), created)
    if version not in (4, 6):
        return None
    width = 2 if version == 4 else 4  # RFC 9580 widened the subpacket area lengths
    pos = 4
    fingerprints: set[str] = set()
    key_ids: set[str] = set()
    created = 0
    for area in ("hashed", "unhashed"):
        if pos + width > len(body):
            return None
        length = int.from_bytes(body[pos : pos + width], "big")
        pos += width
        if pos + length > len(body):
            return None
        try:
            for kind, value in _subpackets(body[pos : pos + length]):
                if kind == _SUBPACKET_ISSUER_FINGERPRINT and len(value) > 1:
                    fingerprints.add(value[1:].hex().upper())
                elif kind == _SUBPACKET_ISSUER_KEY_ID and len(value) == 8:
                    key_ids.add(value.hex().upper())
                elif kind == _SUBPACKET_CREATION_TIME and len(value) == 4 and area == "hashed":
                    created = int.from_bytes(value, "big")
        except UnfitKey:
            return None
        pos += length
    return Signature(version, body[1], frozenset(fingerprints), frozenset(key_ids), created)


def _subpackets(area: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without the critical bit, value) for each subpacket (RFC 4880 5.2.3.1)."""
    pos = 0
    size = len(area)
    while pos < size:
        first = area[pos]
        if first < 192:
            length, pos = first, pos + 1
        elif first < 255:
            if pos + 2 > size:
                raise UnfitKey("truncated subpacket length")
            length, pos = ((first - 192) << 8) + area[pos + 1] + 192, pos + 2
        else:
            if pos + 5 > size:
                raise UnfitKey("truncated subpacket length")
            length, pos = int.from_bytes(area[pos + 1 : pos + 5], "big"), pos + 5
        if length == 0 or pos + length > size:
            raise UnfitKey("subpacket runs past its area")
        yield area[pos] & 0x7F, area[pos + 1 : pos + length]
        pos += length


def strip_key(binary: bytes) -> StrippedKey:
    """Check ``binary`` is one public v4 key and keep only what its primary key issued.

    Kept: the primary key, user IDs, subkeys, and signatures that name the primary key as
    issuer. Dropped: every other signature (third-party certifications; also direct-key
    revocations by designated revokers, which cannot be verified without the revoker's key),
    user attributes (photo IDs) with their signatures, and keyring trust or marker packets.
    Of the self-signatures of each component only the newest MAX_SIGNATURES_PER_COMPONENT
    stay (revocations first); more than MAX_USER_IDS user IDs or MAX_SUBKEYS subkeys is an
    ``UnfitKey``.
    """
    try:
        spans = list(openpgp.iter_spans(binary))
    except openpgp.PacketError as error:
        raise UnfitKey(f"malformed OpenPGP data: {error}") from None
    tags = [span.tag for span in spans]
    if openpgp.TAG_SECRET_KEY in tags or openpgp.TAG_SECRET_SUBKEY in tags:
        raise UnfitKey("this is a secret key: export and upload the public key only")
    primaries = tags.count(openpgp.TAG_PUBLIC_KEY)
    if not primaries:
        raise UnfitKey("no public key in the data")
    if primaries > 1:
        raise UnfitKey(f"expected exactly one public key, found {primaries}")
    meaningful = [span for span in spans if span.tag not in _IGNORED_TAGS]
    primary = meaningful[0]
    if primary.tag != openpgp.TAG_PUBLIC_KEY:
        raise UnfitKey("malformed key: it does not start with a public key packet")
    body = binary[primary.body : primary.end]
    if primary.partial or not body:
        raise UnfitKey("malformed key: bad public key packet")
    if body[0] == 6:
        raise UnfitKey("v6 keys (RFC 9580) cannot be read by today's mail clients: use a v4 key")
    if body[0] != 4:
        raise UnfitKey("only OpenPGP v4 keys are supported")
    fingerprint = v4_fingerprint(body)
    _check_counts(meaningful)

    components = [_Component("the primary key", binary[primary.start : primary.end])]
    counts = {openpgp.TAG_USER_ID: 0, openpgp.TAG_PUBLIC_SUBKEY: 0}
    dropped_signatures = dropped_attributes = 0
    in_attribute = False
    for span in meaningful[1:]:
        if span.partial:
            raise UnfitKey(f"malformed key: packet of type {span.tag} uses partial lengths")
        if span.tag in (openpgp.TAG_USER_ID, openpgp.TAG_PUBLIC_SUBKEY):
            in_attribute = False
            counts[span.tag] += 1
            kind = "user ID" if span.tag == openpgp.TAG_USER_ID else "subkey"
            name = f"{kind} number {counts[span.tag]}"
            components.append(_Component(name, binary[span.start : span.end]))
        elif span.tag == openpgp.TAG_USER_ATTRIBUTE:
            in_attribute = True
            dropped_attributes += 1
        elif span.tag == openpgp.TAG_SIGNATURE:
            signature = parse_signature(binary[span.body : span.end])
            if in_attribute or signature is None or not signature.claims_issuer(fingerprint):
                dropped_signatures += 1
            else:
                rank = (signature.sig_type in _REVOCATIONS, signature.created)
                components[-1].signatures.append((rank, binary[span.start : span.end]))
        else:
            raise UnfitKey(f"unexpected OpenPGP packet (type {span.tag}) in a public key")
    kept: list[bytes] = []
    trimmed = 0
    for component in components:
        signatures = component.signatures
        if len(signatures) > MAX_SIGNATURES_SEEN:
            raise UnfitKey(
                f"{component.name} carries {len(signatures)} signatures"
                f" that claim to be its own; a key in use has a few (at most"
                f" {MAX_SIGNATURES_SEEN} are read): export it with"
                " `gpg --export-options export-minimal --export` and upload that"
            )
        kept.append(component.packet)
        newest = _newest(signatures)
        trimmed += len(signatures) - len(newest)
        kept.extend(newest)
    return StrippedKey(fingerprint, b"".join(kept), dropped_signatures, dropped_attributes, trimmed)


def _check_counts(spans: list[openpgp.Span]) -> None:
    user_ids = sum(1 for span in spans if span.tag == openpgp.TAG_USER_ID)
    if user_ids > MAX_USER_IDS:
        raise UnfitKey(f"the key has {user_ids} user IDs; at most {MAX_USER_IDS} are accepted")
    subkeys = sum(1 for span in spans if span.tag == openpgp.TAG_PUBLIC_SUBKEY)
    if subkeys > MAX_SUBKEYS:
        raise UnfitKey(f"the key has {subkeys} subkeys; at most {MAX_SUBKEYS} are accepted")


def _newest(signatures: list[tuple[tuple[bool, int], bytes]]) -> list[bytes]:
    """The newest MAX_SIGNATURES_PER_COMPONENT, revocations first, in their original order."""
    if len(signatures) <= MAX_SIGNATURES_PER_COMPONENT:
        return [packet for _, packet in signatures]
    order = sorted(range(len(signatures)), key=lambda i: signatures[i][0], reverse=True)
    chosen = sorted(order[:MAX_SIGNATURES_PER_COMPONENT])
    return [signatures[i][1] for i in chosen]


def lone_revocation(binary: bytes) -> Signature | None:
    """The signature when ``binary`` is exactly one key revocation signature packet (what
    ``gpg --gen-revoke`` writes); None when it is not a lone signature packet at all.
    A lone signature that is unreadable or of another type is an ``UnfitKey``, with the reason.
    """
    try:
        spans = list(openpgp.iter_spans(binary))
    except openpgp.PacketError:
        return None
    if len(spans) != 1 or spans[0].tag != openpgp.TAG_SIGNATURE:
        return None
    signature = None if spans[0].partial else parse_signature(binary[spans[0].body : spans[0].end])
    if signature is None:
        raise UnfitKey("the revocation certificate is malformed")
    if signature.sig_type != SIG_KEY_REVOCATION:
        raise UnfitKey(
            f"this is a signature of type 0x{signature.sig_type:02x}, not a key revocation (0x20)"
        )
    return signature
