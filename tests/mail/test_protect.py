"""Header protection lays out each copy from raw bytes: copies inside, only ``Content-Type``
extended, the body byte for byte, and the original entity wherever protecting is unsafe."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpgfilter.mail.protect import Layout, layout
from gpgfilter.mail.rawmessage import parse_content_type, split
from keystore.model import HEADER_PROTECTION_MODES, HeaderProtection
from tests.mail.test_rawmessage import messages

PLAIN = (
    b"Received: from x\r\n\tby y\r\nFrom: Carol <carol@example.test>\r\nTo: a@example.test,\r\n"
    b" b@example.test\r\nSubject: Lunch on Friday\r\nMessage-ID: <m@x>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\nThe body.\r\n"
)


def inner(result: Layout) -> bytes:
    return b"".join(result.inner)


def inner_fields(result: Layout) -> list[bytes]:
    return [f.raw for f in split(inner(result)).fields]


def test_off_is_the_original_entity() -> None:
    message = split(PLAIN)
    result = layout(message, "off")
    assert inner(result) == message.inner_entity()
    assert result.outer == PLAIN[: PLAIN.index(b"MIME-Version")]
    assert not result.protected


def test_copy_puts_the_fields_inside_and_changes_nothing_outside() -> None:
    result = layout(split(PLAIN), "copy")
    assert result.protected
    assert result.outer == PLAIN[: PLAIN.index(b"MIME-Version")]
    assert inner(result) == (
        b"From: Carol <carol@example.test>\r\nTo: a@example.test,\r\n b@example.test\r\n"
        b"Subject: Lunch on Friday\r\nMessage-ID: <m@x>\r\n"
        b"HP-Outer: From: Carol <carol@example.test>\r\n"
        b"HP-Outer: To: a@example.test,\r\n b@example.test\r\n"
        b"HP-Outer: Subject: Lunch on Friday\r\nHP-Outer: Message-ID: <m@x>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii;\r\n"
        b' hp="cipher"; protected-headers="v1"\r\n\r\nThe body.\r\n'
    )


def test_hide_subject_leaves_brackets_outside_and_a_legacy_display_line_inside() -> None:
    result = layout(split(PLAIN), "hide-subject")
    assert b"Subject: [...]\r\n" in result.outer
    assert b"Lunch" not in result.outer
    assert (
        result.outer.replace(b"Subject: [...]", b"Subject: Lunch on Friday")
        == PLAIN[: PLAIN.index(b"MIME-Version")]
    )
    text = inner(result)
    assert b"\r\nSubject: Lunch on Friday\r\n" in text
    assert b"HP-Outer: Subject: [...]\r\n" in text
    assert b'hp="cipher"; protected-headers="v1"; hp-legacy-display="1"\r\n' in text
    assert text.endswith(b"\r\n\r\nSubject: Lunch on Friday\r\n\r\nThe body.\r\n")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("already hp", PLAIN.replace(b"us-ascii", b'us-ascii; hp="clear"')),
        ("already v1", PLAIN.replace(b"us-ascii", b'us-ascii; protected-headers="v1"')),
        ("hp in 2231 form", PLAIN.replace(b"us-ascii", b"us-ascii; hp*=''cipher")),
        ("two content types", PLAIN.replace(b"\r\n\r\n", b"\r\nContent-Type: text/html\r\n\r\n")),
        ("open quote", PLAIN.replace(b"us-ascii", b'us-ascii; name="x')),
        ("open comment", PLAIN.replace(b"us-ascii", b"us-ascii (x")),
        ("trailing backslash", PLAIN.replace(b"us-ascii", b"us-ascii\\")),
        ("nothing to copy", b"Received: x\r\nContent-Type: text/plain\r\n\r\nbody"),
        ("no header at all", b"\r\nbody"),
        ("too long", PLAIN.replace(b"us-ascii", b"us-ascii; name=" + b"x" * 2100)),
    ],
)
@pytest.mark.parametrize("mode", ["copy", "hide-subject"])
def test_unsafe_to_extend_is_left_as_the_original(name: str, raw: bytes, mode: str) -> None:
    message = split(raw)
    result = layout(message, mode)  # type: ignore[arg-type]
    assert not result.protected, name
    assert inner(result) == message.inner_entity()
    assert result.outer == b"".join(f.terminated for f in message.outer_fields)


def test_an_open_boundary_quote_never_swallows_the_parameters() -> None:
    """Appended after ``boundary="b`` the parameters would become part of the boundary, and
    the parts of the message would no longer be found."""
    raw = (
        b'Subject: s\r\nContent-Type: multipart/mixed; boundary="b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n'
    )
    assert not layout(split(raw), "copy").protected


def test_bcc_trace_fields_and_outside_hp_outer_are_never_copied_inside() -> None:
    raw = (
        b"Return-Path: <s@x>\r\nBcc: secret@example.test\r\nResent-Bcc: other@example.test\r\n"
        b"HP-Outer: Subject: forged\r\n" + PLAIN
    )
    result = layout(split(raw), "hide-subject")
    text = inner(result)
    assert b"secret@example.test" not in text and b"other@example.test" not in text
    assert b"forged" not in text and b"Return-Path" not in text and b"by y" not in text
    assert text.count(b"HP-Outer:") == 4


def test_missing_content_type_is_spelled_out_with_the_parameters() -> None:
    raw = b"From: a@x\nSubject: hi\n\nbody\n"
    result = layout(split(raw), "hide-subject")
    assert inner(result) == (
        b"From: a@x\nSubject: hi\nHP-Outer: From: a@x\nHP-Outer: Subject: [...]\n"
        b'Content-Type: text/plain; charset=us-ascii; hp="cipher"; protected-headers="v1";'
        b' hp-legacy-display="1"\n\nSubject: hi\n\nbody\n'
    )
    assert result.outer == b"From: a@x\nSubject: [...]\n"


def test_trailing_semicolon_and_folding_are_kept() -> None:
    raw = b"Subject: s\r\nContent-Type: text/plain;\r\n\tcharset=utf-8;\r\n\r\nb"
    text = inner(layout(split(raw), "copy"))
    assert b'Content-Type: text/plain;\r\n\tcharset=utf-8;\r\n hp="cipher";' in text


@pytest.mark.parametrize(
    ("why", "raw"),
    [
        (
            "multipart",
            PLAIN.replace(b"text/plain; charset=us-ascii", b"multipart/mixed; boundary=b"),
        ),
        ("base64", PLAIN.replace(b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n\r\n")),
        ("clearsigned", PLAIN.replace(b"The body.", b"-----BEGIN PGP SIGNED MESSAGE-----")),
        ("dkim", b"DKIM-Signature: v=1; bh=x\r\n" + PLAIN),
        ("latin-1", PLAIN.replace(b"us-ascii", b"iso-8859-1")),
        ("utf-8 subject in 7bit", PLAIN.replace(b"Lunch", b"=?utf-8?q?M=C3=BCnchen?=")),
        ("two subjects", PLAIN.replace(b"Message-ID", b"Subject: b\r\nMessage-ID")),
        ("encoded control", PLAIN.replace(b"Lunch", b"=?utf-8?q?a=0Db?=")),
    ],
)
def test_no_legacy_display_where_it_could_break_something(why: str, raw: bytes) -> None:
    message = split(raw)
    result = layout(message, "hide-subject")
    assert result.protected, why
    assert b"hp-legacy-display" not in inner(result), why
    assert inner(result).endswith(b"\r\n\r\n" + message.body), why


def test_legacy_display_decodes_the_subject_for_utf8_8bit_text() -> None:
    raw = PLAIN.replace(b"Lunch", b"=?utf-8?q?M=C3=BCnchen?=").replace(
        b"us-ascii\r\n", b"utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    text = inner(layout(split(raw), "hide-subject"))
    assert text.endswith("\r\n\r\nSubject: München on Friday\r\n\r\nThe body.\r\n".encode())


_EXTRA = st.sampled_from(
    [b"Bcc: x@y\r\n", b"Received: a\r\n b\r\n", b"Subject: =?utf-8?b?w7w=?=\r\n",
     b"Content-Type: text/plain; charset=utf-8\r\n",
     b"Content-Type: multipart/mixed;\n boundary=q\n",
     b"HP-Outer: x\r\n", b"Content-Transfer-Encoding: 8bit\r\n", b"DKIM-Signature: v=1\r\n"]
)  # fmt: skip


@given(
    extra=st.lists(_EXTRA, max_size=4),
    raw=messages(),
    mode=st.sampled_from(HEADER_PROTECTION_MODES),
)
def test_layout_model(extra: list[bytes], raw: bytes, mode: HeaderProtection) -> None:
    """Whatever the message: the body bytes end the plaintext unchanged, every original
    ``Content-*`` line is there verbatim (``Content-Type`` only extended), the copies are the
    original fields, and outside only a Subject may change, to ``[...]``."""
    message = split(b"".join(extra) + raw)
    result = layout(message, mode)
    text = inner(result)
    original_outer = b"".join(f.terminated for f in message.outer_fields)
    if not result.protected:
        assert text == message.inner_entity()
        assert result.outer == original_outer
        return
    assert mode != "off"
    assert text.endswith(message.body)
    protected = split(text)
    body = protected.body
    legacy = b"hp-legacy-display" in text
    if legacy:
        assert mode == "hide-subject"
        assert body.startswith(b"Subject: ") and body.endswith(message.body)
    else:
        assert body == message.body
    for field in message.content_fields:
        if field.name == "content-type":
            assert field.terminated.rstrip(b"\r\n") in text
        else:
            assert field.terminated in text
    ctype = parse_content_type(protected.all("content-type")[-1].value)
    assert (ctype.params["hp"], ctype.params["protected-headers"]) == ("cipher", "v1")
    copied = [f for f in message.outer_fields if f.name not in ("bcc", "received", "hp-outer")]
    inside = [f.raw for f in protected.fields if not f.is_content and f.name != "hp-outer"]
    assert inside == [f.terminated for f in copied]
    assert len(protected.all("hp-outer")) == len(copied)
    if mode == "copy":
        assert result.outer == original_outer
    else:
        hidden = re.sub(rb"(?im)^(subject:)[^\n]*(?:\n[ \t][^\n]*)*", rb"\1 [...]", original_outer)
        assert re.sub(rb"\[\.\.\.\]\r?\n", b"[...]\n", result.outer) == re.sub(
            rb"\[\.\.\.\]\r?\n", b"[...]\n", hidden
        )
