"""Test oracles over raw message bytes: the corpus, the inner entity, and signature verifiers.

Everything here works on bytes and never re-serialises a message. The verifiers run the real
tools (``gpg``, ``openssl``) against the key material committed in ``tests/corpus/signer/`` and
raise ``AssertionError`` unless the signature is good and made by that key.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import quopri
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"
SIGNER_DIR = CORPUS_DIR / "signer"
RECIPIENT_DIR = CORPUS_DIR / "recipient"

# A header field's first line: a name of printable ASCII without space or colon, then a colon.
_MOVED_FIELD = re.compile(rb"(?:content-[!-9;-~]*|mime-version):", re.IGNORECASE)

HeaderUnit = tuple[bytes, bool]


# ---------------------------------------------------------------------------- the oracle


def header_units(raw: bytes) -> tuple[list[HeaderUnit], bytes | None, bytes]:
    """Split ``raw`` into header units, the blank separator line (None if absent) and the body.

    Lines end at LF (the LF and a CR just before it belong to the line; a CR elsewhere is an
    ordinary byte). The header block is every line before the first empty line, i.e. the first
    line that is exactly ``b"\\n"`` or ``b"\\r\\n"``; that line is the separator and everything
    after it is the body. Without an empty line the whole input is the header block and the body
    is empty. A header unit is a line not starting with space or tab, plus the continuation lines
    (starting with space or tab) after it; continuation lines at the very start form a unit of
    their own. A unit is *moved* (flag True) when its first line starts with ``name:`` where the
    name is ``MIME-Version`` or begins with ``Content-`` (case-insensitive) and consists only of
    printable ASCII other than space and colon. Concatenating the units, the separator and the
    body gives back ``raw`` exactly.
    """
    units: list[list[bytes]] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        line = raw[pos:] if end < 0 else raw[pos : end + 1]
        pos += len(line)
        if line in (b"\n", b"\r\n"):
            return _flag(units), line, raw[pos:]
        if line[:1] in (b" ", b"\t") and units:
            units[-1].append(line)
        else:
            units.append([line])
    return _flag(units), None, b""


def _flag(units: list[list[bytes]]) -> list[HeaderUnit]:
    return [(b"".join(u), _MOVED_FIELD.match(u[0]) is not None) for u in units]


def inner_entity(raw: bytes) -> bytes:
    """The MIME entity the product must encrypt for message ``raw``.

    That is: the moved header units of :func:`header_units` (every ``Content-*`` and
    ``MIME-Version`` field with its continuation lines, verbatim, line endings included, in their
    original order), then the blank separator line exactly as in ``raw`` (``b"\\r\\n"`` when
    ``raw`` has no empty line), then the body bytes exactly as in ``raw`` (empty when there is
    no empty line). Nothing is decoded, re-folded or normalised.
    """
    units, separator, body = header_units(raw)
    moved = b"".join(unit for unit, is_moved in units if is_moved)
    return moved + (b"\r\n" if separator is None else separator) + body


def kept_header_lines(raw: bytes) -> bytes:
    """The header units of ``raw`` that stay outside (the complement of the moved ones)."""
    return b"".join(unit for unit, is_moved in header_units(raw)[0] if not is_moved)


def load_corpus() -> dict[str, bytes]:
    """Every ``tests/corpus/*.eml``: file name -> raw bytes."""
    return {p.name: p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.eml"))}


# ---------------------------------------------------------------------------- MIME reading


def content_headers(entity: bytes) -> email.message.Message:
    """The header block of ``entity``, parsed read-only (for Content-Type parameters)."""
    units, _, _ = header_units(entity)
    return email.message_from_bytes(b"".join(u for u, _ in units) + b"\r\n")


def body_of(entity: bytes) -> bytes:
    """The raw body of ``entity``."""
    return header_units(entity)[2]


def multipart_parts(body: bytes, boundary: str) -> list[bytes]:
    """The raw parts of a multipart body (RFC 2046): the CRLF before a delimiter is not part."""
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            return parts
        start = match.end()
    raise AssertionError("multipart body without closing delimiter")


def decoded_body(entity: bytes) -> bytes:
    """The body of ``entity`` with its Content-Transfer-Encoding (base64, QP) undone."""
    cte = str(content_headers(entity).get("Content-Transfer-Encoding", "7bit")).strip().lower()
    body = body_of(entity)
    if cte == "base64":
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except binascii.Error as exc:
            raise AssertionError(f"bad base64 body: {exc}") from exc
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body


# ---------------------------------------------------------------------------- tools


def run(cmd: Sequence[str | Path], data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command with ``data`` on stdin; never raises on a non-zero exit."""
    return subprocess.run(
        [str(c) for c in cmd], input=data, capture_output=True, check=False, timeout=60
    )


@contextmanager
def gpg_home(*key_files: Path) -> Iterator[list[str]]:
    """A temporary GnuPG home with ``key_files`` imported; yields the gpg command prefix."""
    with tempfile.TemporaryDirectory(prefix="gpgfilter-test-") as tmp:
        Path(tmp).chmod(0o700)
        gpg = ["gpg", "--homedir", tmp, "--batch", "--no-tty", "--pinentry-mode", "loopback"]
        try:
            for key in key_files:
                proc = run([*gpg, "--import", str(key)])
                assert proc.returncode == 0, proc.stderr.decode(errors="replace")
            yield gpg
        finally:
            run(["gpgconf", "--homedir", tmp, "--kill", "all"])


@cache
def signer_fingerprint() -> str:
    """Fingerprint of the committed OpenPGP signing key."""
    proc = run(["gpg", "--batch", "--with-colons", "--show-keys", SIGNER_DIR / "pgp-public.asc"])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    rows = [r.split(":") for r in proc.stdout.decode().splitlines()]
    return next(r[9] for r in rows if r[0] == "fpr")


def _gpg_verify(signature: bytes, data: bytes | None) -> None:
    """``gpg --verify``: a good signature by the committed signer key, and nothing bad."""
    with tempfile.TemporaryDirectory() as tmp, gpg_home(SIGNER_DIR / "pgp-public.asc") as gpg:
        sig_path = Path(tmp, "sig")
        sig_path.write_bytes(signature)
        args = [*gpg, "--status-fd", "1", "--verify", str(sig_path)]
        if data is not None:
            Path(tmp, "data").write_bytes(data)
            args.append(str(Path(tmp, "data")))
        proc = run(args)
    status = [line.split() for line in proc.stdout.decode(errors="replace").splitlines()]
    words = [s[1] for s in status if len(s) > 1]
    detail = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"gpg --verify failed:\n{detail}"
    assert words.count("GOODSIG") == 1, f"not exactly one good signature:\n{detail}"
    bad = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NODATA"} & set(words)
    assert not bad, f"gpg reported {sorted(bad)}:\n{detail}"
    valid = [s for s in status if len(s) > 2 and s[1] == "VALIDSIG"]
    assert len(valid) == 1, f"no VALIDSIG:\n{detail}"
    assert valid[0][-1] == signer_fingerprint(), f"signed by another key:\n{detail}"


def verify_pgp_mime_signed(entity: bytes) -> None:
    """Verify an RFC 3156 multipart/signed entity (Content-* headers, blank line, body).

    Runs ``gpg --verify signature.asc first-part`` in a temporary home holding only the
    committed signer's public key. The signed data is the first part's bytes exactly as they
    stand, without canonicalising line endings, so any change to them fails.
    """
    headers = content_headers(entity)
    assert headers.get_content_type() == "multipart/signed", headers.get_content_type()
    protocol = str(headers.get_param("protocol", "")).lower()
    assert protocol == "application/pgp-signature", protocol
    boundary = headers.get_boundary()
    assert boundary, "multipart/signed without boundary"
    parts = multipart_parts(body_of(entity), boundary)
    assert len(parts) == 2, f"{len(parts)} parts in multipart/signed"
    sig_type = content_headers(parts[1]).get_content_type()
    assert sig_type == "application/pgp-signature", sig_type
    _gpg_verify(decoded_body(parts[1]), parts[0])


def verify_clearsigned(entity: bytes) -> None:
    """Verify an inline cleartext-signed text/plain entity with ``gpg --verify``.

    The body's Content-Transfer-Encoding is undone first; gpg then checks the cleartext
    signature (which by design ignores line-ending style and trailing whitespace).
    """
    content_type = content_headers(entity).get_content_type()
    assert content_type == "text/plain", content_type
    text = decoded_body(entity)
    assert b"-----BEGIN PGP SIGNED MESSAGE-----" in text, "no cleartext signature"
    _gpg_verify(text, None)


def _openssl_verify(args: Sequence[str | Path], data: bytes | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        signer_out = Path(tmp, "signer.pem")
        cert = SIGNER_DIR / "smime-cert.pem"
        proc = run(
            [
                *args, "-CAfile", cert, "-no-CApath", "-no-CAstore", "-purpose", "smimesign",
                "-signer", signer_out, "-out", Path(tmp, "content"),
            ],
            data,
        )  # fmt: skip
        detail = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, f"{' '.join(map(str, args[:3]))} failed:\n{detail}"
        assert _pem_body(signer_out.read_bytes()) == _pem_body(cert.read_bytes()), "other signer"


def _pem_body(pem: bytes) -> bytes:
    match = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S)
    assert match, "no certificate"
    return re.sub(rb"\s+", b"", match.group(1))


def verify_smime_signed(entity: bytes) -> None:
    """Verify an S/MIME signed entity: detached multipart/signed or opaque pkcs7-mime.

    Two checks, both with the committed certificate as the only trust anchor and the signer
    required to be that certificate: ``openssl smime -verify`` reading the entity with OpenSSL's
    own MIME parser, and ``openssl cms -verify -binary`` on the parts extracted here (for the
    detached form the first part's exact bytes, so a changed line ending fails).
    """
    headers = content_headers(entity)
    content_type = headers.get_content_type()
    _openssl_verify(["openssl", "smime", "-verify"], entity)
    if content_type == "multipart/signed":
        protocol = str(headers.get_param("protocol", "")).lower()
        assert protocol in {"application/pkcs7-signature", "application/x-pkcs7-signature"}
        boundary = headers.get_boundary()
        assert boundary, "multipart/signed without boundary"
        parts = multipart_parts(body_of(entity), boundary)
        assert len(parts) == 2, f"{len(parts)} parts in multipart/signed"
        with tempfile.TemporaryDirectory() as tmp:
            content = Path(tmp, "content.bin")
            content.write_bytes(parts[0])
            cms: list[str | Path] = ["openssl", "cms", "-verify", "-binary", "-inform", "DER"]
            cms += ["-content", content]
            _openssl_verify(cms, decoded_body(parts[1]))
    else:
        assert content_type in {"application/pkcs7-mime", "application/x-pkcs7-mime"}
        smime_type = str(headers.get_param("smime-type", "")).lower()
        assert smime_type == "signed-data", smime_type
        _openssl_verify(["openssl", "cms", "-verify", "-binary", "-inform", "DER"],
                        decoded_body(entity))  # fmt: skip
