"""Encrypting mail at rest: messages per second for a generated mailbox, and the filter's
delivery throughput while a run goes on, against real Postfix + Dovecot + gpgfilter.

    .venv/bin/python bench/mailbox.py [--messages 10000] [--delivered 300] [--throttle 0]

The mailbox user ``r@example.test`` gets ``--messages`` clear messages (~2 KB, four folders)
by IMAP APPEND, then ``gpgfilter mailbox encrypt`` runs as a real process. Delivery is measured
by Postfix's ``smtp-source`` to the other users, once alone and once during a run.
"""

from __future__ import annotations

import argparse
import imaplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import RECIPIENTS, run_load
from tests.support.e2e_stack import Stack
from tests.support.openpgp_tools import KeyFactory

USER = "r@example.test"
FOLDERS = ("INBOX", "Archive", "Sent", "Old")


def seed(stack: Stack, count: int, folder_prefix: str = "") -> float:
    """APPEND ``count`` clear messages over one IMAP session; returns seconds."""
    started = time.monotonic()
    imap = imaplib.IMAP4("127.0.0.1", stack.dovecot.imap_port, timeout=60)
    imap.login(USER, "pw")
    for folder in FOLDERS:
        imap.create(folder_prefix + folder)
    body = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 30
    for number in range(count):
        data = (
            f"From: s@example.test\r\nTo: {USER}\r\nSubject: m {number}\r\n"
            f"Message-ID: <{number}@bench>\r\nContent-Type: text/plain\r\n\r\n"
        ).encode() + body
        folder = folder_prefix + FOLDERS[number % len(FOLDERS)]
        imap.append(folder, "(\\Seen)", '"01-Jan-2020 10:00:00 +0000"', data)
    imap.logout()
    return time.monotonic() - started


def encrypt(stack: Stack, *args: str) -> tuple[float, str]:
    assert stack.filter is not None
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gpgfilter", "-c", str(stack.filter.config_path), "mailbox",
         "encrypt", *args, USER],
        capture_output=True, text=True, check=True, timeout=7200,
    )  # fmt: skip
    return time.monotonic() - started, done.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--delivered", type=int, default=300, help="messages delivered per case")
    parser.add_argument("--throttle", type=float, default=0.0, help="messages/s during delivery")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpgfilter-bench-") as tmp:
        root = Path(tmp)
        with KeyFactory(root / "keys") as factory:
            key = factory.make(USER)
            users = sorted({*RECIPIENTS, USER})
            with Stack(root / "stack", mode="lmtp", users=users) as stack:
                assert stack.filter is not None
                for address in users:
                    stack.filter.import_key(key.public, address)
                config = stack.filter.config_path
                config.write_text(
                    config.read_text()
                    + f"mailbox:\n  dovecot_config: {stack.dovecot.config_path}\n"
                )
                seconds = seed(stack, options.messages)
                print(f"seeded {options.messages} messages in {seconds:.1f} s")
                seconds, line = encrypt(stack)
                print(f"first run: {options.messages / seconds:.1f} messages/s ({line})")
                seconds, line = encrypt(stack)
                print(f"second run (nothing to do): {seconds:.1f} s")
                seconds, line = encrypt(stack, "--since-last")
                print(f"sweep with nothing new: {seconds:.1f} s")

                alone = run_load(stack, messages=options.delivered, size=2000, rcpts=1, sessions=10)
                print(f"delivery alone: {options.delivered / alone:.1f} messages/s")
                seed(stack, 2000, "more-")
                results: list[tuple[float, str]] = []
                extra = ["--throttle", str(options.throttle)] if options.throttle else []
                worker = threading.Thread(target=lambda: results.append(encrypt(stack, *extra)))
                worker.start()
                time.sleep(1)
                during = run_load(
                    stack, messages=options.delivered, size=2000, rcpts=1, sessions=10
                )
                worker.join()
                print(
                    f"delivery during a run: {options.delivered / during:.1f} messages/s"
                    f" ({alone / during:.0%} of alone); the run: {results[0][1]}"
                )


if __name__ == "__main__":
    main()
