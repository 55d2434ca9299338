"""``gpgfilter mailbox encrypt`` against a real Dovecot, run as the real command: mail in clear
in several folders becomes the filter's PGP/MIME, with flags, keywords, dates and folders kept;
a SIGKILL at any step loses nothing and the rerun leaves no duplicate; the sweep picks up what a
client APPENDs; delivery through Postfix and the filter goes on during a run."""

from __future__ import annotations

import imaplib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e_stack import Stack
from tests.support.mailstack import Dovecot, require_mail_stack, stop_all
from tests.support.openpgp_tools import TestKey, decrypt_all
from tests.support.pgpmime_check import armored_part
from tests.support.signatures import inner_entity

require_mail_stack()

USER = "alice@example.test"
FOLDERS = ("INBOX", "Archive", "Sent", "Drafts")
KILL = """
import os, signal, sys
from gpgfilter.process import mailbox_cli
from gpgfilter.process.cli import main
step, nth, seen = sys.argv[1], int(sys.argv[2]), [0]
def hook(name):
    if name == step:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
mailbox_cli.STEP_HOOK = hook
sys.argv = ["gpgfilter", *sys.argv[3:]]
main()
"""


def message(number: int, folder: str) -> bytes:
    return (
        f"From: Bob <bob@example.test>\r\nTo: {USER}\r\nSubject: note {number}\r\n"
        f"Message-ID: <{number}.{folder}@example.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"The secret of {folder} number {number}: caf\u00e9\r\n"
    ).encode()


class Mailbox:
    """The user's side: an IMAP client logged in as alice."""

    def __init__(self, dovecot: Dovecot) -> None:
        self.dovecot = dovecot

    def imap(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.dovecot.imap_port, timeout=20)
        imap.login(USER, "pw")
        return imap

    def append(self, folder: str, flags: str, date: str, data: bytes) -> None:
        imap = self.imap()
        try:
            imap.create(folder)
            typ, _ = imap.append(folder, flags, f'"{date}"', data)
            assert typ == "OK"
        finally:
            imap.logout()

    def contents(self) -> dict[str, list[tuple[int, frozenset[str], str, bytes]]]:
        """Per folder: (uid, flags without \\Recent, INTERNALDATE, bytes) of every message."""
        found: dict[str, list[tuple[int, frozenset[str], str, bytes]]] = {}
        imap = self.imap()
        try:
            for folder in FOLDERS:
                typ, data = imap.select(folder)
                found[folder] = []
                if typ != "OK" or data[0] == b"0":
                    continue
                typ, items = imap.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
                for item in items:
                    if not isinstance(item, tuple):
                        continue
                    meta = item[0].decode()
                    uid = int(re.search(r"UID (\d+)", meta).group(1))  # type: ignore[union-attr]
                    flags = re.search(r"FLAGS \(([^)]*)\)", meta).group(1).split()  # type: ignore[union-attr]
                    date = re.search(r'INTERNALDATE "([^"]+)"', meta).group(1)  # type: ignore[union-attr]
                    kept = frozenset(f for f in flags if f != "\\Recent")
                    found[folder].append((uid, kept, date, item[1]))
        finally:
            imap.logout()
        return found


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    instance = Dovecot(tmp_path / "dovecot")
    instance.add_user(USER)
    instance.add_user("nokey@example.test")
    instance.start()
    try:
        yield instance
    finally:
        stop_all(instance)


def write_config(root: Path, dovecot: Dovecot) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {root / 'data'}\nlog_level: info\n"
        f"mailbox:\n  dovecot_config: {dovecot.config_path}\n"
    )
    return config


def gpgfilter(
    config: Path, *args: str, kill: tuple[str, int] | None = None
) -> subprocess.CompletedProcess[str]:
    if kill is None:
        argv = [sys.executable, "-m", "gpgfilter", "-c", str(config), *args]
    else:
        argv = [sys.executable, "-c", KILL, kill[0], str(kill[1]), "-c", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def enrolled(tmp_path: Path, dovecot: Dovecot, alice: TestKey) -> Path:
    config = write_config(tmp_path / "gpgfilter", dovecot)
    (tmp_path / "alice.asc").write_bytes(alice.public)
    done = gpgfilter(config, "keys", "import", "--address", USER, str(tmp_path / "alice.asc"))
    assert done.returncode == 0, done.stderr
    return config


def seed(mailbox: Mailbox) -> dict[bytes, tuple[str, frozenset[str], str]]:
    """Clear mail in four folders; {original bytes: (folder, flags, date)}."""
    plan = {
        "INBOX": [
            ("\\Seen", "01-Jan-2019 08:00:00 +0000"),
            ("", "02-Feb-2020 09:30:00 +0000"),
            ("\\Flagged $Label1 Junk", "03-Mar-2021 10:00:00 +0000"),
        ],
        "Archive": [
            ("\\Seen \\Answered", "04-Apr-2018 11:11:11 +0000"),
            ("$Important", "05-May-2017 12:00:00 +0000"),
        ],
        "Sent": [("\\Seen", "06-Jun-2022 13:00:00 +0000")],
        "Drafts": [("\\Draft", "07-Jul-2023 14:00:00 +0000")],
    }
    seeded = {}
    number = 0
    for folder, entries in plan.items():
        for flags, date in entries:
            number += 1
            data = message(number, folder)
            mailbox.append(folder, f"({flags})" if flags else "", date, data)
            seeded[data] = (folder, frozenset(flags.split()), date)
    return seeded


def assert_all_encrypted(
    mailbox: Mailbox, seeded: dict[bytes, tuple[str, frozenset[str], str]], alice: TestKey
) -> None:
    """Each original is there exactly once: in its folder, with its flags and date,
    encrypted (Drafts stay in clear)."""
    contents = mailbox.contents()
    seen: list[bytes] = []
    for folder, messages in contents.items():
        for _uid, flags, date, stored in messages:
            if folder == "Drafts":
                original = stored
            else:
                plaintext = decrypt_all(alice, armored_part(stored))
                [original] = [o for o in seeded if inner_entity(o) == plaintext]
                assert b"secret of" not in stored
                # The outer header is the original's, plus the marker (no content in it).
                assert re.search(rb"^X-Gpgfilter-Replaces: \d+\.\d+; [0-9a-f]{32}\r$", stored, re.M)
            assert seeded[original] == (folder, flags, date), folder
            seen.append(original)
    assert sorted(seen) == sorted(seeded), "a message was lost or is there twice"


def test_encrypts_every_folder_keeping_flags_dates_and_folders(
    dovecot: Dovecot, enrolled: Path, alice: TestKey
) -> None:
    mailbox = Mailbox(dovecot)
    seeded = seed(mailbox)
    dry = gpgfilter(enrolled, "mailbox", "encrypt", "--dry-run", USER)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"INBOX\tto encrypt 3\t", dry.stdout), dry.stdout
    assert re.search(r"Archive\tto encrypt 2\t", dry.stdout), dry.stdout
    assert "Drafts" in dry.stdout and "left in clear" in dry.stdout
    assert mailbox.contents()["INBOX"][0][3] in seeded  # a dry run changes nothing

    done = gpgfilter(enrolled, "mailbox", "encrypt", USER)
    assert done.returncode == 0, done.stderr
    assert "encrypted 6," in done.stderr, done.stderr  # one log line per user (no terminal)
    assert "secret" not in done.stderr + done.stdout and "note" not in done.stderr
    assert_all_encrypted(mailbox, seeded, alice)

    before = mailbox.contents()
    again = gpgfilter(enrolled, "mailbox", "encrypt", "--all")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert mailbox.contents() == before  # not one UID changed


def test_users_without_a_usable_key_or_mailbox_are_skipped_with_a_reason(
    dovecot: Dovecot, enrolled: Path
) -> None:
    done = gpgfilter(enrolled, "mailbox", "encrypt", "nokey@example.test")
    assert done.returncode == 0
    assert "nokey@example.test: skipped: no key registered" in done.stderr


@pytest.mark.parametrize("step", ["appended", "verified", "expunged"])
def test_sigkill_at_any_step_loses_nothing_and_the_rerun_finishes(
    dovecot: Dovecot, enrolled: Path, alice: TestKey, step: str
) -> None:
    mailbox = Mailbox(dovecot)
    seeded = seed(mailbox)
    killed = gpgfilter(enrolled, "mailbox", "encrypt", USER, kill=(step, 2))
    assert killed.returncode == -9, killed.stderr
    # Nothing lost meanwhile: each original is still there, in clear or as a copy.
    contents = mailbox.contents()
    clear = [m[3] for messages in contents.values() for m in messages if m[3] in seeded]
    copies = [m[3] for messages in contents.values() for m in messages if m[3] not in seeded]
    assert len(clear) + len(copies) in (len(seeded), len(seeded) + 1)
    rerun = gpgfilter(enrolled, "mailbox", "encrypt", USER)
    assert rerun.returncode == 0, rerun.stderr
    if step in ("appended", "verified"):
        assert "finished 1 left half done" in rerun.stderr, rerun.stderr
    assert_all_encrypted(mailbox, seeded, alice)


def test_a_forged_marker_never_removes_another_message(
    dovecot: Dovecot, enrolled: Path, alice: TestKey
) -> None:
    """Anyone can send a message with any header: a copy look-alike naming another message's
    UID must not make the run expunge that message as "already replaced"."""
    mailbox = Mailbox(dovecot)
    mailbox.append("INBOX", "", "01-Jan-2019 08:00:00 +0000", message(1, "INBOX"))
    assert gpgfilter(enrolled, "mailbox", "encrypt", USER).returncode == 0
    [(uid, _f, _d, copy)] = mailbox.contents()["INBOX"]
    victim = message(2, "INBOX")
    mailbox.append("INBOX", "", "02-Jan-2019 08:00:00 +0000", victim)
    victim_uid = uid + 1
    forged = re.sub(
        rb"X-Gpgfilter-Replaces: (\d+)\.\d+; [0-9a-f]{32}",
        lambda m: b"X-Gpgfilter-Replaces: " + m.group(1) + b".%d; " % victim_uid + b"0" * 32,
        copy,
    )
    mailbox.append("INBOX", "", "03-Jan-2019 08:00:00 +0000", forged)
    done = gpgfilter(enrolled, "mailbox", "encrypt", USER)
    assert done.returncode == 0, done.stderr
    texts = [decrypt_all(alice, armored_part(m[3])) for m in mailbox.contents()["INBOX"]]
    assert inner_entity(victim) in texts  # encrypted, not removed


def test_the_sweep_encrypts_what_a_client_appended_since_the_last_run(
    dovecot: Dovecot, enrolled: Path, alice: TestKey
) -> None:
    mailbox = Mailbox(dovecot)
    seeded = seed(mailbox)
    assert gpgfilter(enrolled, "mailbox", "encrypt", "--all").returncode == 0
    before = mailbox.contents()
    sent = message(99, "Sent")
    mailbox.append("Sent", "(\\Seen)", "08-Aug-2024 15:00:00 +0000", sent)
    seeded[sent] = ("Sent", frozenset({"\\Seen"}), "08-Aug-2024 15:00:00 +0000")
    swept = gpgfilter(enrolled, "mailbox", "encrypt", "--all", "--since-last")
    assert swept.returncode == 0, swept.stderr
    assert "encrypted 1," in swept.stderr, swept.stderr
    assert_all_encrypted(mailbox, seeded, alice)
    after = mailbox.contents()
    assert after["INBOX"] == before["INBOX"] and after["Archive"] == before["Archive"]


def test_delivery_through_the_filter_goes_on_during_a_run(tmp_path: Path, alice: TestKey) -> None:
    with Stack(tmp_path / "stack", mode="lmtp", users=[USER]) as stack:
        assert stack.filter is not None
        stack.filter.import_key(alice.public, USER)
        config = stack.filter.config_path
        config.write_text(
            config.read_text() + f"mailbox:\n  dovecot_config: {stack.dovecot.config_path}\n"
        )
        mailbox = Mailbox(stack.dovecot)
        seeded = {}
        for number in range(20):
            data = message(number, "INBOX")
            mailbox.append("INBOX", "(\\Seen)", "01-Jan-2019 08:00:00 +0000", data)
            seeded[number] = data
        run = threading.Thread(
            target=lambda: results.append(
                gpgfilter(config, "mailbox", "encrypt", "--throttle", "20", USER)
            )
        )
        results: list[subprocess.CompletedProcess[str]] = []
        run.start()
        delivered = [message(100 + n, "INBOX") for n in range(8)]
        for data in delivered:
            stack.postfix.send("bob@example.test", [USER], data)
        run.join(timeout=240)
        assert results and results[0].returncode == 0, results
        stored = stack.dovecot.wait_for(USER, 28)
        assert len(stored) == 28, "a message was lost or is there twice"
        texts = sorted(decrypt_all(alice, armored_part(m)) for m in stored)
        expected = sorted(inner_entity(m) for m in [*seeded.values(), *delivered])
        assert texts == expected


def test_enrolment_queues_the_address_and_the_sweep_encrypts_its_whole_mailbox(
    tmp_path: Path, dovecot: Dovecot, alice: TestKey
) -> None:
    """With mailbox.encrypt_on_enrolment, `keys import` queues the address; the sweep's
    `--queued` encrypts all of its mail (not only what came since a last sweep) and empties
    the queue. Off (the default), nothing is queued."""
    mailbox = Mailbox(dovecot)
    seeded = seed(mailbox)
    config = write_config(tmp_path / "gpgfilter", dovecot)
    # A sweep ran before the key existed: its state must not shorten the queued run.
    config.write_text(config.read_text() + "  encrypt_on_enrolment: true\n")
    queue = tmp_path / "gpgfilter" / "data" / "mailbox-queue"
    (tmp_path / "alice.asc").write_bytes(alice.public)
    done = gpgfilter(config, "keys", "import", "--address", USER, str(tmp_path / "alice.asc"))
    assert done.returncode == 0, done.stderr
    assert [p.read_text() for p in queue.iterdir()] == [f"{USER}\n"]

    sweep = gpgfilter(config, "mailbox", "encrypt", "--all", "--since-last", "--queued")
    assert sweep.returncode == 0, sweep.stderr
    assert_all_encrypted(mailbox, seeded, alice)
    assert list(queue.iterdir()) == []
    again = gpgfilter(config, "mailbox", "encrypt", "--queued")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again


def test_without_the_option_an_import_queues_nothing(enrolled: Path) -> None:
    assert not (enrolled.parent / "data" / "mailbox-queue").exists()
