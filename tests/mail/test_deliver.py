"""The LMTP/SMTP client: per-recipient replies, connection reuse, and failures as replies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gpgfilter.mail.deliver import MailClient, to_wire
from gpgfilter.process.config import Endpoint
from tests.support.fakes import Downstream


def test_to_wire_normalises_line_ends_and_stuffs_dots() -> None:
    assert to_wire(b".a\nb\r\n.c") == b"..a\r\nb\r\n..c\r\n.\r\n"
    assert to_wire(b"") == b"\r\n.\r\n"


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
async def test_reuses_connections_and_replaces_dead_ones(chunking: bool) -> None:
    downstream = Downstream(lmtp=True, chunking=chunking)
    await downstream.start()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=True, helo="t", timeout=10)
    try:
        for _ in range(3):
            replies = await client.send("a@example.test", ["b@example.test"], b"x\r\n")
            assert [r.code for r in replies] == [250]
        assert downstream.hellos == 1, "one connection for three messages"
        # The downstream restarts: the idle connection is dead and must be replaced silently.
        await downstream.stop()
        restarted = Downstream(lmtp=True, port=downstream.port, chunking=chunking)
        await restarted.start()
        replies = await client.send("a@example.test", ["b@example.test"], b"y\r\n")
        assert [r.code for r in replies] == [250]
        assert len(restarted.deliveries) == 1
        # Again, with a message larger than what goes out before the RSET's reply.
        await restarted.stop()
        again = Downstream(lmtp=True, port=downstream.port, chunking=chunking)
        await again.start()
        large = b"".join(b"%07d .line\r\n" % n for n in range(40_000))
        replies = await client.send("a@example.test", ["b@example.test"], large)
        assert [r.code for r in replies] == [250]
        assert [d.data for d in again.deliveries] == [large]
        assert again.chunked == (1 if chunking else 0)
        await again.stop()
    finally:
        await client.close()


async def test_refusing_greeting_is_every_recipients_reply() -> None:
    downstream = Downstream(lmtp=True)
    await downstream.start()
    await downstream.stop()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=True, helo="t", timeout=10)
    replies = await client.send("a@example.test", ["b@example.test", "c@example.test"], b"x")
    assert [r.code for r in replies] == [451, 451]


@pytest.mark.parametrize(
    ("pipelining", "chunking"),
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["pipelined", "lockstep", "BDAT", "no-PIPELINING-so-DATA"],
)
async def test_refusals_at_every_step(pipelining: bool, chunking: bool) -> None:
    downstream = Downstream(lmtp=True, pipelining=pipelining, chunking=chunking)
    await downstream.start()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=True, helo="t", timeout=10)
    try:
        downstream.rcpt_codes = {"x@example.test": "550 5.1.1 <x@example.test> Unknown"}
        downstream.codes = {"y@example.test": "452 4.2.2 <y@example.test> Full"}
        for _ in range(2):  # fresh, then reused connection
            replies = await client.send(
                "a@example.test", ["x@example.test", "y@example.test", "z@example.test"], b"m"
            )
            assert [r.code for r in replies] == [550, 452, 250]
        replies = await client.send("a@example.test", ["x@example.test"], b"m")
        assert [r.code for r in replies] == [550]
        downstream.mail_code = "451 4.3.2 Try later"
        replies = await client.send("a@example.test", ["y@example.test", "z@example.test"], b"m")
        assert [str(r) for r in replies] == ["451 4.3.2 Try later"] * 2
        downstream.mail_code = ""
        replies = await client.send("a@example.test", ["z@example.test"], b"m")
        assert [r.code for r in replies] == [250]
        assert [d.recipients for d in downstream.deliveries] == [["z@example.test"]] * 3
        assert downstream.chunked == (3 if chunking and pipelining else 0)
    finally:
        await client.close()
        await downstream.stop()


async def test_a_small_message_and_its_end_go_out_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each write is a syscall that also wakes the downstream: the pieces of a small message
    (header fields, ciphertext, closing boundary) and the end of data share one."""
    writes: list[bytes] = []
    write, writelines = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines

    def counting_write(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(bytes(data))
        write(self, data)

    def counting_writelines(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(b"".join(bytes(d) for d in data))
        writelines(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting_write)
    monkeypatch.setattr(asyncio.StreamWriter, "writelines", counting_writelines)
    downstream = Downstream(lmtp=True)
    await downstream.start()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=True, helo="t", timeout=10)
    try:
        pieces = [b"Subject: x\r\n\r\n", b"-----BEGIN PGP MESSAGE-----\r\n.x\r\n", b"--b--\r\n"]
        replies = await client.send("a@example.test", ["b@example.test"], pieces)
        assert [r.code for r in replies] == [250]
        assert downstream.deliveries[0].data == b"".join(pieces)
        body = [w for w in writes if b"Subject: x" in w or w.endswith(b".\r\n")]
        assert body == [b"Subject: x\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n..x\r\n--b--\r\n.\r\n"]
    finally:
        await client.close()
        await downstream.stop()


@pytest.mark.parametrize("lmtp", [True, False], ids=["LMTP", "SMTP"])
async def test_with_chunking_envelope_command_and_message_go_out_in_one_write(
    monkeypatch: pytest.MonkeyPatch, lmtp: bool
) -> None:
    """BDAT needs no 354 and no dot-stuffing: the envelope, ``BDAT n LAST`` and a small
    message share one write, and the bytes arrive as they were."""
    writes: list[bytes] = []
    writelines = asyncio.StreamWriter.writelines

    def counting_writelines(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(b"".join(bytes(d) for d in data))
        writelines(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "writelines", counting_writelines)
    downstream = Downstream(lmtp=lmtp, chunking=True)
    downstream.codes = {"y@example.test": "452 4.2.2 <y@example.test> Full"}
    await downstream.start()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=lmtp, helo="t", timeout=10)
    try:
        pieces = [b"Subject: x\n\n", b".starts with a dot\r\n", b"--b--"]
        sent = b"Subject: x\r\n\r\n.starts with a dot\r\n--b--\r\n"
        for _ in range(2):  # fresh, then reused (with RSET first)
            replies = await client.send("a@example.test", ["b@example.test"], pieces)
            assert [r.code for r in replies] == [250]
        assert [d.data for d in downstream.deliveries] == [sent, sent]
        assert [w.split(b"\r\n", 3)[:3] for w in writes] == [
            [b"MAIL FROM:<a@example.test> SIZE=37", b"RCPT TO:<b@example.test>", b"BDAT 41 LAST"],
            [b"RSET", b"MAIL FROM:<a@example.test> SIZE=37", b"RCPT TO:<b@example.test>"],
        ]
        assert all(w.endswith(sent) for w in writes)
        replies = await client.send("a@example.test", ["b@example.test", "y@example.test"], b"m")
        assert [r.code for r in replies] == ([250, 452] if lmtp else [250, 250])
        assert downstream.chunked == 3
    finally:
        await client.close()
        await downstream.stop()
