"""The OpenPGP packet reader and the upload key parser on hostile bytes: every length encoding
RFC 4880 allows reads back to the same packets (gpg agreeing), and anything else only ever
raises the documented error.

Keys and ciphertexts are real, made by gpg; gpg --list-packets is the oracle for the framing.
"""

from __future__ import annotations

import contextlib
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystore import packets as openpgp
from keystore import sanitize
from tests.support.openpgp_tools import TestKey, list_packets

_FRAMINGS = ("new", "new-5", "old", "old-4", "partial")
_GPG = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_FAST = settings(max_examples=150, deadline=None)
# Packets that may use partial body lengths (RFC 4880 4.2.2.4); gpg refuses them elsewhere.
_PARTIAL_OK = frozenset({8, 9, 11, 18, 20})


def new_length(length: int, *, wide: bool = False) -> bytes:
    """A new-format body length, in its shortest form or always in five octets."""
    if wide or length >= 8384:
        return b"\xff" + length.to_bytes(4, "big")
    if length < 192:
        return bytes([length])
    length -= 192
    return bytes([(length >> 8) + 192, length & 0xFF])


def frame(tag: int, body: bytes, framing: str, chunk_power: int = 2) -> bytes:
    """``body`` as one packet of ``tag`` in the given framing (falling back to the new format
    where the old one cannot express the tag, or partial lengths cannot hold the body)."""
    if framing.startswith("old") and tag < 16:
        width = 2 if framing == "old-4" or len(body) >= 0x10000 else 0 if len(body) < 256 else 1
        return bytes([0x80 | tag << 2 | width]) + len(body).to_bytes(1 << width, "big") + body
    if framing == "partial" and len(body) > 512:
        # First chunk must be at least 512 octets (RFC 4880 4.2.2.4); then smaller powers of 2.
        out = bytes([0xC0 | tag, 0xE0 | 9]) + body[:512]
        rest = body[512:]
        chunk = 1 << chunk_power
        while len(rest) >= chunk:
            out += bytes([0xE0 | chunk_power]) + rest[:chunk]
            rest = rest[chunk:]
        return out + new_length(len(rest)) + rest
    return bytes([0xC0 | tag]) + new_length(len(body), wide=framing == "new-5") + body


def dechunk(data: bytes, span: openpgp.Span) -> bytes:
    """A span's body with partial-length chunk headers removed (read from the packet's first
    length octet, which lies before ``span.body``)."""
    if not span.partial:
        return data[span.body : span.end]
    body = b""
    pos = span.start + 1
    while 224 <= data[pos] < 255:
        size = 1 << (data[pos] & 0x1F)
        body += data[pos + 1 : pos + 1 + size]
        pos += 1 + size
    width = 1 if data[pos] < 192 else 2 if data[pos] < 224 else 5  # the last, definite length
    return body + data[pos + width : span.end]


# Bodies of every size class: one-, two- and five-octet lengths, several partial chunks.
bodies = st.builds(
    lambda pattern, size: (pattern * (size // len(pattern) + 1))[:size],
    st.binary(min_size=1, max_size=16),
    st.one_of(st.integers(0, 191), st.integers(192, 8383), st.integers(8384, 20_000)),
)
packets = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=63),
        bodies,
        st.sampled_from(_FRAMINGS),
        st.integers(min_value=0, max_value=8),
    ),
    max_size=5,
)


@pytest.fixture(scope="module")
def alice_binary(alice: TestKey) -> bytes:
    found = openpgp.find_armor(alice.public)
    assert found is not None
    return found.data


@pytest.fixture(scope="module")
def ciphertext(alice: TestKey) -> bytes:
    argv = ["gpg", "--homedir", str(alice.home), "--batch", "--trust-model", "always"]
    argv += ["--encrypt", "-r", alice.fingerprint]
    return subprocess.run(argv, input=b"hello", capture_output=True, check=True).stdout


# -- framing round-trips ------------------------------------------------------------------------


@_FAST
@given(packets)
def test_every_length_encoding_reads_back(chosen: list[tuple[int, bytes, str, int]]) -> None:
    data = b"".join(frame(tag, body, framing, power) for tag, body, framing, power in chosen)
    spans = list(openpgp.iter_spans(data))
    assert [(s.tag, dechunk(data, s)) for s in spans] == [(t, b) for t, b, _, _ in chosen]
    assert spans == list(openpgp.iter_spans(data, prefix=True))
    assert [s.start for s in spans[1:]] == [s.end for s in spans[:-1]]


@_FAST
@given(packets, st.integers(min_value=0))
def test_a_cut_message_reads_as_its_complete_packets_then_a_partial_one(
    chosen: list[tuple[int, bytes, str, int]], cut: int
) -> None:
    data = b"".join(frame(tag, body, framing, power) for tag, body, framing, power in chosen)
    whole = list(openpgp.iter_spans(data))
    prefix = data[: cut % (len(data) + 1)]
    try:
        spans = list(openpgp.iter_spans(prefix, prefix=True))
    except openpgp.PacketError:
        return  # cut inside a length header
    complete = [s for s in spans if s.complete]
    assert complete == whole[: len(complete)]
    assert all(s.complete for s in spans[:-1])


@_GPG
@given(framings=st.lists(st.sampled_from(_FRAMINGS), min_size=1))
def test_reframed_real_key_is_the_same_key_to_gpg_and_to_us(
    alice: TestKey, alice_binary: bytes, framings: list[str]
) -> None:
    """Re-encoding every packet of a gpg-made key in another framing changes neither what gpg
    reads nor what the stripper keeps (the fingerprint hashes the body, not the framing)."""
    spans = list(openpgp.iter_spans(alice_binary))
    reframed = b"".join(
        frame(
            s.tag,
            alice_binary[s.body : s.end],
            framing if framing != "partial" or s.tag in _PARTIAL_OK else "new",
        )
        for s, framing in zip(spans, framings * len(spans), strict=False)
    )
    by_gpg = [(p.tag, p.raw) for p in list_packets(reframed)]
    ours = [(s.tag, reframed[s.start : s.end]) for s in openpgp.iter_spans(reframed)]
    assert by_gpg == ours
    stripped = sanitize.strip_key(reframed)
    assert stripped.fingerprint == alice.fingerprint
    assert stripped.data == reframed and stripped.dropped_signatures == 0


# -- hostile bytes --------------------------------------------------------------------------------


def read_everything(data: bytes) -> None:
    """Every entry point of the packet reader: only PacketError, or an answer."""
    for prefix in (False, True):
        with contextlib.suppress(openpgp.PacketError):
            for packet in openpgp.iter_packets(data, prefix=prefix):
                assert len(packet.head) <= 64
    with contextlib.suppress(openpgp.PacketError):
        openpgp.read_addressing(data)
    assert openpgp.is_encrypted_message(data) in (True, False)
    for budget in (None, 48):
        armored = openpgp.find_armor(data, max_decode=budget)
        assert armored is None or (data.startswith(armored.before) and data.endswith(armored.after))


@_FAST
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_raise_packet_error(data: bytes) -> None:
    read_everything(data)


@_FAST
@given(st.binary(max_size=400))
def test_arbitrary_armor_payload_never_raises(junk: bytes) -> None:
    read_everything(b"-----BEGIN PGP MESSAGE-----\n\n" + junk + b"\n-----END PGP MESSAGE-----\n")


@_FAST
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1))
def test_mutated_ciphertext_only_raises_packet_error(
    ciphertext: bytes, edits: list[tuple[int, int]]
) -> None:
    mutated = bytearray(ciphertext)
    for index, value in edits:
        mutated[index % len(mutated)] = value
    read_everything(bytes(mutated))


def test_real_ciphertext_reads_as_addressed_to_the_subkey(
    alice: TestKey, ciphertext: bytes
) -> None:
    assert openpgp.is_encrypted_message(ciphertext)
    addressing = openpgp.read_addressing(ciphertext)
    assert addressing.key_ids == tuple(openpgp.key_id(f) for f in alice.encryption_subkeys)
    assert addressing.data_tag in openpgp.ENCRYPTED_DATA_TAGS


# -- the upload key parser ----------------------------------------------------------------------


@_FAST
@given(st.binary(max_size=600))
def test_signature_and_revocation_readers_only_raise_unfit_key(data: bytes) -> None:
    sanitize.parse_signature(data)
    with contextlib.suppress(sanitize.UnfitKey):
        sanitize.lone_revocation(data)
    # As the body of one signature packet, so the subpacket areas get read.
    with contextlib.suppress(sanitize.UnfitKey):
        sanitize.lone_revocation(frame(2, b"\x04\x20" + data, "new"))


@_FAST
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1))
def test_stripping_a_mutated_key_is_idempotent(
    alice_binary: bytes, edits: list[tuple[int, int]]
) -> None:
    """Whatever survives the stripper is a key the stripper keeps whole: the kept packets are
    the upload's own and a second pass drops nothing."""
    mutated = bytearray(alice_binary)
    for index, value in edits:
        mutated[index % len(mutated)] = value
    try:
        stripped = sanitize.strip_key(bytes(mutated))
    except sanitize.UnfitKey:
        return
    again = sanitize.strip_key(stripped.data)
    assert (again.fingerprint, again.data) == (stripped.fingerprint, stripped.data)
    assert again.dropped_signatures == again.dropped_attributes == 0
