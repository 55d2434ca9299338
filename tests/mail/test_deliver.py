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


async def test_reuses_connections_and_replaces_dead_ones() -> None:
    downstream = Downstream(lmtp=True)
    await downstream.start()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=True, helo="t", timeout=10)
    try:
        for _ in range(3):
            replies = await client.send("a@example.test", ["b@example.test"], b"x\r\n")
            assert [r.code for r in replies] == [250]
        assert downstream.hellos == 1, "one connection for three messages"
        # The downstream restarts: the idle connection is dead and must be replaced silently.
        await downstream.stop()
        restarted = Downstream(lmtp=True, port=downstream.port)
        await restarted.start()
        replies = await client.send("a@example.test", ["b@example.test"], b"y\r\n")
        assert [r.code for r in replies] == [250]
        assert len(restarted.deliveries) == 1
        await restarted.stop()
    finally:
        await client.close()


async def test_refusing_greeting_is_every_recipients_reply() -> None:
    downstream = Downstream(lmtp=True)
    await downstream.start()
    await downstream.stop()
    client = MailClient(Endpoint("127.0.0.1", downstream.port), lmtp=True, helo="t", timeout=10)
    replies = await client.send("a@example.test", ["b@example.test", "c@example.test"], b"x")
    assert [r.code for r in replies] == [451, 451]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
async def test_refusals_at_every_step(pipelining: bool) -> None:
    downstream = Downstream(lmtp=True, pipelining=pipelining)
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
