"""Splitting must account for every input byte and never reinterpret one."""

from __future__ import annotations

from encodings.aliases import aliases

from hypothesis import example, given
from hypothesis import strategies as st

from gpgfilter.mail.rawmessage import (
    MAX_CONTENT_TYPE_CHARS,
    multipart_parts,
    parse_content_type,
    split,
)

header_name = st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z")
header_value = st.binary(max_size=40).filter(lambda b: b"\n" not in b)
eol = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from([b"Content-Type", b"MIME-Version", b"Subject", b"content-x"]))
        if draw(st.booleans()):
            name = draw(header_name)
        field = name + b":" + draw(header_value) + draw(eol)
        if draw(st.booleans()):
            field += b"\t" + draw(header_value) + draw(eol)
        fields.append(field)
    return b"".join(fields) + draw(st.sampled_from([b"", b"\r\n", b"\n"])) + draw(st.binary())


@given(st.binary())
@example(b"")
@example(b"Subject: x")
@example(b"\r\n\r\nbody")
@example(b" leading continuation\r\n\r\n")
def test_split_loses_no_byte(raw: bytes) -> None:
    message = split(raw)
    assert b"".join(f.raw for f in message.fields) + message.separator + message.body == raw


@given(messages())
def test_fields_move_verbatim(raw: bytes) -> None:
    message = split(raw)
    assert b"".join(f.raw for f in message.fields) + message.separator + message.body == raw
    inner = message.inner_entity()
    # Everything the ciphertext carries is original bytes, in their original order.
    for field in message.content_fields:
        assert field.raw in inner
    assert inner.endswith(message.body)
    outer = b"".join(f.raw for f in message.outer_fields)
    assert len(outer) + sum(len(f.raw) for f in message.content_fields) == sum(
        len(f.raw) for f in message.fields
    )


def test_split_recognises_fields_separator_and_body() -> None:
    raw = (
        b"Received: from x\r\n\tby y\r\nSubject: hi\r\nContent-Type: text/plain;\r\n"
        b' charset="utf-8"\r\nMIME-Version: 1.0\r\n\r\nbody\r\n'
    )
    message = split(raw)
    assert [f.name for f in message.fields] == [
        "received",
        "subject",
        "content-type",
        "mime-version",
    ]
    assert message.separator == b"\r\n"
    assert message.body == b"body\r\n"
    assert message.inner_entity() == (
        b'Content-Type: text/plain;\r\n charset="utf-8"\r\nMIME-Version: 1.0\r\n\r\nbody\r\n'
    )
    assert message.first("content-type") is not None
    assert message.first("content-type").value == 'text/plain; charset="utf-8"'  # type: ignore[union-attr]


def test_no_separator_means_body_starts_at_first_non_field_line() -> None:
    message = split(b"Subject: a\r\nnot a header line\r\nmore\r\n")
    assert message.separator == b""
    assert message.body == b"not a header line\r\nmore\r\n"
    assert message.inner_entity() == b"\r\nnot a header line\r\nmore\r\n"


def test_field_cut_off_by_end_of_input_is_terminated_inside() -> None:
    message = split(b"From: a@b\r\nContent-Type: text/plain")
    assert message.body == b""
    assert message.inner_entity() == b"Content-Type: text/plain\r\n\r\n"


def test_lone_cr_is_not_a_line_end() -> None:
    message = split(b"Subject: a\rContent-Type: x\r\n\r\nb")
    assert [f.name for f in message.fields] == ["subject"]


def test_content_type_parameters() -> None:
    ctype = parse_content_type(
        'Multipart/Encrypted; protocol="application/pgp-encrypted"; boundary="b 1"'
    )
    assert ctype.mimetype == "multipart/encrypted"
    assert ctype.params == {"protocol": "application/pgp-encrypted", "boundary": "b 1"}
    assert parse_content_type("text/plain; name*=utf-8''%C3%A4.txt").params["name"] == "ä.txt"


def test_multipart_parts() -> None:
    body = b"pre\r\n--b\r\nA\r\n--b\r\nB\r\n--bb\r\n--b--\r\nepi"
    cut = multipart_parts(body, "b")
    assert cut == (b"pre\r\n", [b"A", b"B\r\n--bb"], b"epi", True)
    assert multipart_parts(b"--b\r\nA\r\n", "b") == (b"", [b"A\r\n"], b"", False)
    assert multipart_parts(b"no delimiters", "b") is None


def test_inner_entity_agrees_with_the_independent_oracle_on_the_corpus() -> None:
    from tests.support.signatures import inner_entity, load_corpus

    for name, raw in load_corpus().items():
        assert split(raw).inner_entity() == inner_entity(raw), name


def test_overlong_content_type_is_read_for_its_type_only() -> None:
    """The ``email`` parameter splitter is quadratic in the semicolons inside quotes (an 80 KB
    value took 11 s, on the event loop): a value past the cap yields no parameters."""
    value = 'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"; x="'
    long_value = value + ";" * (MAX_CONTENT_TYPE_CHARS - len(value) + 1)
    parsed = parse_content_type(long_value)
    assert parsed.mimetype == "multipart/encrypted" and parsed.params == {}
    assert parse_content_type(value + '"').params["boundary"] == "b"


# Every codec name Python knows (some refuse the "replace" error handler), and any text.
charsets = st.sampled_from(sorted(set(aliases.values()))) | st.text(max_size=20)


@given(charsets, st.text(max_size=60))
def test_parse_content_type_never_raises(charset: str, value: str) -> None:
    """Whatever an RFC 2231 parameter names as its charset, the value is read or kept raw."""
    parse_content_type(f"text/plain; name*={charset}''{value}")
    parse_content_type(f"text/plain; name*0*={charset}''{value}; name*1={value}")
    parse_content_type(value)


sections = st.sampled_from(["name", "name*", "name*0", "name*0*", "name*1", "name*1*", "name*01"])


@given(st.lists(st.tuples(sections, st.text(max_size=12)), max_size=5))
def test_any_mix_of_rfc2231_sections_is_read(pairs: list[tuple[str, str]]) -> None:
    parse_content_type("text/plain" + "".join(f"; {name}={value}" for name, value in pairs))
