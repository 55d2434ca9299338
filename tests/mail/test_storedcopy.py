"""The stored copy is one function for the filter and the at-rest command: the address's
header protection choice (or the admin's default) reaches both."""

from __future__ import annotations

import pytest

from gpgfilter.mail import storedcopy
from gpgfilter.mail.rawmessage import split
from keystore.model import AddressKeys, AddressSettings, HeaderProtection
from tests.support.fakes import FakeEngine, stored_key

MESSAGE = (
    b"From: a@example.test\r\nTo: b@example.test\r\nSubject: the real one\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\nhello\r\n"
)
KEY = stored_key("A" * 40)


@pytest.mark.parametrize(
    ("chosen", "default", "expected"),
    [(None, "off", "off"), (None, "copy", "copy"), ("hide-subject", "off", "hide-subject")],
)
def test_the_address_choice_wins_over_the_default(
    chosen: HeaderProtection | None, default: HeaderProtection, expected: HeaderProtection
) -> None:
    keys = AddressKeys([KEY], AddressSettings(header_protection=chosen))
    assert storedcopy.protection_for(keys, default) == expected
    assert storedcopy.protection_for([KEY], default) == default


async def test_hide_subject_reaches_the_stored_copy() -> None:
    engine = FakeEngine()
    recipient = storedcopy.recipient_for([KEY])
    assert recipient is not None
    stored = b"".join(
        await storedcopy.stored_copy(
            split(MESSAGE), recipient, engine, timeout=5, protection="hide-subject"
        )
    )
    outer, _, _ = stored.partition(b"\r\n\r\n")
    assert b"Subject: [...]" in outer and b"the real one" not in outer
    inner = engine.encrypted[-1][0]
    assert b"Subject: the real one" in inner and b'hp="cipher"' in inner
    assert inner.endswith(b"\r\n\r\nhello\r\n")


async def test_off_keeps_the_original_entity() -> None:
    engine = FakeEngine()
    recipient = storedcopy.recipient_for([KEY])
    assert recipient is not None
    stored = b"".join(await storedcopy.stored_copy(split(MESSAGE), recipient, engine, timeout=5))
    assert b"Subject: the real one" in stored.partition(b"\r\n\r\n")[0]
    assert engine.encrypted[-1][0] == b"Content-Type: text/plain; charset=us-ascii\r\n\r\nhello\r\n"
