"""The signup flow in a real browser, through the real mail stack: Chromium makes the key with
OpenPGP.js, the user saves the private key and registers; the challenge travels through Postfix,
gpgfilter and Dovecot into the mailbox, where the user decrypts it with gpg and that key and
confirms; mail sent to the address afterwards is stored encrypted to the browser-made key.
Ticking "hide the Subject" and "also encrypt the mail I already have" on the way carries both
choices through the confirmation; later, the owner changes her header protection on the same
page, with a code mailed encrypted to her key, and the next message follows it.

The service runs on the test's event loop; selenium and IMAP block, so they run in a worker
thread.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gpgfilter.mailbox.queue import EnrolmentQueue
from keystore.service.http import OPENPGP_JS, PathOnlyAccessLogger
from keystore.storage.config import KeystoreConfig
from tests.support.debian import require_program, skip_unless_ci
from tests.support.e2e_stack import Stack
from tests.support.keyserver_harness import (
    TOKEN_IN_TEXT,
    Keyserver,
    ciphertext_of,
    parse,
    running_keyserver,
)
from tests.support.mailstack import require_mail_stack
from tests.support.openpgp_tools import TestKey, decrypt_gpg, stop_gpg_daemons
from tests.support.pgpmime_check import armored_part

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ADDRESS = "nina@example.test"
SENDER = "sender@example.test"


def _need_browser() -> str:
    chromium = require_program("chromium", "chromium")
    require_program(CHROMEDRIVER, "chromium-driver")
    if not OPENPGP_JS.is_file():
        skip_unless_ci("needs OpenPGP.js (run keystore/service/web/install)")
    return chromium


@dataclass
class Served:
    url: str
    keyserver: Keyserver
    stack: Stack


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Postfix → gpgfilter → Dovecot, and the key service sharing the filter's key store and
    mailing through that Postfix; the service is on the test's event loop (in the main thread,
    where asyncio can watch gpg subprocesses)."""
    require_mail_stack()
    _need_browser()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with Stack(tmp_path / "stack", mode="lmtp", users=[ADDRESS, SENDER]) as stack:
        assert stack.filter is not None
        overrides = {
            "keyserver.public_url": url,
            "keyserver.relay": f"127.0.0.1:{stack.postfix.smtp_port}",
            "data_dir": str(stack.filter.data_dir),
            "mailbox.encrypt_on_enrolment": True,  # the page offers the existing mail too
        }
        async with running_keyserver(tmp_path / "ks", **overrides) as ks:
            runner = web.AppRunner(ks.app, access_log_class=PathOnlyAccessLogger)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", port).start()
                yield Served(url, ks, stack)
            finally:
                await runner.cleanup()


def _wait_for(condition: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _key_from_browser(private: Path, address: str, home: Path) -> TestKey:
    """The browser-made key in a gpg home of its own, as its owner would import it."""
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
    subprocess.run([*gpg, "--import", str(private)], check=True, capture_output=True, timeout=60)
    listing = subprocess.run(
        [*gpg, "--with-colons", "--fixed-list-mode", "--list-secret-keys"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    records = [line.split(":") for line in listing.splitlines()]
    fingerprint = next(r[9] for r in records if r[0] == "fpr")
    primary = next(r for r in records if r[0] == "sec")
    subkeys = [r for r in records if r[0] == "ssb"]
    uids = [r[9] for r in records if r[0] == "uid"]
    # OpenPGP.js v6 defaults: a v4 Ed25519 primary key and a Curve25519 encryption subkey.
    assert primary[3] == "22" and primary[16] == "ed25519", primary
    assert len(subkeys) == 1 and subkeys[0][3] == "18" and subkeys[0][16] == "cv25519"
    assert "e" in subkeys[0][11]
    assert uids == [f"<{address}>"], uids
    packets = subprocess.run(
        [*gpg, "--list-packets", str(private)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "version 4" in packets and "version 6" not in packets
    public = subprocess.run(
        [*gpg, "--armor", "--export", fingerprint], check=True, capture_output=True, timeout=60
    ).stdout
    return TestKey(address, fingerprint, (), public, private.read_bytes(), home)


async def test_signup_with_a_key_made_in_the_browser(served: Served, tmp_path: Path) -> None:
    chromium = _need_browser()
    try:
        await asyncio.to_thread(_signup, chromium, served, tmp_path)
    finally:
        stop_gpg_daemons(tmp_path / "gnupg")  # the agent of the user's own gpg home


def _signup(chromium: str, served: Served, tmp_path: Path) -> None:
    """What the user does, in the browser and with gpg."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
        },
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        driver.get(served.url + "/")
        assert driver.find_element(By.ID, "gen-unavailable").is_displayed() is False
        driver.find_element(By.ID, "address").send_keys(ADDRESS)
        driver.find_element(By.ID, "generate").click()
        _wait_for(
            lambda: driver.find_element(By.ID, "generated").is_displayed(), what="key generation"
        )
        public = driver.find_element(By.ID, "key").get_property("value")
        assert isinstance(public, str) and "PUBLIC KEY BLOCK" in public
        assert "PRIVATE" not in public

        driver.find_element(By.ID, "download-private").click()
        driver.find_element(By.ID, "download-revocation").click()
        private = _wait_for(
            lambda: [p for p in downloads.glob("*private-key.asc")], what="the private key file"
        )[0]
        revocation = _wait_for(
            lambda: [p for p in downloads.glob("*revocation-certificate.asc")],
            what="the revocation certificate file",
        )[0]
        assert private.read_bytes().startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----")
        assert b"BEGIN PGP PUBLIC KEY BLOCK" in revocation.read_bytes()

        hide = driver.find_element(By.ID, "hide-subject")
        assert not hide.is_selected()  # nothing is hidden unless the owner asks
        hide.click()
        existing = driver.find_element(By.ID, "encrypt-existing")
        _wait_for(existing.is_displayed, what="the offer to encrypt the existing mail")
        assert not existing.is_selected()  # nothing irreversible unless the owner asks
        existing.click()
        driver.find_element(By.ID, "register").click()
        result = driver.find_element(By.ID, "result")
        _wait_for(lambda: "was sent to" in result.text, what="the registration answer")
        store = served.keyserver.store
        assert store.keys_for(ADDRESS) == []

        key = _key_from_browser(private, ADDRESS, tmp_path / "gnupg")
        [pending] = store.pending_for(ADDRESS, int(time.time()))
        assert pending.key.fingerprint == key.fingerprint
        assert pending.header_protection == "hide-subject"
        assert pending.encrypt_existing
        queue = EnrolmentQueue.under(served.keyserver.config.data_dir)
        assert queue.addresses() == []  # nothing before the proof
        # The challenge, from the mailbox: Postfix → gpgfilter (already encrypted) → Dovecot.
        [stored] = served.stack.dovecot.wait_for(ADDRESS, 1, timeout=60)
        plaintext = decrypt_gpg(key, ciphertext_of(parse(stored)))
        found = TOKEN_IN_TEXT.search(plaintext.decode("utf-8"))
        assert found, "no token in the decrypted challenge"
        token = found.group(1)

        driver.get(f"{served.url}/confirm#token={token}")
        field = driver.find_element(By.ID, "token")
        _wait_for(lambda: field.get_property("value") == token, what="the token from the link")
        assert "token" not in driver.current_url  # taken out of the address bar
        assert store.keys_for(ADDRESS) == []  # opening the page changed nothing
        driver.find_element(By.ID, "confirm-button").click()
        confirm_result = driver.find_element(By.ID, "result")
        _wait_for(lambda: "now registered" in confirm_result.text, what="the confirmation")
    finally:
        driver.quit()
    assert queue.addresses() == [ADDRESS]  # the next sweep encrypts what she has
    [active] = store.keys_for(ADDRESS)
    assert active.fingerprint == key.fingerprint and active.usable_encryption_keys()
    assert store.keys_for(ADDRESS).settings.header_protection == "hide-subject"

    # From now on the filter encrypts this user's mail to the browser-made key.
    message = (
        f"From: {SENDER}\r\nTo: {ADDRESS}\r\nSubject: welcome\r\n"
        "Message-ID: <after-signup@example.test>\r\n\r\nonly nina can read this\r\n"
    ).encode()
    served.stack.postfix.send(SENDER, [ADDRESS], message)
    mailbox = _wait_for(
        lambda: [m for m in served.stack.dovecot.fetch_all(ADDRESS) if b"<after-signup@" in m],
        what="the mail sent after signup",
    )
    assert b"only nina can read this" not in mailbox[0]
    inner = decrypt_gpg(key, armored_part(mailbox[0]))
    assert b"only nina can read this" in inner
    # The Subject she chose to hide: [...] on the server, the real one inside.
    assert b"\r\nSubject: [...]\r\n" in mailbox[0] and b"welcome" not in mailbox[0]
    assert b"\r\nSubject: welcome\r\n" in inner and b'hp="cipher"' in inner

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        _change_later(driver, served, key)
    finally:
        driver.quit()
    # The running filter kept her keys and setting; the change reaches it within
    # keystore.lookup_cache (1 s by default).
    time.sleep(KeystoreConfig().lookup_cache + 0.1)
    served.stack.postfix.send(SENDER, [ADDRESS], message.replace(b"<after-signup@", b"<later@"))
    later = _wait_for(
        lambda: [m for m in served.stack.dovecot.fetch_all(ADDRESS) if b"<later@" in m],
        what="the mail sent after the change",
    )
    assert b"\r\nSubject: welcome\r\n" in later[0] and b"only nina" not in later[0]
    assert b"hp=" not in decrypt_gpg(key, armored_part(later[0]))


def _change_later(driver: Any, served: Served, key: TestKey) -> None:
    """Back on the page, she asks for the Subject to stay readable after all: a mail encrypted
    to her key carries the code, and only its confirmation changes anything."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    store = served.keyserver.store
    before = len(served.stack.dovecot.fetch_all(ADDRESS))
    driver.get(served.url + "/")
    driver.find_element(By.ID, "protect-address").send_keys(ADDRESS)
    Select(driver.find_element(By.ID, "protect-setting")).select_by_value("off")
    driver.find_element(By.ID, "protect-button").click()
    result = driver.find_element(By.ID, "protect-result")
    _wait_for(lambda: "was sent to" in result.text, what="the change request's answer")
    assert store.keys_for(ADDRESS).settings.header_protection == "hide-subject"
    stored = served.stack.dovecot.wait_for(ADDRESS, before + 1, timeout=60)[-1]
    found = TOKEN_IN_TEXT.search(decrypt_gpg(key, ciphertext_of(parse(stored))).decode())
    assert found, "no token in the decrypted mail"
    driver.get(f"{served.url}/confirm#token={found.group(1)}")
    driver.find_element(By.ID, "confirm-button").click()
    confirmed = driver.find_element(By.ID, "result")
    _wait_for(lambda: "was changed" in confirmed.text, what="the confirmation")
    assert store.keys_for(ADDRESS).settings.header_protection == "off"
