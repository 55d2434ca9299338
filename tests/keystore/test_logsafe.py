"""Client input in a log line: escaped and capped, whatever it holds."""

from __future__ import annotations

import io
import logging

from hypothesis import given
from hypothesis import strategies as st

from keystore.logsafe import SafeFormatter, escape


def test_control_characters_become_visible_escapes() -> None:
    assert escape("a\nb\rc\td\x00e\x1bf\x7fg\x85h\u2028i\u202ej\ud800") == (
        "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i\\u202ej\\ud800"
    )
    assert escape("dave@example.test ünïcode ✓") == "dave@example.test ünïcode ✓"


def test_long_input_is_cut_and_says_so() -> None:
    assert escape("x" * 50, limit=10) == "xxxxxxxxxx...[50 characters, cut]"


@given(st.text())
def test_any_message_is_one_printable_line(text: str) -> None:
    out = escape(text)
    assert len(out.splitlines()) <= 1
    out.encode("utf-8")  # no lone surrogate left: the handler cannot fail
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)


def test_the_formatter_escapes_the_message_but_not_the_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.logsafe")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("path %s", "/x\n2026-01-01 INFO keystore.registration: key registered")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed for %s", "a\rb")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING path /x\\n2026-01-01 INFO keystore.registration: key registered"
    assert lines[1] == "ERROR failed for a\\rb"
    assert lines[2] == "Traceback (most recent call last):"  # the process's own text, as is
    assert lines[-1] == "ValueError: boom"
