"""The corpus is what it claims to be, and the oracles in ``signatures.py`` are right."""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.signatures import (
    RECIPIENT_DIR,
    body_of,
    content_headers,
    decoded_body,
    gpg_home,
    header_units,
    inner_entity,
    kept_header_lines,
    load_corpus,
    multipart_parts,
    run,
    verify_clearsigned,
    verify_pgp_mime_signed,
    verify_smime_signed,
)

CORPUS = load_corpus()


def names(prefix: str) -> list[str]:
    """Corpus file names starting with ``prefix``."""
    return [n for n in CORPUS if n.startswith(prefix)]


REQUIRED = [
    "clear-plain-ascii",
    "clear-folded-headers",
    "clear-latin1-8bit-body",
    "clear-utf8-raw-headers",
    "clear-latin1-raw-header",
    "clear-bare-lf",
    "clear-mixed-crlf-lf",
    "clear-lone-cr",
    "clear-nul-bytes",
    "clear-long-line",
    "clear-multipart-mixed-attachment",
    "clear-multipart-missing-final-boundary",
    "clear-no-content-type",
    "clear-headers-only-eof",
    "clear-no-headers",
    "clear-duplicate-content-type",
    "clear-odd-case-header-names",
    "clear-mime-version-comment",
    "clear-long-header-line",
    "clear-qp-alternative",
    "clear-mbox-from-dot-lines",
    "clear-large-attachment",
    "signed-pgp-mime",
    "signed-pgp-clearsigned",
    "signed-smime-detached",
    "signed-smime-opaque",
    "encrypted-pgp-mime",
    "encrypted-pgp-inline",
    "encrypted-pgp-inline-qp",
    "encrypted-pgp-inline-blank-lines",
    "encrypted-smime-enveloped",
    "encrypted-smime-authenveloped",
    "encrypted-smime-x-pkcs7-mime",
    "fake-multipart-encrypted-plaintext",
    "fake-inline-armor-in-text",
    "fake-encrypted-attachment",
    "fake-forwarded-encrypted",
    "fake-smime-signed-labelled-enveloped",
    "fake-x-encrypted-header",
    "fake-multipart-encrypted-garbage",
    "fake-multipart-encrypted-pubkey",
]

VERIFIERS: dict[str, Callable[[bytes], None]] = {
    "signed-pgp-mime": verify_pgp_mime_signed,
    "signed-pgp-clearsigned": verify_clearsigned,
    "signed-smime": verify_smime_signed,
}


def verifier_for(name: str) -> Callable[[bytes], None]:
    """The verifier for a ``signed-*`` corpus file."""
    return next(v for prefix, v in VERIFIERS.items() if name.startswith(prefix))


# ---------------------------------------------------------------------------- helpers


def pgp_decrypt(armored: bytes) -> tuple[bytes, str]:
    """Decrypt with the committed recipient key: (plaintext, gpg status lines)."""
    with gpg_home(RECIPIENT_DIR / "pgp-secret.asc") as gpg:
        proc = run([*gpg, "--status-fd", "2", "--decrypt"], armored)
    status = "\n".join(
        line for line in proc.stderr.decode(errors="replace").splitlines() if "[GNUPG:]" in line
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout, status


def pgp_fails_to_decrypt(data: bytes) -> bool:
    """True when gpg with the recipient key cannot decrypt ``data``."""
    with gpg_home(RECIPIENT_DIR / "pgp-secret.asc") as gpg:
        return run([*gpg, "--decrypt"], data).returncode != 0


def cms_content_type(der: bytes) -> str:
    """The outer contentType of a DER CMS structure, as ``openssl cms -cmsout -print`` names it."""
    proc = run(["openssl", "cms", "-cmsout", "-print", "-noout", "-inform", "DER"], der)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    match = re.search(rb"contentType: (\S+)", proc.stdout)
    assert match
    return match.group(1).decode()


def smime_decrypt(der: bytes) -> bytes:
    """Decrypt a DER (Auth)EnvelopedData with the committed S/MIME recipient key."""
    proc = run(
        [
            "openssl", "cms", "-decrypt", "-binary", "-inform", "DER",
            "-recip", RECIPIENT_DIR / "smime-cert.pem", "-inkey", RECIPIENT_DIR / "smime-key.pem",
        ],
        der,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def parts_of(entity: bytes) -> list[bytes]:
    """The raw parts of a multipart entity."""
    boundary = content_headers(entity).get_boundary()
    assert boundary
    return multipart_parts(body_of(entity), boundary)


def tamper(name: str, entity: bytes) -> bytes:
    """Change one letter of the signed text (inside the DER for opaque S/MIME)."""
    if name == "signed-smime-opaque.eml":
        units, separator, body = header_units(entity)
        der = base64.b64decode(body)
        assert der.count(b"noon") == 1
        changed = base64.encodebytes(der.replace(b"noon", b"noOn")).replace(b"\n", b"\r\n")
        return b"".join(u for u, _ in units) + (separator or b"") + changed
    assert b"noon" in entity
    return entity.replace(b"noon", b"noOn", 1)


# ---------------------------------------------------------------------------- the corpus


def test_every_required_message_exists() -> None:
    missing = sorted(set(REQUIRED) - {n.removesuffix(".eml") for n in CORPUS})
    assert not missing


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_size_and_envelope_headers(name: str) -> None:
    raw = CORPUS[name]
    if name == "clear-large-attachment.eml":
        assert 900_000 < len(raw) < 1_200_000
    else:
        assert len(raw) < 20_000
    if name != "clear-no-headers.eml":
        kept = kept_header_lines(raw).lower()
        for field in (b"from:", b"to:", b"subject:", b"date:", b"message-id:"):
            assert re.search(rb"(?:\A|\n)" + field, kept), field


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


TRAITS: dict[str, Callable[[bytes], bool]] = {
    "clear-folded-headers.eml": lambda r: (
        b"\r\n\tcharset=" in inner_entity(r) and b"\r\n over two" in r
    ),
    "clear-latin1-8bit-body.eml": lambda r: b"\xfc" in body_of(r),
    "clear-utf8-raw-headers.eml": lambda r: "Gro\u00df".encode() in kept_header_lines(r),
    "clear-latin1-raw-header.eml": lambda r: (
        b"R\xfcckfrage" in kept_header_lines(r) and b"\xdcbersicht" in inner_entity(r)
    ),
    "clear-bare-lf.eml": lambda r: b"\r" not in r and r.count(b"\n\n") >= 2,
    "clear-mixed-crlf-lf.eml": lambda r: (
        b"\r\n" in r
        and re.search(rb"[^\r]\n", r) is not None
        and header_units(r)[1] == b"\r\n"
        and b"7bit\n\r\n" in r
    ),
    "clear-lone-cr.eml": lambda r: (
        re.search(rb"\r[^\n]", kept_header_lines(r)) is not None
        and re.search(rb"\r[^\n]", body_of(r)) is not None
        and b"\r\r\n" in r
        and r.endswith(b"\r")
    ),
    "clear-nul-bytes.eml": lambda r: b"\x00" in body_of(r),
    "clear-long-line.eml": lambda r: max(map(len, _lines(body_of(r)))) > 998,
    "clear-multipart-missing-final-boundary.eml": lambda r: (
        b"--=_b7\r\n" in r and b"--=_b7--" not in r
    ),
    "clear-no-content-type.eml": lambda r: not any(m for _, m in header_units(r)[0]),
    "clear-headers-only-eof.eml": lambda r: (
        header_units(r)[1] is None
        and inner_entity(r).endswith(b"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    ),
    "clear-no-headers.eml": lambda r: r.startswith(b"\r\n") and inner_entity(r) == r,
    "clear-duplicate-content-type.eml": lambda r: (
        inner_entity(r).count(b"Content-Type:") == 2 and b"X-Mailer" not in inner_entity(r)
    ),
    "clear-odd-case-header-names.eml": lambda r: (
        b"\r\ncontent-type:" in r
        and b"\r\nCONTENT-TRANSFER-ENCODING:" in r
        and inner_entity(r).startswith(b"mime-VERSION: 1.0\r\ncontent-type:")
    ),
    "clear-mime-version-comment.eml": lambda r: b"MIME-Version: 1.0 (" in inner_entity(r),
    "clear-long-header-line.eml": lambda r: (
        max(map(len, _lines(kept_header_lines(r)))) > 998
        and max(map(len, _lines(inner_entity(r)))) > 998
    ),
    "clear-qp-alternative.eml": lambda r: b"=3D" in r and b"=\r\n" in r and b"=20" in r,
    "clear-mbox-from-dot-lines.eml": lambda r: (
        b"\r\nFrom alice@" in body_of(r) and b"\r\n.\r\n" in body_of(r)
    ),
    "clear-multipart-mixed-attachment.eml": lambda r: len(parts_of(inner_entity(r))) == 2,
    "clear-invalid-utf8-body.eml": lambda r: b"\xc0\xaf" in body_of(r),
}


@pytest.mark.parametrize("name", sorted(TRAITS))
def test_clear_message_has_its_trait(name: str) -> None:
    """Guards against an editor or git quietly "fixing" the bytes of a file."""
    assert TRAITS[name](CORPUS[name])


def test_latin1_and_invalid_utf8_are_not_utf8() -> None:
    for name in ("clear-latin1-8bit-body.eml", "clear-invalid-utf8-body.eml"):
        with pytest.raises(UnicodeDecodeError):
            body_of(CORPUS[name]).decode("utf-8")


# ---------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("name", names("signed-"))
def test_signed_message_verifies_from_its_inner_entity(name: str) -> None:
    verifier_for(name)(inner_entity(CORPUS[name]))


@pytest.mark.parametrize("name", names("signed-"))
def test_verifier_rejects_a_changed_letter(name: str) -> None:
    with pytest.raises(AssertionError):
        verifier_for(name)(tamper(name, inner_entity(CORPUS[name])))


@pytest.mark.parametrize(
    "name", ["signed-pgp-mime.eml", "signed-pgp-mime-multipart.eml", "signed-smime-detached.eml"]
)
def test_verifier_rejects_changed_line_endings(name: str) -> None:
    entity = inner_entity(CORPUS[name])
    with pytest.raises(AssertionError):
        verifier_for(name)(entity.replace(b"\r\n", b"\n"))


def test_verifier_rejects_an_unsigned_entity() -> None:
    entity = inner_entity(CORPUS["signed-pgp-mime.eml"])
    first = parts_of(entity)[0]
    with pytest.raises(AssertionError):
        verify_pgp_mime_signed(entity.replace(first, first.replace(b"noon", b"night")))
    with pytest.raises(AssertionError):
        verify_clearsigned(inner_entity(CORPUS["clear-plain-ascii.eml"]))
    with pytest.raises(AssertionError):
        verify_smime_signed(inner_entity(CORPUS["fake-smime-signed-labelled-enveloped.eml"]))


# ---------------------------------------------------------------------------- encrypted-*


@pytest.mark.parametrize("name", names("encrypted-pgp-"))
def test_encrypted_pgp_decrypts_with_recipient_key(name: str) -> None:
    entity = inner_entity(CORPUS[name])
    if name == "encrypted-pgp-mime.eml":
        assert content_headers(entity).get_content_type() == "multipart/encrypted"
        control, payload = parts_of(entity)
        assert body_of(control).strip() == b"Version: 1"
        plaintext, status = pgp_decrypt(body_of(payload))
        assert plaintext.startswith(b"Content-Type: text/plain")
    else:
        text = decoded_body(entity)
        stripped = text.strip()
        assert stripped.startswith(b"-----BEGIN PGP MESSAGE-----")
        assert stripped.endswith(b"-----END PGP MESSAGE-----")
        assert stripped.count(b"-----BEGIN") == 1
        if name == "encrypted-pgp-inline-blank-lines.eml":
            assert text.startswith(b"\r\n\r\n") and text.endswith(b"\r\n\r\n")
        if name == "encrypted-pgp-inline-qp.eml":
            assert b"=3D" in body_of(entity)
        plaintext, status = pgp_decrypt(text)
        assert plaintext == b"Meet me at noon by the fountain.\n"
    assert "DECRYPTION_OKAY" in status


@pytest.mark.parametrize("name", names("encrypted-smime-"))
def test_encrypted_smime_decrypts_with_openssl(name: str) -> None:
    entity = inner_entity(CORPUS[name])
    headers = content_headers(entity)
    smime_type = str(headers.get_param("smime-type"))
    der = decoded_body(entity)
    expected = {"enveloped-data": "pkcs7-envelopedData", "authEnveloped-data": "id-smime-ct-"}
    assert cms_content_type(der).startswith(expected[smime_type])
    if name == "encrypted-smime-authenveloped.eml":
        assert cms_content_type(der) == "id-smime-ct-authEnvelopedData"
    spelling = "application/x-pkcs7-mime" if "x-pkcs7" in name else "application/pkcs7-mime"
    assert headers.get_content_type() == spelling
    assert smime_decrypt(der).startswith(b"Content-Type: text/plain")


# ---------------------------------------------------------------------------- fake-*


def test_fake_multipart_encrypted_holds_no_openpgp_message() -> None:
    plain = parts_of(inner_entity(CORPUS["fake-multipart-encrypted-plaintext.eml"]))[1]
    assert b"-----BEGIN PGP" not in plain
    garbage = body_of(parts_of(inner_entity(CORPUS["fake-multipart-encrypted-garbage.eml"]))[1])
    assert garbage.startswith(b"-----BEGIN PGP MESSAGE-----")
    assert pgp_fails_to_decrypt(garbage)
    key = body_of(parts_of(inner_entity(CORPUS["fake-multipart-encrypted-pubkey.eml"]))[1])
    assert key.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert pgp_fails_to_decrypt(key)


def test_fake_messages_carry_real_ciphertext_beside_clear_text() -> None:
    text = body_of(CORPUS["fake-inline-armor-in-text.eml"])
    assert pgp_decrypt(text)[0] == b"blob\n"
    assert b"in clear: the meeting is at noon" in text.split(b"-----END PGP MESSAGE-----")[1]

    clear, pgp, asc = parts_of(inner_entity(CORPUS["fake-encrypted-attachment.eml"]))
    assert b"we are over budget" in clear
    assert pgp_decrypt(decoded_body(pgp))[0].startswith(b"%PDF")
    assert pgp_decrypt(body_of(asc))[0] == b"notes\n"

    note, forwarded = parts_of(inner_entity(CORPUS["fake-forwarded-encrypted.eml"]))
    assert b"Carol sent me this" in note
    assert content_headers(forwarded).get_content_type() == "message/rfc822"
    inner_message = body_of(forwarded)
    assert content_headers(inner_message).get_content_type() == "multipart/encrypted"
    assert pgp_decrypt(body_of(parts_of(inner_entity(inner_message))[1]))[0].startswith(b"Content-")


def test_fake_smime_label_hides_signed_data() -> None:
    entity = inner_entity(CORPUS["fake-smime-signed-labelled-enveloped.eml"])
    assert content_headers(entity).get_param("smime-type") == "enveloped-data"
    assert cms_content_type(decoded_body(entity)) == "pkcs7-signedData"


def test_fake_marker_header_on_plaintext() -> None:
    raw = CORPUS["fake-x-encrypted-header.eml"]
    assert b"\r\nX-Encrypted: yes\r\n" in kept_header_lines(raw)
    assert b"does not make this encrypted" in body_of(raw)


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            b"From: a\r\nContent-Type: text/plain\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            b"\r\nbody\r\n",
            b"Content-Type: text/plain\r\nMIME-Version: 1.0\r\n\r\nbody\r\n",
            id="basic",
        ),
        pytest.param(
            b"Subject: a\r\n b\r\nContent-Type: multipart/mixed;\r\n\tboundary=x\r\nTo: t\r\n"
            b"\r\n--x\r\n\r\nContent-Type: inner\r\n",
            b"Content-Type: multipart/mixed;\r\n\tboundary=x\r\n"
            b"\r\n--x\r\n\r\nContent-Type: inner\r\n",
            id="folded",
        ),
        pytest.param(
            b"Content-Type: a\nX: b\n\nbody\n\nmore", b"Content-Type: a\n\nbody\n\nmore", id="lf"
        ),
        pytest.param(
            b"X: 1\nContent-Type: a\n\r\nbody", b"Content-Type: a\n\r\nbody", id="lf-crlf"
        ),
        pytest.param(b"Content-Type: a\r\n\nbody", b"Content-Type: a\r\n\nbody", id="crlf-lf"),
        pytest.param(b"From: a\r\nContent-Type: a\r\n", b"Content-Type: a\r\n\r\n", id="no-blank"),
        pytest.param(b"Content-Type: a", b"Content-Type: a\r\n", id="no-blank-no-eol"),
        pytest.param(b"\r\nContent-Type: x\r\n", b"\r\nContent-Type: x\r\n", id="no-headers"),
        pytest.param(b"", b"\r\n", id="empty"),
        pytest.param(
            b"content-TYPE: a\r\nX-Content-Type: b\r\nContent-Type : c\r\nMIME-Version-X: d\r\n"
            b"mime-version: 1.0\r\nContent-ID: <i>\r\nContentious: e\r\n\r\n",
            b"content-TYPE: a\r\nmime-version: 1.0\r\nContent-ID: <i>\r\n\r\n",
            id="names",
        ),
        pytest.param(
            b"Subject: x\rContent-Type: y\r\nContent-Type: z\r\n\r\n",
            b"Content-Type: z\r\n\r\n",
            id="lone-cr-is-no-line-break",
        ),
        pytest.param(
            b" Content-Type: x\r\nContent-Type: y\r\n\r\nb",
            b"Content-Type: y\r\n\r\nb",
            id="leading-continuation",
        ),
        pytest.param(b"garbage\r\n\tContent-Type: x\r\n\r\n", b"\r\n", id="continued-garbage"),
        pytest.param(
            b"Content-Type: a\r\n \r\nX: y\r\n\r\nb",
            b"Content-Type: a\r\n \r\n\r\nb",
            id="whitespace-line-is-not-empty",
        ),
        pytest.param(
            b"X: a\r\n\r\r\nContent-Type: b\r\n",
            b"Content-Type: b\r\n\r\n",
            id="cr-cr-lf-is-not-empty",
        ),
        pytest.param(
            b"Content-Type: \xff\x00\r\n\r\n\x00\xff",
            b"Content-Type: \xff\x00\r\n\r\n\x00\xff",
            id="binary",
        ),
    ],
)
def test_inner_entity_examples(raw: bytes, expected: bytes) -> None:
    assert inner_entity(raw) == expected


def test_inner_entity_on_corpus_examples() -> None:
    raw = CORPUS["clear-no-content-type.eml"]
    assert inner_entity(raw) == raw[raw.index(b"\r\n\r\n") + 2 :]
    raw = CORPUS["clear-duplicate-content-type.eml"]
    assert inner_entity(raw).startswith(
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    )


_EOL = st.sampled_from([b"\r\n", b"\n"])
_VALUE = st.binary(max_size=24).map(lambda b: b.replace(b"\n", b""))
_MOVED_NAMES = [b"Content-Type", b"content-transfer-encoding", b"MIME-Version", b"CONTENT-ID",
                b"Content-Disposition", b"mime-version", b"Content-X"]  # fmt: skip
_KEPT_NAMES = [b"From", b"Subject", b"X-Content-Type", b"MIME-Versions", b"Contentious",
               b"Received", b"DKIM-Signature", b"Content", b"ARC-Seal"]  # fmt: skip


@st.composite
def _field(draw: st.DrawFn) -> tuple[bytes, bool]:
    moved = draw(st.booleans())
    name = draw(st.sampled_from(_MOVED_NAMES if moved else _KEPT_NAMES))
    text = name + b":" + draw(_VALUE) + draw(_EOL)
    for _ in range(draw(st.integers(0, 2))):
        text += draw(st.sampled_from([b" ", b"\t"])) + draw(_VALUE) + draw(_EOL)
    return text, moved


@given(
    fields=st.lists(_field(), max_size=8),
    separator=st.sampled_from([b"\r\n", b"\n", None]),
    body=st.binary(max_size=200),
    cut_last_eol=st.booleans(),
)
def test_inner_entity_model(
    fields: list[tuple[bytes, bool]], separator: bytes | None, body: bytes, cut_last_eol: bool
) -> None:
    """Messages built from known fields: moved fields, in order, then separator and body."""
    if separator is None:
        body = b""
        if cut_last_eol and fields:
            text, moved = fields[-1]
            fields[-1] = (text.removesuffix(b"\n").removesuffix(b"\r"), moved)
    raw = b"".join(text for text, _ in fields) + (separator or b"") + body
    inner = inner_entity(raw)
    kept = kept_header_lines(raw)
    assert inner == (
        b"".join(t for t, m in fields if m) + (b"\r\n" if separator is None else separator) + body
    )
    assert kept == b"".join(t for t, m in fields if not m)
    added = Counter(b"\r\n" if separator is None else b"")
    assert Counter(kept) + Counter(inner) == Counter(raw) + added


_PIECES = st.sampled_from(
    [b"Content-Type: x", b"content-id:", b"MIME-Version: 1", b"From: a", b"Content-Type : y",
     b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\xff", b"x"]
)  # fmt: skip


@given(st.lists(st.one_of(_PIECES, st.binary(max_size=4)), max_size=40).map(b"".join))
def test_inner_entity_keeps_every_byte_once(raw: bytes) -> None:
    """Arbitrary bytes: kept lines + inner entity hold every byte of ``raw`` exactly once."""
    units, separator, body = header_units(raw)
    assert b"".join(u for u, _ in units) + (separator or b"") + body == raw
    inner = inner_entity(raw)
    assert inner == b"".join(u for u, m in units if m) + (separator or b"\r\n") + body
    assert inner.endswith(body) and raw.endswith(body)
    added = Counter(b"\r\n" if separator is None else b"")
    assert Counter(kept_header_lines(raw)) + Counter(inner) == Counter(raw) + added
    for unit, moved in units:
        assert moved == bool(re.match(rb"(?i)(content-[\x21-\x39\x3b-\x7e]*|mime-version):", unit))


def test_multipart_parts_follows_rfc2046() -> None:
    body = b"preamble\r\n--b\r\none\r\n\r\n--b \r\ntwo\r\n--bx\r\n--b--\r\nepilogue"
    assert multipart_parts(body, "b") == [b"one\r\n", b"two\r\n--bx"]
    with pytest.raises(AssertionError):
        multipart_parts(b"--b\r\nno end\r\n", "b")


def test_corpus_dir_holds_key_material() -> None:
    here = Path(__file__).resolve().parents[1] / "corpus"
    for sub in ("signer", "recipient"):
        for key in ("pgp-public.asc", "pgp-secret.asc", "smime-cert.pem", "smime-key.pem"):
            assert (here / sub / key).stat().st_size > 0
