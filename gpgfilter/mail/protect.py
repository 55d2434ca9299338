"""Header protection (RFC 9788): copying the header fields inside the encryption, and hiding the
Subject outside.

Without it the encrypted part is the original MIME entity and the Subject sits on the server in
clear. With it, the root part of what gets encrypted also carries copies of the message's header
fields, so a client that reads RFC 9788 (``hp="cipher"``) or the older ``protected-headers="v1"``
(Thunderbird, K-9) shows them from inside; with ``hide-subject`` the outer Subject becomes
``[...]`` (the RFC's ``hcp_baseline``).

Fidelity rules (the same as for the original entity, docs/design.md):

- the copied fields are the raw bytes as received, folded as received;
- the original ``Content-*`` and ``MIME-Version`` lines are kept verbatim, in their order, with
  one change: ``Content-Type`` gets ``hp="cipher"; protected-headers="v1"`` appended as a new
  folded line just before the field's own line ending, so that nothing it already said is
  rewritten (a message without ``Content-Type`` gets the default ``text/plain;
  charset=us-ascii`` spelled out, with those parameters);
- the body stays byte for byte, except that a *legacy display element* (the hidden Subject as a
  first line, for clients that know neither form) is put in front of the body of a plain,
  unsigned ``text/plain`` message whose encoding lets it be added without re-encoding anything.
  Never in a multipart (a signed part, or a part in front of one, could be affected) and never
  where the body holds an OpenPGP armor block (inline-signed text would show as only partly
  signed), nor when a DKIM signature covers the body.

Whenever any of that cannot be done safely (two ``Content-Type`` fields, a value whose quoting
is broken, a value that already carries ``hp``, nothing to copy), the message is encrypted as
the original entity, exactly as with ``off``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header

from gpgfilter.mail.rawmessage import (
    CRLF,
    MAX_CONTENT_TYPE_CHARS,
    HeaderField,
    RawMessage,
    join_fields,
    parse_content_type,
)
from keystore.model import HeaderProtection

HIDDEN_SUBJECT = b"[...]"
HP_PARAMETERS = b'hp="cipher"; protected-headers="v1"'
LEGACY_DISPLAY_PARAMETER = b'hp-legacy-display="1"'
# Never copied inside: Bcc must not reach the other recipients' copies (and each copy goes to
# one recipient, who learns nothing from it either); trace fields describe the transport, not
# the message; an HP-Outer from outside is a claim by the sender about a header we write.
NEVER_INSIDE = frozenset({"bcc", "resent-bcc", "received", "return-path", "hp-outer"})
_HP_PARAMETER = re.compile(rb"(?i)(?:^|[;\s])(?:hp|protected-headers)\*?[0-9]*\*?\s*=")
_DKIM = frozenset({"dkim-signature", "arc-message-signature"})
_ARMOR = b"-----BEGIN PGP "
_PLAIN_ENCODINGS = frozenset({"7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class Layout:
    """What one copy is made of: the plaintext to encrypt (pieces, the body not copied) and
    the header fields that stay outside."""

    inner: tuple[bytes, memoryview]
    outer: bytes
    protected: bool  # False: the original entity, as with "off"


def original(message: RawMessage) -> Layout:
    """Today's layout: the original entity inside, every other field outside verbatim."""
    return Layout(message.inner_parts(), join_fields(message.outer_fields), False)


def layout(message: RawMessage, mode: HeaderProtection) -> Layout:
    """The copy for ``mode``; falls back to :func:`original` wherever protecting is unsafe."""
    if mode == "off":
        return original(message)
    copied = [f for f in message.outer_fields if f.name not in NEVER_INSIDE]
    types = message.all("content-type")
    if not copied or len(types) > 1:
        return original(message)
    if types and (_HP_PARAMETER.search(types[0].raw[types[0].raw.index(b":") + 1 :])):
        return original(message)  # already protected by its sender: left as it is
    hide = mode == "hide-subject"
    outer = [_hidden(f) if hide and f.name == "subject" else f for f in message.outer_fields]
    hidden = [f for f in copied if hide and f.name == "subject"]
    legacy = _legacy_display(message, hidden)
    parameters = HP_PARAMETERS + (b"; " + LEGACY_DISPLAY_PARAMETER if legacy else b"")
    content: list[bytes] = []
    for field in message.content_fields:
        if field.name != "content-type":
            content.append(field.terminated)
            continue
        extended = _with_parameters(field, parameters)
        if extended is None:
            return original(message)
        content.append(extended)
    if not types:
        eol = _eol(message.separator)
        content.append(b"Content-Type: text/plain; charset=us-ascii; " + parameters + eol)
    kept_outside = {id(f) for f in copied}
    head = b"".join(
        (
            join_fields(copied),
            # RFC 9788: what a client would have seen outside, for each field it sees inside.
            b"".join(
                b"HP-Outer: " + o.terminated
                for o, f in zip(outer, message.outer_fields, strict=True)
                if id(f) in kept_outside
            ),
            b"".join(content),
            message.separator or CRLF,
            legacy or b"",
        )
    )
    return Layout((head, message.body_view), join_fields(outer), True)


def _eol(sample: bytes) -> bytes:
    return b"\n" if sample.endswith(b"\n") and not sample.endswith(CRLF) else CRLF


def _hidden(field: HeaderField) -> HeaderField:
    """The field's name as it was spelled, with ``[...]`` for a value."""
    name = field.raw[: field.raw.index(b":") + 1]
    return HeaderField(name + b" " + HIDDEN_SUBJECT + _eol(field.raw))


def _with_parameters(field: HeaderField, parameters: bytes) -> bytes | None:
    """``field`` with ``parameters`` appended on a new folded line before its line ending;
    None when the value is one we cannot extend without changing what it already says."""
    raw = field.terminated
    eol = _eol(raw)
    value = raw[raw.index(b":") + 1 : -len(eol)]
    if len(value) > MAX_CONTENT_TYPE_CHARS or not _balanced(value):
        return None
    joiner = b"" if value.rstrip().endswith(b";") else b";"
    extended = raw[: -len(eol)] + joiner + eol + b" " + parameters + eol
    # The parameters must be read as added, and everything that was there read as before.
    before = parse_content_type(field.value)
    after = parse_content_type(HeaderField(extended).value)
    added = {k: v for k, v in before.params.items() if k}  # a trailing ";" reads as ""
    for pair in parameters.decode("ascii").split("; "):
        key, _, quoted = pair.partition("=")
        added[key] = quoted.strip('"')
    if (after.mimetype, after.params) != (before.mimetype, added):
        return None
    return extended


def _balanced(value: bytes) -> bool:
    """True when every quoted string and comment in ``value`` is closed: a parameter appended
    after an open one would become part of it (an open ``boundary="x`` would take it in)."""
    quoted = False
    depth = 0
    escaped = False
    for byte in value:
        if escaped:
            escaped = False
        elif byte == 0x5C:  # backslash
            escaped = True
        elif quoted:
            quoted = byte != 0x22
        elif byte == 0x22:
            quoted = True
        elif byte == 0x28:
            depth += 1
        elif byte == 0x29:
            depth -= 1
            if depth < 0:
                return False
    return not quoted and depth == 0 and not escaped


def _legacy_display(message: RawMessage, hidden: list[HeaderField]) -> bytes | None:
    """The lines to put in front of the body for the hidden Subject, where that is safe."""
    if len(hidden) != 1 or any(f.name in _DKIM for f in message.fields):
        return None
    ctype = (
        parse_content_type(message.all("content-type")[0].value)
        if message.all("content-type")
        else None
    )
    if ctype is not None and ctype.mimetype != "text/plain":
        return None
    charset = (ctype.params.get("charset", "us-ascii") if ctype else "us-ascii").lower()
    encodings = message.all("content-transfer-encoding")
    if len(encodings) > 1:
        return None
    encoding = encodings[0].value.strip().lower() if encodings else "7bit"
    if encoding not in _PLAIN_ENCODINGS or charset not in ("us-ascii", "utf-8"):
        return None
    if message.raw.find(_ARMOR, message.body_start) >= 0:
        return None
    text = _readable(hidden[0])
    if text is None:
        return None
    line = ("Subject: " + text).encode("utf-8")
    if not line.isascii() and (charset != "utf-8" or encoding == "7bit"):
        return None
    eol = _eol(message.separator)
    return line + eol + eol


def _readable(field: HeaderField) -> str | None:
    """The Subject as a reader sees it (RFC 2047 words decoded); None when it cannot be shown
    on one line of text."""
    colon = field.raw.index(b":")
    unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", field.raw[colon + 1 :]).strip()
    try:
        raw = unfolded.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        text = str(make_header(decode_header(raw))) if raw.isascii() else raw
    except (HeaderParseError, LookupError, UnicodeDecodeError, ValueError):
        return None
    text = text.strip()
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    return text
