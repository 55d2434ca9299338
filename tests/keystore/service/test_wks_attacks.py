"""Attacks on the RUNNING key service's Web Key Service listener (``gpgfilter keyserver`` with
publication on), over LMTP on loopback, as anyone who can reach the submission address could.

Each case checks the answer Postfix would get (a permanent refusal with its reason, never a 451
that makes Postfix retry the same message for days), how fast it comes, that no traceback
reaches the log, and what the relay was asked to send.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gpgfilter.mail.deliver import MailClient, Reply
from gpgfilter.process.config import Endpoint
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.validate import validate_key
from tests.support.fakes import Downstream
from tests.support.forgery import forged_self_signatures
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import KeyFactory, TestKey

SUBMISSION = "key-submission@example.test"
QUICK = 5.0  # seconds: a refusal of hostile headers is cheap


@dataclass
class Running:
    pid: int
    port: int
    relay: Downstream
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def send(self, sender: str, data: bytes) -> Reply:
        client = MailClient(Endpoint("127.0.0.1", self.port), lmtp=True, helo="mx.test", timeout=60)
        try:
            (reply,) = await client.send(sender, [SUBMISSION], data)
        finally:
            await client.close()
        return reply

    def sent_to(self, address: str) -> int:
        return sum(address in d.recipients for d in self.relay.deliveries)


@asynccontextmanager
async def keyserver(tmp_path: Path) -> AsyncIterator[Running]:
    """``gpgfilter keyserver`` with WKS on, its mail (challenges, notices) to a fake relay."""
    relay = Downstream(lmtp=False)
    await relay.start()
    http, wks = free_port(), free_port()
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nhostname: mail.example.test\ndomains: [example.test]\n"
        f"keyserver:\n  listen: 127.0.0.1:{http}\n  relay: 127.0.0.1:{relay.port}\n"
        "  public_url: https://keys.example.test\n  expiry_check_interval: 0\n"
        f"publication:\n  domains: [example.test]\n  wks_listen: 127.0.0.1:{wks}\n"
        f"  wks_relay: 127.0.0.1:{relay.port}\n"
    )
    log_path = tmp_path / "keyserver.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpgfilter", "-c", str(config), "keyserver"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", wks)
                writer.close()
                break
            except OSError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.1)
        yield Running(process.pid, wks, relay, log_path)
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 20)
        await relay.stop()


def _no_traceback(running: Running) -> None:
    log = running.log()
    assert "Traceback" not in log, log[-3000:]


def _message(content_type: str, body: bytes, *, sender: str = "alice@example.test") -> bytes:
    return (
        f"From: {sender}\r\nTo: {SUBMISSION}\r\nSubject: Key publishing request\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n"
    ).encode() + body


async def test_hostile_mime_headers_get_a_quick_permanent_refusal(tmp_path: Path) -> None:
    """RFC 2231 sections the email package cannot order used to raise TypeError (451, retried
    for days); an open quote and 100 KB of semicolons in a part's Content-Type took 8 s of CPU."""
    unordered = _message(
        "multipart/mixed; boundary*=a; boundary*0=b",
        b"--ab\r\nContent-Type: text/plain\r\n\r\nhi\r\n--ab--\r\n",
    )
    semicolons = _message(
        'multipart/mixed; boundary="b"',
        b'--b\r\nContent-Type: multipart/mixed; a="' + b";" * 100_000 + b"\r\n\r\nx\r\n--b--\r\n",
    )
    async with keyserver(tmp_path) as running:
        for data in (unordered, semicolons):
            started = time.monotonic()
            reply = await running.send("alice@example.test", data)
            took = time.monotonic() - started
            assert reply.code == 550 and len(reply.text) > 20, reply
            assert took < QUICK, f"{took:.1f} s"
        _no_traceback(running)
        assert running.relay.deliveries == []


async def test_a_revoked_key_gets_no_confirmation_request(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    """A key revoked once is refused at submission, as over HTTP: no mail goes out for it,
    whether it is still bound (revoked) or was replaced since."""
    old = key_factory.make("rita@example.test")
    replaced = key_factory.make("rhea@example.test")
    newer = key_factory.make("rhea@example.test")
    (tmp_path / "data").mkdir()
    store = SQLiteKeyStore(tmp_path / "data" / "keys.sqlite", create=True)
    store.bind(old.address, validate_key(old.public).key)
    store.revoke(old.fingerprint)
    store.bind(replaced.address, validate_key(replaced.public).key)
    store.revoke(replaced.fingerprint)
    store.bind(newer.address, validate_key(newer.public).key, replace=True)
    store.close()
    async with keyserver(tmp_path) as running:
        for key in (old, replaced):
            reply = await running.send(key.address, _plain_submission(key))
            assert reply.code == 550 and "revoked" in reply.text, reply
            assert running.sent_to(key.address) == 0
        _no_traceback(running)


def _plain_submission(key: TestKey, data: bytes | None = None) -> bytes:
    body = base64.encodebytes(data if data is not None else key.public).replace(b"\n", b"\r\n")
    return (
        f"From: {key.address}\r\nTo: {SUBMISSION}\r\nSubject: Key publishing request\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/pgp-keys\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + body


def _gpg_children(pid: int) -> int:
    """How many gpg processes ``pid`` runs right now."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        if name == "gpg" and fields and int(fields[1]) == pid:
            count += 1
    return count


async def test_a_burst_of_costly_submissions_is_bounded(tmp_path: Path, alice: TestKey) -> None:
    """16 submissions at once of a key carrying forged self-signatures: gpg checks at most
    the validation slots' worth at once (as for HTTP uploads), the rest wait or are deferred
    (451: Postfix retries later), and nothing waits without bound."""
    binary = base64.b64decode(b"".join(alice.public.splitlines()[2:-2]))
    forged = _plain_submission(alice, forged_self_signatures(binary, 90))
    slots = max(1, (os.cpu_count() or 2) // 2)
    async with keyserver(tmp_path) as running:
        peak = 0
        done = False

        async def watch() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, await asyncio.to_thread(_gpg_children, running.pid))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        replies = await asyncio.gather(*(running.send(alice.address, forged) for _ in range(16)))
        took = time.monotonic() - started
        done = True
        await watcher
        print(f"16 costly submissions: {took:.1f} s, at most {peak} gpg at once")
        assert peak <= slots, peak
        # Whether any waits long enough to be told "busy" depends on the machine's speed;
        # that gpg never runs more than the slots at once does not.
        busy = [r for r in replies if r.code == 451]
        assert all("busy" in r.text for r in busy), replies
        assert {r.code for r in replies} <= {421, 451, 550}, replies  # 421: the connection cap
        assert took < 120
        assert running.sent_to(alice.address) == 0
        _no_traceback(running)
