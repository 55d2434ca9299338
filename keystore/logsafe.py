"""Log lines that client input cannot forge.

Addresses, paths and header values from the network end up in log messages. A CR or LF in one
would start what looks like a new, genuine log line (a forged "key registered"), a NUL or an
escape sequence would confuse whoever reads the log in a terminal, and a lone surrogate would
make the handler itself fail. So every message is escaped once, centrally, by the formatter the
processes install, and capped in length: nothing a client sends can become more than one line.
The traceback the process adds to a record is its own text and is left as it is.
"""

from __future__ import annotations

import logging
import re
import sys

MAX_MESSAGE = 2000  # characters of a message kept; enough for any line of ours
# C0, DEL, C1, the Unicode line/paragraph separators, the bidirectional overrides (which
# reorder what a terminal shows) and lone surrogates (not encodable: the handler would fail).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line: control characters as visible escapes, at most ``limit``
    characters of the original kept (the cut is marked)."""
    size = len(text)
    if size > limit:
        text = text[:limit]
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escape_one, text)
    return f"{text}...[{size} characters, cut]" if size > limit else text


class SafeFormatter(logging.Formatter):
    """Escapes and caps the message of every record; the rest of the format is ours."""

    def __init__(self, fmt: str = FORMAT, limit: int = MAX_MESSAGE) -> None:
        super().__init__(fmt)
        self.limit = limit

    def formatMessage(self, record: logging.LogRecord) -> str:
        original = record.message
        record.message = escape(original, self.limit)
        try:
            return super().formatMessage(record)
        finally:
            record.message = original  # other handlers format the record themselves


def setup_logging(level: str) -> None:
    """Log to stderr through :class:`SafeFormatter`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # python-gnupg logs the data it handles (keys included) at DEBUG; aiosmtpd logs commands.
    logging.getLogger("gnupg").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
