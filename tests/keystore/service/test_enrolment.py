"""Encrypting the mail already stored, asked for with a key's upload: offered only when the
admin turned it on, carried by the pending change, acted on only once the owner confirms."""

from __future__ import annotations

from pathlib import Path

from gpgfilter.mailbox.queue import EnrolmentQueue
from tests.support.keyserver_harness import api_client, challenge_token, running_keyserver
from tests.support.openpgp_tools import KeyFactory


def _upload(address: str, key: bytes, **extra: object) -> dict[str, object]:
    return {"address": address, "key": key.decode("ascii"), **extra}


async def test_confirming_queues_the_address_only_when_asked_and_offered(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    lena = key_factory.make("lena@example.test")
    mia = key_factory.make("mia@example.test")
    on = {"mailbox.encrypt_on_enrolment": True}
    async with running_keyserver(tmp_path, **on) as ks, api_client(ks) as client:
        queue = EnrolmentQueue.under(ks.config.data_dir)
        assert await (await client.get("/api/v1/options")).json() == {"encrypt_existing": True}
        for bad in ("yes", 1, None, []):
            response = await client.post(
                "/api/v1/keys", json=_upload(lena.address, lena.public, encrypt_existing=bad)
            )
            assert response.status == 400, bad
            assert "encrypt_existing" in (await response.json())["message"]
        asked = _upload(lena.address, lena.public, encrypt_existing=True)
        assert (await client.post("/api/v1/keys", json=asked)).status == 202
        assert queue.addresses() == []  # nothing before the proof
        token = challenge_token(ks.relay, lena)
        assert (await client.post("/api/v1/confirm", json={"token": token})).status == 200
        assert queue.addresses() == [lena.address]

        # Not asked: confirmed, and nothing queued.
        assert (
            await client.post("/api/v1/keys", json=_upload(mia.address, mia.public))
        ).status == 202
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, mia)})
        assert ks.store.keys_for(mia.address)
        assert queue.addresses() == [lena.address]


async def test_off_by_default_the_request_is_refused_and_nothing_queued(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    lena = key_factory.make("lena@example.test")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        assert await (await client.get("/api/v1/options")).json() == {"encrypt_existing": False}
        asked = _upload(lena.address, lena.public, encrypt_existing=True)
        response = await client.post("/api/v1/keys", json=asked)
        assert response.status == 400
        assert (await response.json())["error"] == "not-offered"
        assert ks.store.pending_for(lena.address, 0) == []
        assert (
            await client.post("/api/v1/keys", json=_upload(lena.address, lena.public))
        ).status == 202
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, lena)})
        assert ks.store.keys_for(lena.address)
        assert not (ks.config.data_dir / "mailbox-queue").exists()


def test_the_queue_keeps_one_entry_per_address_and_ignores_strays(tmp_path: Path) -> None:
    queue = EnrolmentQueue(tmp_path / "queue")
    assert queue.addresses() == []
    queue.request("a@example.test")
    queue.request("a@example.test")
    queue.request("b@example.test")
    (tmp_path / "queue" / ".half-written").write_text("c@example.test\n")
    (tmp_path / "queue" / "forged").write_text("d@example.test\n")
    assert sorted(queue.addresses()) == ["a@example.test", "b@example.test"]
    queue.done("a@example.test")
    queue.done("a@example.test")
    assert queue.addresses() == ["b@example.test"]
