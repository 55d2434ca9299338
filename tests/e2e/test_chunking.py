"""BDAT towards the real downstreams: Dovecot's LMTP and Postfix's reinjection smtpd both offer
CHUNKING, and the client sends the envelope, ``BDAT n LAST`` and the message together.

On a reused connection the client waits for the reply to its leading RSET after the first
256 KB, before the rest of a large message: a server that held that reply back until the whole
chunk had arrived would leave both sides waiting until the delivery timeout. These servers
answer at once; this keeps it so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpgfilter.mail.deliver import MailClient
from gpgfilter.process.config import Endpoint
from tests.support.e2e_stack import Stack
from tests.support.mailstack import require_mail_stack

USERS = ["r@example.test", "s@example.test"]
# 4.4 MB in 200,000 lines, some starting with a dot: no dot-stuffing with BDAT.
LARGE = b"Subject: large\r\n\r\n" + b"".join(
    b"%s%07d line of text\r\n" % (b"." if n % 1000 == 0 else b"", n) for n in range(200_000)
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Content-filter mode: Postfix's reinjection port beside Dovecot's LMTP."""
    require_mail_stack()
    with Stack(tmp_path_factory.mktemp("chunking"), mode="content_filter", users=USERS) as s:
        yield s


@pytest.mark.parametrize("downstream", ["dovecot-lmtp", "postfix-reinjection"])
async def test_large_messages_on_a_reused_connection(stack: Stack, downstream: str) -> None:
    lmtp = downstream == "dovecot-lmtp"
    port = stack.dovecot.lmtp_port if lmtp else stack.postfix.reinject_port
    assert port is not None
    client = MailClient(Endpoint("127.0.0.1", port), lmtp=lmtp, helo="filter.test", timeout=20)
    try:
        for _ in range(3):  # fresh, then reused twice
            replies = await client.send("s@example.test", ["r@example.test"], LARGE)
            assert [r.code for r in replies] == [250], replies
        [session] = client._idle
        assert {"CHUNKING", "PIPELINING"} <= session.extensions, "BDAT was not used"
    finally:
        await client.close()
    if lmtp:
        stored = stack.dovecot.wait_for("r@example.test", 3)
        assert all(m.endswith(LARGE[-40:]) and b"\r\n.0001000 line" in m for m in stored)
