"""``gpgfilter keyserver`` as its own process: the API, the Web Key Directory and the Web Key
Service listener all come up from one configuration file, and stop on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gpgfilter.openpgp.engine import Plaintext, Recipient
from gpgfilter.process import keyserver
from gpgfilter.process.config import GpgConfig
from gpgfilter.process.keyserver import ThrowAwayEncryptor
from keystore.service.outbound import EncryptionFailed
from keystore.service.wkd import wkd_hash
from keystore.validate import validate_key
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import TestKey


def _get(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def test_keyserver_serves_api_wkd_and_wks(tmp_path: Path, alice: TestKey) -> None:
    http, wks = free_port(), free_port()
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nhostname: mail.example.test\ndomains: [example.test]\n"
        f"keyserver:\n  listen: 127.0.0.1:{http}\n  expiry_check_interval: 0\n"
        f"publication:\n  domains: [example.test]\n  wks_listen: 127.0.0.1:{wks}\n"
    )
    (tmp_path / "alice.asc").write_bytes(alice.public)
    command = [sys.executable, "-m", "gpgfilter", "-c", str(config)]
    subprocess.run([*command, "keys", "import", str(tmp_path / "alice.asc")], check=True)
    log = (tmp_path / "keyserver.log").open("wb")
    process = subprocess.Popen([*command, "keyserver"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = _get(f"http://127.0.0.1:{http}/api/v1/keys/alice@example.test")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200 and alice.fingerprint.encode() in body
        url = f"http://127.0.0.1:{http}/.well-known/openpgpkey/hu/{wkd_hash('alice')}?l=alice"
        status, key = _get(url, host="example.test")
        assert status == 200 and key[:1] and key[0] & 0x80  # binary OpenPGP
        status, address = _get(
            f"http://127.0.0.1:{http}/.well-known/openpgpkey/submission-address",
            host="example.test",
        )
        assert address.strip() == b"key-submission@example.test"
        with socket.create_connection(("127.0.0.1", wks), timeout=10) as conn:
            assert conn.recv(100).startswith(b"220")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        log.close()


async def test_key_service_mail_goes_through_the_filters_output_check(
    alice: TestKey, bob: TestKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Challenges and WKS mail are encrypted by the filter's engine and refused, like the
    filter's mail, when the engine's output is addressed to any other key."""
    alice_key = validate_key(alice.public).key
    bob_key = validate_key(bob.public).key
    real = ThrowAwayEncryptor(GpgConfig())
    to_bob = await real.armor(b"Content-Type: text/plain\r\n\r\nhi\r\n", bob_key)

    class WrongKeyEngine:
        async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
            return to_bob

    monkeypatch.setattr(keyserver, "make_engine", lambda *_a, **_k: WrongKeyEngine())
    with pytest.raises(EncryptionFailed, match="not addressed to exactly"):
        await real.pgp_mime(b"To: <a@example.org>\r\n", b"\r\nhi\r\n", alice_key)
