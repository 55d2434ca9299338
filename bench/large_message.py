"""Memory and time for large messages through the filter (its own process, the default
engine, a sink as downstream): the resident-set growth must stay a small multiple of the
message size, for one message and for several arriving at once on their own connections.

    .venv/bin/python bench/large_message.py [--mb 20] [--rcpts 1] [--concurrent 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpgfilter.mail.deliver import MailClient
from gpgfilter.process.config import Endpoint
from tests.support.e2e_stack import FilterProcess
from tests.support.fakes import Downstream
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import KeyFactory


def message(megabytes: int) -> bytes:
    head = (
        b"From: a@example.test\r\nTo: r@example.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n'
        b"\r\nsee attachment\r\n--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    raw = os.urandom(megabytes * 1024 * 1024 * 3 // 4)
    import base64

    body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return head + body + b"--b--\r\n"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(megabytes: int, rcpts: int, concurrent: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, KeyFactory(Path(tmp) / "keys") as keys:
        root = Path(tmp)
        addresses = [f"r{n}@example.test" for n in range(rcpts)]
        sink = Downstream(lmtp=True, chunking=True)  # BDAT, as Dovecot and Postfix offer
        await sink.start()
        port = free_port()
        filter_process = FilterProcess(
            root / "filter", mode="lmtp", port=port, deliver_port=sink.port
        )
        for address in addresses:
            filter_process.import_key(keys.make(address, algo="rsa3072").public)
        filter_process.start()
        try:
            clients = [
                MailClient(Endpoint("127.0.0.1", port), lmtp=True, helo="bench", timeout=600)
                for _ in range(concurrent)
            ]
            await clients[0].send("a@example.test", addresses, message(1))  # warm up
            idle = peak_rss_mb(filter_process.pid)
            data = message(megabytes)
            sink.deliveries.clear()
            started = time.monotonic()
            answers = await asyncio.gather(
                *(client.send("a@example.test", addresses, data) for client in clients)
            )
            elapsed = time.monotonic() - started
            peak = peak_rss_mb(filter_process.pid)
            replies = [reply for answer in answers for reply in answer]
            stored = len(sink.deliveries[0].data) if sink.deliveries else 0
            for client in clients:
                await client.close()
        finally:
            filter_process.stop()
            await sink.stop()
    total = len(data) * concurrent
    accepted = sum(1 for reply in replies if reply.ok)
    print(
        f"message: {len(data) / 1e6:.1f} MB to {rcpts} recipient(s), {concurrent} at once;"
        f" {accepted} of {len(replies)} replies 250, first: {replies[0]}"
    )
    print(f"stored (encrypted) size: {stored / 1e6:.1f} MB ({stored / len(data):.2f}x)")
    print(f"time through the filter: {elapsed:.2f} s")
    print(
        f"filter process peak RSS: {idle:.0f} MB after a 1 MB message, {peak:.0f} MB after"
        f" these (+{peak - idle:.0f} MB, {(peak - idle) * 1e6 / len(data) / 1.048576:.1f}x"
        f" one message, {(peak - idle) * 1e6 / total / 1.048576:.1f}x all of them)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--rcpts", type=int, default=1, help="recipients, each with a key")
    parser.add_argument(
        "--concurrent", type=int, default=1, help="messages sent at once, one connection each"
    )
    args = parser.parse_args()
    asyncio.run(run(args.mb, args.rcpts, args.concurrent))


if __name__ == "__main__":
    main()
