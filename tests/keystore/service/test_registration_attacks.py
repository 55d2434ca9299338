"""Attacks on the running ``gpgfilter keyserver`` process, step by step, with keys made by gpg.

Each test is what a stranger (or a stale token) could do over HTTP on loopback, and checks the
key store the filter reads afterwards: a stored key only moves forward, a token works only for
the state it was issued against, challenges go only into the served domains, and a stranger's
refused uploads never lock the owner out of updating or revoking their key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from keystore.model import StoredKey
from keystore.storage.sqlite import SQLiteKeyStore
from tests.support.fakes import Downstream
from tests.support.keyserver_harness import PUBLIC_URL, challenge_token, mails_to
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import KeyFactory, TestKey


@dataclass
class Running:
    url: str
    relay: Downstream
    store_path: Path
    session: aiohttp.ClientSession

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.url + path, json=body) as response:
            return response.status, await response.json()

    async def upload(self, address: str, key: bytes) -> tuple[int, dict[str, Any]]:
        return await self.post("/api/v1/keys", {"address": address, "key": key.decode()})

    async def confirm(self, token: str) -> tuple[int, dict[str, Any]]:
        return await self.post("/api/v1/confirm", {"token": token})

    async def register(self, key: TestKey) -> None:
        """Upload and confirm as the owner does: the challenge is decrypted with the key."""
        status, body = await self.upload(key.address, key.public)
        assert status == 202, body
        status, body = await self.confirm(challenge_token(self.relay, key))
        assert status == 200 and body["status"] in ("registered", "replaced"), body

    def stored(self, address: str) -> list[StoredKey]:
        """What the filter would read for ``address`` now."""
        store = SQLiteKeyStore(self.store_path)
        try:
            return store.keys_for(address)
        finally:
            store.close()


def _yaml(tmp_path: Path, http: int, relay: int, per_address: int) -> Path:
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nhostname: mx.example.test\ndomains: [example.test]\n"
        f"keyserver:\n  listen: 127.0.0.1:{http}\n  relay: 127.0.0.1:{relay}\n"
        f"  public_url: {PUBLIC_URL}\n  expiry_check_interval: 0\n"
        f"  rate_limit:\n    per_address: {per_address}\n"
    )
    return config


@asynccontextmanager
async def keyserver(tmp_path: Path, *, per_address: int = 5) -> AsyncIterator[Running]:
    """``gpgfilter keyserver`` as its own process, relaying its mail to a fake SMTP server."""
    relay = Downstream(lmtp=False)
    await relay.start()
    http = free_port()
    config = _yaml(tmp_path, http, relay.port, per_address)
    log = (tmp_path / "keyserver.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gpgfilter", "-c", str(config), "keyserver"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(url + "/api/v1/openapi.yaml") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert process.poll() is None, (tmp_path / "keyserver.log").read_text()
                assert time.monotonic() < deadline, "the key service did not come up"
                await asyncio.sleep(0.1)
            yield Running(url, relay, tmp_path / "data" / "keys.sqlite", session)
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 20)
        log.close()
        await relay.stop()


async def test_an_old_copy_cannot_bring_back_a_revoked_subkey(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    dave = key_factory.make("dave@example.test")
    (first_subkey,) = dave.encryption_subkeys
    async with keyserver(tmp_path) as ks:
        await ks.register(dave)
        # Dave rotates: a new subkey, the old one revoked, and uploads the result.
        rotated = key_factory.revoke_subkey(key_factory.add_encryption_subkey(dave), first_subkey)
        (second_subkey,) = rotated.encryption_subkeys
        status, body = await ks.upload(dave.address, rotated.public)
        assert (status, body["status"]) == (200, "renewed")
        (stored,) = ks.stored(dave.address)
        assert [k.fingerprint for k in stored.encryption_keys] == [second_subkey]
        # Anyone posts the old public copy: nothing moves back.
        status, body = await ks.upload(dave.address, dave.public)
        assert (status, body["status"]) == (200, "unchanged"), body
        (stored,) = ks.stored(dave.address)
        assert stored.usable_encryption_keys() == (second_subkey,)


async def test_an_old_copy_cannot_bring_back_an_earlier_expiry(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    old = key_factory.make("olga@example.test", expires="1y")
    async with keyserver(tmp_path) as ks:
        await ks.register(old)
        (registered,) = ks.stored(old.address)
        extended = key_factory.set_expiry(old, "3y")
        status, body = await ks.upload(old.address, extended.public)
        assert (status, body["status"]) == (200, "renewed")
        (renewed,) = ks.stored(old.address)
        assert renewed.expires and registered.expires and renewed.expires > registered.expires
        status, body = await ks.upload(old.address, old.public)
        assert (status, body["status"]) == (200, "unchanged"), body
        (stored,) = ks.stored(old.address)
        assert stored.expires == renewed.expires
        assert [k.expires for k in stored.encryption_keys] == [
            k.expires for k in renewed.encryption_keys
        ]


async def test_a_confirmation_token_dies_when_another_change_lands(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    first = key_factory.make("erin@example.test")
    second = key_factory.make("erin@example.test")
    async with keyserver(tmp_path) as ks:
        assert (await ks.upload(first.address, first.public))[0] == 202
        stale = challenge_token(ks.relay, first)
        assert (await ks.upload(second.address, second.public))[0] == 202
        status, body = await ks.confirm(challenge_token(ks.relay, second))
        assert (status, body["status"]) == (200, "registered")
        status, body = await ks.confirm(stale)
        assert (status, body["error"]) == (410, "token-invalid"), body
        assert [k.fingerprint for k in ks.stored(first.address)] == [second.fingerprint]


async def test_a_withdrawal_token_cannot_undo_a_revocation(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    wendy = key_factory.make("wendy@example.test")
    async with keyserver(tmp_path) as ks:
        await ks.register(wendy)
        status, body = await ks.post("/api/v1/withdraw", {"address": wendy.address})
        assert status == 202, body
        withdrawal = challenge_token(ks.relay, wendy)
        status, body = await ks.upload(wendy.address, key_factory.revocation_certificate(wendy))
        assert (status, body["status"]) == (200, "revoked")
        status, body = await ks.confirm(withdrawal)
        assert (status, body["error"]) == (410, "token-invalid"), body
        (stored,) = ks.stored(wendy.address)
        assert stored.revoked  # still bound: mail for wendy stays held
        # Nor can a new withdrawal be asked for: the revocation stays until a new key comes.
        status, body = await ks.post("/api/v1/withdraw", {"address": wendy.address})
        assert (status, body["error"]) == (409, "revoked-key-stays"), body


async def test_challenges_go_only_to_base_addresses_of_the_served_domains(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    outsider = key_factory.make("someone@gmail.example")
    tagged = key_factory.make("alice+tag@example.test")
    async with keyserver(tmp_path) as ks:
        status, body = await ks.upload(outsider.address, outsider.public)
        assert (status, body["error"]) == (422, "foreign-domain"), body
        assert "example.test" in body["message"]
        status, body = await ks.upload(tagged.address, tagged.public)
        assert (status, body["error"]) == (422, "sub-address"), body
        assert "alice@example.test" in body["message"]
        async with ks.session.get(ks.url + "/api/v1/keys/someone@gmail.example") as response:
            assert response.status == 422
        assert ks.relay.deliveries == []


async def test_a_strangers_refused_uploads_do_not_lock_the_owner_out(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    owner = key_factory.make("olive@example.test")
    async with keyserver(tmp_path, per_address=2) as ks:
        await ks.register(owner)  # one challenge: counts
        for _ in range(4):
            status, body = await ks.upload(owner.address, b"garbage")
            assert status == 422, body
        updated = key_factory.add_encryption_subkey(owner)
        status, body = await ks.upload(owner.address, updated.public)
        assert (status, body["status"]) == (200, "renewed"), body
        status, body = await ks.upload(owner.address, key_factory.revocation_certificate(owner))
        assert (status, body["status"]) == (200, "revoked"), body
        assert len([m for m in mails_to(ks.relay, owner.address)]) >= 1


def test_the_key_service_does_not_start_without_its_domains(tmp_path: Path) -> None:
    config = _yaml(tmp_path, free_port(), free_port(), 5)
    config.write_text(config.read_text().replace("domains: [example.test]\n", ""))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gpgfilter", "-c", str(config), "keyserver"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the key service started without knowing its domains") from None
    assert done.returncode != 0
    assert b"domains: required by the key service" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_a_revoked_key_cannot_come_back_after_it_was_replaced(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    """Whoever holds the secret of a revoked key (its thief, say) tries to register an old
    copy without the revocation once a new key replaced it and its stored copy is gone."""
    kim = key_factory.make_multi_uid(["kim@example.test", "kim.b@example.test"])
    successor = key_factory.make("kim@example.test")
    async with keyserver(tmp_path) as ks:
        await ks.register(kim)
        # A challenge for the key's other address, mailed before the revocation.
        status, body = await ks.upload("kim.b@example.test", kim.public)
        assert status == 202, body
        early = challenge_token(ks.relay, kim, "kim.b@example.test")
        status, body = await ks.upload(kim.address, key_factory.revocation_certificate(kim))
        assert (status, body["status"]) == (200, "revoked"), body
        await ks.register(successor)
        assert [k.fingerprint for k in ks.stored(kim.address)] == [successor.fingerprint]
        mails = len(ks.relay.deliveries)
        for address in (kim.address, "kim.b@example.test"):
            status, body = await ks.upload(address, kim.public)
            assert (status, body["error"]) == (422, "key-revoked"), body
            assert "revoked" in body["message"]
        assert len(ks.relay.deliveries) == mails  # no challenge went out
        status, body = await ks.confirm(early)
        assert (status, body["error"]) == (422, "key-revoked"), body
        assert [k.fingerprint for k in ks.stored(kim.address)] == [successor.fingerprint]
        assert ks.stored("kim.b@example.test") == []
