"""Already encrypted or not: decided by structure, both ways, on real messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpgfilter.mail.classify import Verdict, classify
from gpgfilter.mail.rawmessage import split

CORPUS = Path(__file__).parents[1] / "corpus"
MESSAGES = sorted(CORPUS.glob("*.eml"))


def test_corpus_has_every_category() -> None:
    prefixes = {p.name.split("-")[0] for p in MESSAGES}
    assert {"clear", "signed", "encrypted", "fake"} <= prefixes


@pytest.mark.parametrize("path", MESSAGES, ids=[p.stem for p in MESSAGES])
def test_corpus_verdicts(path: Path) -> None:
    verdict = classify(split(path.read_bytes()))
    if path.name.startswith("encrypted-"):
        assert verdict.already_encrypted, f"{path.name} is encrypted and must pass untouched"
    else:
        assert verdict is Verdict.CLEAR, f"{path.name} is readable and must be encrypted"


def test_expected_kinds() -> None:
    def kind(name: str) -> Verdict:
        return classify(split((CORPUS / name).read_bytes()))

    assert kind("encrypted-pgp-mime.eml") is Verdict.PGP_MIME
    assert kind("encrypted-pgp-inline.eml") is Verdict.INLINE_PGP
    assert kind("encrypted-smime-enveloped.eml") is Verdict.SMIME


def _pgp_mime(second_part: bytes, protocol: bytes = b"application/pgp-encrypted") -> bytes:
    return (
        b'Subject: x\r\nContent-Type: multipart/encrypted; protocol="'
        + protocol
        + b'"; boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
        b"Version: 1\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        + second_part
        + b"\r\n--b--\r\n"
    )


def _armored_real_message() -> bytes:
    body = split((CORPUS / "encrypted-pgp-mime.eml").read_bytes()).body
    start = body.index(b"-----BEGIN PGP MESSAGE-----")
    end = body.index(b"-----END PGP MESSAGE-----") + len(b"-----END PGP MESSAGE-----")
    return body[start:end]


def test_pgp_mime_structure_is_required() -> None:
    real = _armored_real_message()
    assert classify(split(_pgp_mime(real))) is Verdict.PGP_MIME
    # Wrong protocol parameter, plaintext second part, or text smuggled around the armor.
    assert classify(split(_pgp_mime(real, b"application/pgp-signature"))) is Verdict.CLEAR
    assert classify(split(_pgp_mime(b"Dear Bob, the secret plan"))) is Verdict.CLEAR
    assert classify(split(_pgp_mime(b"secret plan\r\n" + real))) is Verdict.CLEAR
    assert classify(split(_pgp_mime(real + b"\r\nP.S. the secret plan"))) is Verdict.CLEAR
    # Text smuggled into the control part beside its version line.
    smuggled = _pgp_mime(real).replace(b"Version: 1\r\n", b"Version: 1\r\nthe secret plan\r\n")
    assert classify(split(smuggled)) is Verdict.CLEAR
    # A public key block is armored OpenPGP, but not an encrypted message.
    key = real.replace(b"PGP MESSAGE", b"PGP PUBLIC KEY BLOCK")
    assert classify(split(_pgp_mime(key))) is Verdict.CLEAR


def test_inline_pgp_must_be_the_whole_text() -> None:
    real = _armored_real_message()
    assert classify(split(b"Subject: x\r\n\r\n\r\n" + real + b"\r\n\r\n")) is Verdict.INLINE_PGP
    assert classify(split(b"Subject: x\r\n\r\nHi!\r\n" + real)) is Verdict.CLEAR
    html = b"Content-Type: text/html\r\n\r\n" + real
    assert classify(split(html)) is Verdict.CLEAR


def test_marker_headers_prove_nothing() -> None:
    raw = b"X-Gpgfilter-Encrypted: yes\r\nX-PGP-Encrypted: true\r\n\r\nclear text\r\n"
    assert classify(split(raw)) is Verdict.CLEAR


@given(st.binary(max_size=2000))
def test_never_raises(raw: bytes) -> None:
    classify(split(raw))


@given(st.binary(max_size=600))
def test_never_raises_on_pgp_mime_shaped_input(junk: bytes) -> None:
    classify(split(_pgp_mime(b"-----BEGIN PGP MESSAGE-----\r\n\r\n" + junk)))
    classify(
        split(
            b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n" + junk
        )
    )


# RFC 2231 parameters whose charset Python cannot decode with: a NUL in the name, codecs that
# refuse the "replace" error handler. Each once made classify raise, and the filter then
# deferred the message on every retry until Postfix bounced it (found by tests/fuzz).
UNDECODABLE_CHARSETS = [
    b"Content-Type: text/plain; name*=utf\x00''%C3%A9\r\n",
    b"Content-Type: text/plain; name*=idna''%ff\r\n",
    b"Content-Type: text/plain; name*=punycode''%ff%00\r\n",
    b"Content-Type: text/plain; name*0*=utf\x00''%C3%A9; name*1=x\r\n",
    # A plain and a numbered section of one parameter: the email package cannot sort them.
    b"Content-Type: text/plain; name*=a; name*0=b\r\n",
]


@pytest.mark.parametrize("header", UNDECODABLE_CHARSETS)
def test_undecodable_parameter_charset_is_clear_text(header: bytes) -> None:
    assert classify(split(b"Subject: x\r\n" + header + b"\r\nhello\r\n")) is Verdict.CLEAR
    wrapped = _pgp_mime(_armored_real_message()).replace(
        b"Content-Type: application/octet-stream\r\n", header.replace(b"text/plain", b"x/y")
    )
    assert classify(split(wrapped)) is Verdict.CLEAR
