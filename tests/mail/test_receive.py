"""The DATA reader of the mail listeners, against a reference reading of RFC 5321: however the
client's bytes are cut into packets, and however small the reader's buffer, the same
dot-unstuffed message comes out, the end of data is found at the same place, pipelined
commands after it stay unread, and the size and line limits trip exactly when they should."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpgfilter.mail.receive import DataReader, _SMTPServer, read_data

END = b"\r\n.\r\n"
PIPELINED = b"MAIL FROM:<next@example.test>\r\nQUIT\r\n"


def reference(stream: bytes) -> tuple[bytes, int]:
    """The message in ``stream`` (CRLF lines, up to the line "."), dot-unstuffed, and the
    offset just past that line."""
    content = bytearray()
    position = 0
    while True:
        end = stream.index(b"\r\n", position)
        line = stream[position:end]
        position = end + 2
        if line == b".":
            return bytes(content), position
        content += (line[1:] if line.startswith(b".") else line) + b"\r\n"


def longest_line(raw: bytes) -> int:
    return max(len(line) for line in raw.split(b"\n"))


# Mostly the bytes that matter to the end of data and to dot-stuffing.
_BODY = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"..", b"x", b"\r\n.", b"\x00", b"\xff"]),
    max_size=60,
).map(b"".join)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    body = draw(_BODY)
    # The end of data: the first line "." — which may already be in the body.
    stream = (body + END if draw(st.booleans()) else END[2:] + body + END) + PIPELINED
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return stream, cuts


def run_reader(stream: bytes, cuts: list[int], limit: int, data: DataReader) -> bytes:
    """Feed ``stream`` in the packets ``cuts`` makes, to a reader with buffer ``limit``; what
    was left unread after the end of data."""

    async def scenario() -> bytes:
        reader = asyncio.StreamReader(limit=limit)
        reading = asyncio.create_task(read_data(reader, data))
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            reader.feed_data(stream[start:stop])
            await asyncio.sleep(0)
        await asyncio.wait_for(reading, 5)
        reader.feed_eof()
        return await reader.read()

    return asyncio.run(scenario())


@settings(max_examples=400, deadline=None)
@given(streams(), st.integers(1, 12))
# A piece that ends in CR, the next starting with LF and a stuffed dot.
@example((b"ab\r\n.x\r\n.\r\n" + PIPELINED, [5]), 1)
def test_any_packets_any_buffer_give_the_reference_message(
    case: tuple[bytes, list[int]], limit: int
) -> None:
    stream, cuts = case
    expected, after = reference(stream)
    data = DataReader(max_size=1 << 30, line_limit=1 << 30)
    rest = run_reader(stream, cuts, limit, data)
    assert not data.refused
    assert data.content.getvalue() == expected
    assert rest == stream[after:]


@settings(max_examples=300, deadline=None)
@given(streams(), st.integers(1, 12), st.integers(0, 40), st.integers(0, 40))
def test_limits_trip_exactly_and_keep_nothing(
    case: tuple[bytes, list[int]], limit: int, max_size: int, line_limit: int
) -> None:
    stream, cuts = case
    expected, after = reference(stream)
    raw = stream[: after - 3]  # up to the CRLF before the final dot
    data = DataReader(max_size=max_size, line_limit=line_limit)
    rest = run_reader(stream, cuts, limit, data)
    assert rest == stream[after:]  # the end of data is found all the same
    assert data.too_long == (longest_line(raw) > line_limit)
    if not data.too_long:
        assert data.too_big == (len(expected) > max_size)
    if data.refused:
        assert data.content.getvalue() == b""
    else:
        assert data.content.getvalue() == expected


def test_a_line_longer_than_the_buffer_is_counted_across_pieces() -> None:
    stream = b"a" * 50 + b"\r\n" + b"b" * 10 + END
    data = DataReader(max_size=1000, line_limit=49)
    assert run_reader(stream, [7, 33], 8, data) == b""
    assert data.too_long and data.content.getvalue() == b""
    data = DataReader(max_size=1000, line_limit=51)  # the CR counts: 51 bytes before the LF
    run_reader(stream, [7, 33], 8, data)
    assert not data.refused and data.content.getvalue() == stream[:-3]


# -- envelope paths: the fast reading of plain paths answers as aiosmtpd's parser does ------

_PATH_PIECES = st.sampled_from(
    ["<", ">", "@", ".", " ", "\t", "(", ")", '"', "\\", "[", "]", ",", ":", ";", "+", "=",
     "a", "Z", "0", "-", "_", "é", "example", "test", "SIZE=10", "BODY=8BITMIME"]
)  # fmt: skip


def _outcome(read: Callable[[str], object], arg: str) -> object:
    """What ``read`` answers, or the kind of error it raises (aiosmtpd's parser raises
    IndexError on a lone "<": the fast path must leave such input to it)."""
    try:
        return read(arg)
    except Exception as error:
        return type(error)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PATH_PIECES, max_size=14).map("".join))
@example("<alice@example.test> SIZE=10 BODY=8BITMIME")
@example("<a.b+c@d-e.example>SIZE=1")
@example("<>")
@example("<a..b@c>")
@example("<a@b> (comment) SIZE=1")
@example(" <a@b>  ")
def test_plain_paths_are_read_as_aiosmtpd_reads_them(arg: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        for limit in (0, 3):
            server = _SMTPServer(object(), loop=loop)
            server.local_part_limit = limit
            reference = functools.partial(SMTP._getaddr, server)
            assert _outcome(server._getaddr, arg) == _outcome(reference, arg)
    finally:
        loop.close()
