"""The anatomy of a message as raw bytes: header fields, separator, body.

Python's ``email`` package re-serialises what it parses, which changes bytes (refolding, line
endings, "repaired" boundaries) and so breaks signatures. This module only *cuts* the message:
every byte of the input lands in exactly one field, the separator or the body, so the pieces can
be moved around verbatim.

Definitions (the contract the rest of the filter and the tests rely on):

- A line ends after LF (``\\n``); a CR not followed by LF is an ordinary byte inside a line.
- A header field starts with a line ``name:`` (``name`` is printable ASCII without space or
  colon; optional blanks may stand before the colon) and takes every following continuation
  line, one that starts with a space or a tab.
- The header block is the longest run of header fields at the start of the message.
- If the line after it is empty (``\\r\\n`` or ``\\n``), that line is the separator and the body
  is everything after it. Otherwise there is no separator and the body starts right there
  (a malformed message: its first non-header line is body text).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value

_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
CRLF = b"\r\n"
# A longer Content-Type value is read for its type only. The ``email`` parameter splitter is
# quadratic in the semicolons inside a quoted string (an 80 KB value took 11 s, on the event
# loop); at this length it takes milliseconds, and real values (type, boundary, protocol,
# charset, a file name) stay far below it.
MAX_CONTENT_TYPE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field exactly as it stood, continuation lines and line endings included."""

    raw: bytes

    @property
    def name(self) -> str:
        """The field name, lower-cased: field names are case-insensitive (RFC 5322)."""
        colon = self.raw.index(b":")
        return self.raw[:colon].rstrip(b" \t").decode("ascii").lower()

    @property
    def value(self) -> str:
        """The unfolded value, decoded as latin-1 so that no byte is lost or refused."""
        colon = self.raw.index(b":")
        return _FOLD.sub(b"", self.raw[colon + 1 :]).strip().decode("latin-1")

    @property
    def is_content(self) -> bool:
        """True for the fields that describe the body and so travel inside the ciphertext."""
        name = self.name
        return name.startswith("content-") or name == "mime-version"

    @property
    def terminated(self) -> bytes:
        """The field with a line ending, adding CRLF only where the input ended mid-field."""
        return self.raw if self.raw.endswith(b"\n") else self.raw + CRLF


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message cut into header fields, separator and body; nothing is copied: the body is
    a range of ``raw``, so a 20 MB message is not held twice just to be looked at."""

    fields: tuple[HeaderField, ...]
    separator: bytes
    raw: bytes
    body_start: int

    @property
    def body(self) -> bytes:
        """The body bytes (a copy: prefer :attr:`body_view` for large messages)."""
        return self.raw[self.body_start :]

    @property
    def body_view(self) -> memoryview:
        return memoryview(self.raw)[self.body_start :]

    def first(self, name: str) -> HeaderField | None:
        """The first field called ``name`` (lower-case), if any."""
        return next((f for f in self.fields if f.name == name), None)

    def all(self, name: str) -> list[HeaderField]:
        return [f for f in self.fields if f.name == name]

    @property
    def content_fields(self) -> tuple[HeaderField, ...]:
        return tuple(f for f in self.fields if f.is_content)

    @property
    def outer_fields(self) -> tuple[HeaderField, ...]:
        return tuple(f for f in self.fields if not f.is_content)

    def inner_parts(self) -> tuple[bytes, memoryview]:
        """The MIME entity that gets encrypted, in two pieces (no copy of the body):
        ``Content-*`` and ``MIME-Version`` fields verbatim, in their order, then the separator,
        then the body exactly as received.

        A message without a separator gets a CRLF one, so that the entity stays well-formed; a
        field cut off by the end of input gets the line ending it lacked.
        """
        head = b"".join(f.terminated for f in self.content_fields)
        return head + (self.separator or CRLF), self.body_view

    def inner_entity(self) -> bytes:
        """:meth:`inner_parts` as one bytes object."""
        return b"".join(self.inner_parts())


def _lines(data: bytes) -> Iterator[tuple[int, int]]:
    """Yield (start, end) of each line; ``end`` is past the LF, or the end of the input."""
    start = 0
    size = len(data)
    while start < size:
        lf = data.find(b"\n", start)
        end = size if lf < 0 else lf + 1
        yield start, end
        start = end


def split(raw: bytes) -> RawMessage:
    """Cut ``raw`` into fields, separator and body without changing or losing a byte."""
    fields: list[HeaderField] = []
    field_start: int | None = None
    position = 0
    separator = b""
    for start, end in _lines(raw):
        line = raw[start:end]
        if field_start is not None and line[:1] in (b" ", b"\t"):
            continue  # continuation of the current field
        if field_start is not None:
            fields.append(HeaderField(raw[field_start:start]))
            field_start = None
        if _FIELD_START.match(line):
            field_start = start
            continue
        position = start
        if line in (b"\r\n", b"\n"):
            separator = line
            position = end
        break
    else:
        if field_start is not None:
            fields.append(HeaderField(raw[field_start:]))
        position = len(raw)
    return RawMessage(tuple(fields), separator, raw, position)


@dataclass(frozen=True, slots=True)
class ContentType:
    """A parsed ``Content-Type`` value: lower-case type and parameters."""

    maintype: str
    subtype: str
    params: dict[str, str]

    @property
    def mimetype(self) -> str:
        return f"{self.maintype}/{self.subtype}"


def parse_content_type(value: str) -> ContentType:
    """Parse a Content-Type value with the ``email`` package's parameter parser.

    Only *reading* goes through ``email`` (quoting, RFC 2231 continuations): nothing it produces
    is ever written back into a message. Never raises: the value comes from any sender.
    """
    if len(value) > MAX_CONTENT_TYPE_CHARS:
        value = value.partition(";")[0]
    holder = Message()
    holder["Content-Type"] = value
    mimetype = holder.get_content_type()
    maintype, _, subtype = mimetype.partition("/")
    params: dict[str, str] = {}
    try:
        found = holder.get_params(header="content-type", failobj=[])
    except (TypeError, ValueError):
        # RFC 2231 sections the email package cannot put in order ("a*" next to "a*0"):
        # the parameters are unreadable, the type is still known.
        found = []
    for key, raw_value in found[1:]:
        params.setdefault(key.lower(), _parameter_value(raw_value))
    return ContentType(maintype, subtype, params)


def _parameter_value(raw_value: str | tuple[str | None, str | None, str]) -> str:
    """An RFC 2231 value decoded with its declared charset, or its raw text when Python cannot
    decode with that name (a NUL in it, or a codec such as idna that refuses "replace")."""
    try:
        return collapse_rfc2231_value(raw_value)
    except ValueError:
        return raw_value[2] if isinstance(raw_value, tuple) else raw_value


def content_type(message: RawMessage) -> ContentType | None:
    """The message's content type; None when it is absent, repeated, or unreadable.

    Two Content-Type fields are ambiguous (clients disagree on which one wins), so callers treat
    that like an unknown structure.
    """
    found = message.all("content-type")
    if len(found) != 1:
        return None
    return parse_content_type(found[0].value)


def transfer_encoding(message: RawMessage) -> str:
    field = message.first("content-transfer-encoding")
    return field.value.strip().lower() if field else "7bit"


def multipart_parts(body: bytes, boundary: str) -> tuple[bytes, list[bytes], bytes, bool] | None:
    """Cut a multipart body at its boundary lines: (preamble, parts, epilogue, closed).

    Returns None when the boundary never occurs. ``closed`` tells whether the close delimiter
    was found; the parts keep their bytes exactly, minus the line break that belongs to the
    delimiter (RFC 2046 section 5.1.1).
    """
    delimiter = b"--" + boundary.encode("latin-1")
    parts: list[bytes] = []
    preamble = b""
    epilogue = b""
    closed = False
    current_start: int | None = None
    for start, end in _lines(body):
        line = body[start:end]
        if not line.startswith(delimiter):
            continue
        rest = line[len(delimiter) :]
        is_close = rest.startswith(b"--")
        if rest[2 if is_close else 0 :].strip(b" \t\r\n"):
            continue  # a longer line that merely starts like the delimiter
        if current_start is None:
            preamble = body[:start]
        else:
            parts.append(_strip_break(body[current_start:start]))
        current_start = end
        if is_close:
            closed = True
            epilogue = body[end:]
            break
    if current_start is None:
        return None
    if not closed:
        parts.append(body[current_start:])
    return preamble, parts, epilogue, closed


def _strip_break(part: bytes) -> bytes:
    if part.endswith(b"\r\n"):
        return part[:-2]
    if part.endswith(b"\n"):
        return part[:-1]
    return part


def join_fields(fields: Iterable[HeaderField]) -> bytes:
    return b"".join(f.terminated for f in fields)
