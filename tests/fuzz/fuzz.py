"""Coverage-guided fuzz targets (atheris/libFuzzer) for the parsers that read hostile bytes.

    .venv/bin/python -m tests.fuzz.fuzz TARGET [libFuzzer options] [corpus folders]

TARGET is one of split, classify, openpgp, sanitize. Each target asserts the parser's
documented contract on every input, so a broken invariant is a crash with the input saved;
an input that takes longer than ``FUZZ_SLOW_SECONDS`` (default 2) is reported the same way,
since every parser here runs on the mail path or on an anonymous upload and must stay cheap.
libFuzzer's own ``-timeout`` catches a true hang. Not collected by pytest (no ``test_`` name):
it runs for hours, outside CI; ``tests/fuzz/run`` is the campaign.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["gpgfilter", "keystore", "email"]):
    from email.message import Message  # noqa: F401  (instrumented: parse_content_type uses it)

    from gpgfilter.mail.classify import Verdict, classify
    from gpgfilter.mail.rawmessage import content_type, multipart_parts, split, transfer_encoding
    from keystore import packets as openpgp
    from keystore import sanitize
    from keystore.validate import KeyRejected, decode_keyblock, looks_like_revocation

SLOW_SECONDS = float(os.environ.get("FUZZ_SLOW_SECONDS", "2"))


class TooSlow(AssertionError):
    """One input took longer than the per-input budget."""


# -- the message splitter ---------------------------------------------------------------------


def fuzz_split(data: bytes) -> None:
    message = split(data)
    fields = b"".join(f.raw for f in message.fields)
    assert fields + message.separator + message.body == data, "split lost or added bytes"
    assert message.separator in (b"", b"\r\n", b"\n")
    for field in message.fields:
        assert field.name and ":" not in field.name
        assert field.terminated.endswith(b"\n")
        field.value  # noqa: B018  (must not raise: latin-1 decodes every byte)
    head, body = message.inner_parts()
    assert bytes(body) == message.body
    assert head.endswith(message.separator or b"\r\n")
    transfer_encoding(message)
    ctype = content_type(message)
    boundary = ctype.params.get("boundary") if ctype else None
    # Also cut at a boundary taken from the data itself, so both paths are exercised.
    for candidate in filter(None, (boundary, data[:8].decode("latin-1").strip())):
        cut = multipart_parts(message.body, candidate)
        if cut is not None:
            preamble, parts, epilogue, _closed = cut
            assert message.body.startswith(preamble) and message.body.endswith(epilogue)
            assert all(part in message.body for part in parts)


# -- the classifier ---------------------------------------------------------------------------

_PGP_MIME_HEAD = (
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"\r\n'
    b"\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--b\r\n"
    b"Content-Type: application/octet-stream\r\n\r\n"
)


def fuzz_classify(data: bytes) -> None:
    verdict = classify(split(data))
    assert isinstance(verdict, Verdict)
    if verdict is not Verdict.CLEAR:
        ctype = content_type(split(data))
        mimetype = ctype.mimetype if ctype else "text/plain"
        expected = {
            Verdict.PGP_MIME: {"multipart/encrypted"},
            Verdict.INLINE_PGP: {"text/plain"},
            Verdict.SMIME: {"application/pkcs7-mime", "application/x-pkcs7-mime"},
        }[verdict]
        assert mimetype in expected, f"{verdict} for {mimetype}"
    # The same bytes as the encrypted part of a PGP/MIME skeleton reach the armor and packet
    # checks without the fuzzer having to find the MIME structure first.
    wrapped = classify(split(_PGP_MIME_HEAD + data + b"\r\n--b--\r\n"))
    assert wrapped in (Verdict.CLEAR, Verdict.PGP_MIME)


# -- the OpenPGP packet reader ----------------------------------------------------------------


def _new_format(tag: int, body: bytes) -> bytes:
    """One packet framed with a five-octet new-format length (RFC 4880 4.2.2.3)."""
    return bytes([0xC0 | tag, 0xFF]) + len(body).to_bytes(4, "big") + body


def fuzz_openpgp(data: bytes) -> None:
    try:
        spans = list(openpgp.iter_spans(data))
    except openpgp.PacketError:
        spans = None
    if spans is not None:
        position = 0
        for span in spans:
            assert span.start == position and span.start < span.body <= span.end <= len(data)
            assert 0 <= span.tag < 64 and span.complete
            position = span.end
        assert position == len(data), "packets do not cover the data"
        assert list(openpgp.iter_spans(data, prefix=True)) == spans
        # Re-framing every packet with another length encoding keeps tags and bodies.
        if not any(span.partial for span in spans):
            bodies = [(s.tag, data[s.body : s.end]) for s in spans]
            again = b"".join(_new_format(tag, body) for tag, body in bodies)
            reread = [(s.tag, again[s.body : s.end]) for s in openpgp.iter_spans(again)]
            assert reread == bodies, "re-framed packets do not round-trip"
    try:
        for packet in openpgp.iter_packets(data, prefix=True):
            assert len(packet.head) <= 64
    except openpgp.PacketError:
        pass
    with contextlib.suppress(openpgp.PacketError):
        openpgp.read_addressing(data)
    assert openpgp.is_encrypted_message(data) in (True, False)
    for budget in (None, 64):
        armored = openpgp.find_armor(data, max_decode=budget)
        if armored is not None:
            assert data.startswith(armored.before) and data.endswith(armored.after)


# -- the upload key parser (packet level, before gpg) -----------------------------------------


def fuzz_sanitize(data: bytes) -> None:
    assert looks_like_revocation(data) in (True, False)
    try:
        binary = decode_keyblock(data)
    except KeyRejected:
        binary = data
    sanitize.parse_signature(binary)  # must not raise on any bytes
    with contextlib.suppress(sanitize.UnfitKey):
        sanitize.lone_revocation(binary)
    try:
        stripped = sanitize.strip_key(binary)
    except sanitize.UnfitKey:
        return
    assert len(stripped.fingerprint) == 40
    # What is kept is the input's own packets, and keeping is idempotent.
    again = sanitize.strip_key(stripped.data)
    assert again.data == stripped.data and again.fingerprint == stripped.fingerprint
    assert again.dropped_signatures == 0 and again.dropped_attributes == 0


TARGETS: dict[str, Callable[[bytes], None]] = {
    "split": fuzz_split,
    "classify": fuzz_classify,
    "openpgp": fuzz_openpgp,
    "sanitize": fuzz_sanitize,
}


def timed(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """The target, failing any input that takes longer than the per-input budget."""

    def one_input(data: bytes) -> None:
        started = time.perf_counter()
        target(data)
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_SECONDS:
            raise TooSlow(f"{len(data)}-byte input took {elapsed:.2f} s")

    return one_input


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], timed(target))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
