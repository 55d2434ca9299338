"""The key registration service through its HTTP API, with real keys and a fake SMTP relay.

Each refusal must change nothing; each change must be audited and announced. The challenge is
decrypted with gpg and the key's secret, as its owner would.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from click.testing import CliRunner

from gpgfilter.process.cli import main
from keystore import registration
from keystore.service import http as server
from keystore.service.http import Settings, client_ip
from keystore.validate import validate_key
from tests.support.keyserver_harness import (
    ADMIN_TOKEN,
    PUBLIC_URL,
    api_client,
    challenge_token,
    ciphertext_of,
    mails_to,
    product_log,
    running_keyserver,
)
from tests.support.openpgp_tools import (
    KeyFactory,
    TestKey,
    ToolError,
    decrypt_gpg,
    packet_recipients,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _upload(key: TestKey | bytes, address: str) -> dict[str, str]:
    data = key if isinstance(key, bytes) else key.public
    return {"address": address, "key": data.decode("ascii")}


def _gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    done = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
         "--passphrase", "", *args],
        input=stdin, capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    return done.stdout


def _revocation_certificate(key: TestKey) -> bytes:
    """The certificate gpg wrote when it made the key, made importable."""
    cert = (key.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_bytes()
    return cert.replace(b"\n:-----BEGIN", b"\n-----BEGIN")


async def test_register_only_after_the_owner_decrypts_the_challenge(
    tmp_path: Path, key_factory: KeyFactory, bob: TestKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    carol = key_factory.make("carol@example.test")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        response = await client.post("/api/v1/keys", json=_upload(carol, "Carol@Example.test"))
        assert response.status == 202
        body = await response.json()
        assert body["status"] == "pending" and body["fingerprint"] == carol.fingerprint
        assert "was sent to carol@example.test" in body["message"]
        assert ks.store.keys_for("carol@example.test") == []
        status = await (await client.get("/api/v1/keys/carol@example.test")).json()
        assert status == {"address": "carol@example.test", "key": None, "pending": True}

        # The challenge: RFC 3156, addressed to exactly the uploaded key, unreadable otherwise.
        [challenge] = mails_to(ks.relay, "carol@example.test")
        assert challenge["From"] == "keyserver@mx.example.test"
        armored = ciphertext_of(challenge)
        assert packet_recipients(armored) == {f[-16:] for f in carol.encryption_subkeys}
        with pytest.raises(ToolError):
            decrypt_gpg(bob, armored)
        token = challenge_token(ks.relay, carol)
        assert token.encode() not in ks.relay.deliveries[0].data
        assert f"{PUBLIC_URL}/confirm#token={token}" in decrypt_gpg(carol, armored).decode()

        response = await client.post("/api/v1/confirm", json={"token": token})
        assert response.status == 200
        assert (await response.json())["status"] == "registered"
        [key] = ks.store.keys_for("carol@example.test")
        assert key.fingerprint == carol.fingerprint
        status = await (await client.get("/api/v1/keys/carol@example.test")).json()
        assert status["key"]["fingerprint"] == carol.fingerprint and status["pending"] is False

        # The token worked once.
        again = await client.post("/api/v1/confirm", json={"token": token})
        assert again.status == 410 and (await again.json())["error"] == "token-invalid"

        [entry] = ks.store.audit_log("carol@example.test")
        assert (entry.action, entry.fingerprint, entry.actor) == (
            "registered",
            carol.fingerprint,
            "self-service",
        )
        notice = mails_to(ks.relay, "carol@example.test")[-1]
        assert notice.get_content_type() == "text/plain"
        assert notice["Subject"] == "An OpenPGP key was registered for your address"
        assert token not in product_log(caplog.records)
        assert "PGP" not in product_log(caplog.records)  # no key material, no ciphertext


async def test_foreign_address_wrong_and_expired_tokens_change_nothing(
    tmp_path: Path, key_factory: KeyFactory, alice: TestKey
) -> None:
    mallory = key_factory.make("dave@example.test", name="Not Dave")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        # A key without a user ID for the address is refused outright.
        response = await client.post("/api/v1/keys", json=_upload(alice, "dave@example.test"))
        assert response.status == 422 and (await response.json())["error"] == "key-rejected"
        # One with a forged user ID waits for a challenge its uploader cannot read (mail goes
        # to the real owner's mailbox): guessing tokens gets nowhere.
        response = await client.post("/api/v1/keys", json=_upload(mallory, "dave@example.test"))
        assert response.status == 202
        for guess in (secrets.token_urlsafe(32), "x" * 43):
            response = await client.post("/api/v1/confirm", json={"token": guess})
            assert response.status == 410
        for malformed in ("short", "a" * 44, "../../etc"):
            response = await client.post("/api/v1/confirm", json={"token": malformed})
            assert response.status == 400
            assert (await response.json())["error"] == "token-malformed"
        response = await client.post("/api/v1/confirm", json={})
        assert response.status == 400
        assert ks.store.keys_for("dave@example.test") == []

        # Expired: the real token, once its lifetime is over.
        token = challenge_token(ks.relay, mallory, "dave@example.test")
        ks.registry.clock = lambda: time.time() + ks.config.keyserver.token_ttl + 1
        response = await client.post("/api/v1/confirm", json={"token": token})
        assert response.status == 410
        assert ks.store.keys_for("dave@example.test") == []
        assert ks.store.audit_log("dave@example.test") == []


async def test_a_replacement_waits_for_proof_and_the_old_key_stays_active(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    old = key_factory.make("erin@example.test")
    new = key_factory.make("erin@example.test", algo="rsa2048")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        await client.post("/api/v1/keys", json=_upload(old, old.address))
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, old)})

        response = await client.post("/api/v1/keys", json=_upload(new, new.address))
        assert response.status == 202
        assert [k.fingerprint for k in ks.store.keys_for(old.address)] == [old.fingerprint]
        # The old key's holder cannot read the replacement's challenge.
        with pytest.raises(ToolError):
            challenge_token(ks.relay, old)
        response = await client.post(
            "/api/v1/confirm", json={"token": challenge_token(ks.relay, new)}
        )
        assert (await response.json())["status"] == "replaced"
        assert [k.fingerprint for k in ks.store.keys_for(old.address)] == [new.fingerprint]
        actions = [e.action for e in ks.store.audit_log(old.address)]
        assert actions == ["replaced", "registered"]
        subject = mails_to(ks.relay, old.address)[-1]["Subject"]
        assert subject == "The OpenPGP key for your address was replaced"


async def test_refused_uploads(
    tmp_path: Path,
    key_factory: KeyFactory,
    alice: TestKey,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    expired = key_factory.make_expired("frank@example.test")
    sign_only = key_factory.make_sign_only("frank@example.test")
    short_lived = key_factory.make("frank@example.test", expires="3d")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        # A secret key: refused, neither echoed nor logged.
        response = await client.post("/api/v1/keys", json=_upload(alice.secret, alice.address))
        assert response.status == 422
        text = await response.text()
        assert "secret key" in text and "PRIVATE" not in text
        secret_lines = [ln for ln in alice.secret.decode().splitlines()[2:-2] if len(ln) > 20]
        assert not any(line in product_log(caplog.records) or line in text for line in secret_lines)

        for key, why in (
            (expired, "expired"),
            (sign_only, "encryption"),
            (short_lived, "within 7 days"),
        ):
            response = await client.post("/api/v1/keys", json=_upload(key, key.address))
            assert response.status == 422, why
            assert why in (await response.json())["message"]

        for body in ({"address": "not an address", "key": "x"}, {"address": "a@b.test"}, []):
            response = await client.post("/api/v1/keys", json=body)
            assert response.status in (400, 422)
        response = await client.post("/api/v1/keys", data=b"{not json")
        assert response.status == 400

        # 10 MB: refused before anything parses it.
        def no_parsing(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("parsed an oversized upload")

        monkeypatch.setattr(registration, "validate_key", no_parsing)
        monkeypatch.setattr(registration, "looks_like_revocation", no_parsing)
        blob = "A" * (10 * 1024 * 1024)
        response = await client.post("/api/v1/keys", json={"address": alice.address, "key": blob})
        assert response.status == 413
        assert (await response.json())["error"] == "too-large"
        just_over = "A" * (ks.config.keyserver.max_key_bytes + 1)
        response = await client.post(
            "/api/v1/keys", json={"address": alice.address, "key": just_over}
        )
        assert response.status == 413
        assert ks.relay.deliveries == []
        assert ks.store.audit_log() == []


async def test_a_flooded_key_is_accepted_without_its_flood(
    tmp_path: Path, key_factory: KeyFactory
) -> None:
    grace = key_factory.make("grace@example.test")
    flooded = key_factory.flooded(grace, count=1500)
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        response = await client.post("/api/v1/keys", json=_upload(flooded, grace.address))
        assert response.status == 202
        [pending] = ks.store.pending_for(grace.address, int(time.time()))
        assert len(flooded) > 100_000 and len(pending.key.key_data) < 2_000
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, grace)})
        [key] = ks.store.keys_for(grace.address)
        assert key.key_data == pending.key.key_data


async def test_renewal_is_taken_at_once(tmp_path: Path, key_factory: KeyFactory) -> None:
    heidi = key_factory.make("heidi@example.test", expires="1y")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        await client.post("/api/v1/keys", json=_upload(heidi, heidi.address))
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, heidi)})
        [before] = ks.store.keys_for(heidi.address)

        same = await client.post("/api/v1/keys", json=_upload(heidi, heidi.address))
        assert (await same.json())["status"] == "unchanged"

        _gpg(heidi.home, "--quick-set-expire", heidi.fingerprint, "3y")
        _gpg(heidi.home, "--quick-set-expire", heidi.fingerprint, "3y", "*")
        renewed = _gpg(heidi.home, "--armor", "--export", heidi.fingerprint)
        mails = len(ks.relay.deliveries)
        response = await client.post("/api/v1/keys", json=_upload(renewed, heidi.address))
        assert response.status == 200
        assert (await response.json())["status"] == "renewed"
        [after] = ks.store.keys_for(heidi.address)
        assert after.fingerprint == before.fingerprint
        assert before.expires is not None and after.expires is not None
        assert after.expires > before.expires + 365 * 86400
        # No challenge, one notice.
        [notice] = [parse_mail.data for parse_mail in ks.relay.deliveries[mails:]]
        assert b"Subject: The OpenPGP key for your address was renewed" in notice
        assert ks.store.audit_log(heidi.address)[0].action == "renewed"


@pytest.mark.parametrize("form", ["certificate", "revoked-copy"])
async def test_a_revocation_deactivates_the_active_key(
    tmp_path: Path, key_factory: KeyFactory, form: str
) -> None:
    ivan = key_factory.make("ivan@example.test")
    other = key_factory.make("ivan@example.test")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        # Not registered yet: a revocation has nothing to act on.
        response = await client.post(
            "/api/v1/keys", json=_upload(_revocation_certificate(ivan), ivan.address)
        )
        assert response.status == 422
        await client.post("/api/v1/keys", json=_upload(ivan, ivan.address))
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, ivan)})
        # Another key's revocation does not touch it.
        response = await client.post(
            "/api/v1/keys", json=_upload(_revocation_certificate(other), ivan.address)
        )
        assert response.status == 422
        assert (await response.json())["error"] == "revocation-unmatched"
        assert not ks.store.keys_for(ivan.address)[0].revoked

        data = _revocation_certificate(ivan)
        if form == "revoked-copy":
            _gpg(ivan.home, "--import", stdin=data)
            data = _gpg(ivan.home, "--armor", "--export", ivan.fingerprint)
        response = await client.post("/api/v1/keys", json=_upload(data, ivan.address))
        assert response.status == 200
        assert (await response.json())["status"] == "revoked"
        [key] = ks.store.keys_for(ivan.address)
        assert key.revoked and key.usable_encryption_keys() == ()
        assert ks.store.audit_log(ivan.address)[0].action == "revoked"
        assert mails_to(ks.relay, ivan.address)[-1]["Subject"] == (
            "The OpenPGP key for your address was revoked"
        )
        status = await (await client.get(f"/api/v1/keys/{ivan.address}")).json()
        assert status["key"]["revoked"] is True
        # A revoked key cannot come back as a "renewal".
        response = await client.post("/api/v1/keys", json=_upload(ivan, ivan.address))
        assert response.status == 422


async def test_withdrawal_needs_the_active_keys_holder(
    tmp_path: Path, key_factory: KeyFactory, bob: TestKey
) -> None:
    judy = key_factory.make("judy@example.test")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        response = await client.post("/api/v1/withdraw", json={"address": judy.address})
        assert response.status == 404
        await client.post("/api/v1/keys", json=_upload(judy, judy.address))
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, judy)})

        response = await client.post("/api/v1/withdraw", json={"address": judy.address})
        assert response.status == 202
        challenge = mails_to(ks.relay, judy.address)[-1]
        assert challenge["Subject"] == "Confirm the withdrawal of your OpenPGP key"
        with pytest.raises(ToolError):
            decrypt_gpg(bob, ciphertext_of(challenge))
        assert ks.store.keys_for(judy.address)  # nothing changed yet
        token = challenge_token(ks.relay, judy)
        response = await client.post("/api/v1/confirm", json={"token": token})
        assert (await response.json())["status"] == "withdrawn"
        assert ks.store.keys_for(judy.address) == []
        assert [e.action for e in ks.store.audit_log(judy.address)] == ["withdrawn", "registered"]
        assert mails_to(ks.relay, judy.address)[-1]["Subject"] == (
            "The OpenPGP key for your address was withdrawn"
        )


async def test_rate_limits(tmp_path: Path, alice: TestKey) -> None:
    limits = {"keyserver.rate_limit.per_address": 2, "keyserver.rate_limit.per_client": 5}
    async with running_keyserver(tmp_path, **limits) as ks, api_client(ks) as client:
        for _ in range(2):
            response = await client.post("/api/v1/keys", json=_upload(alice, alice.address))
            assert response.status == 202
        response = await client.post("/api/v1/keys", json=_upload(alice, alice.address))
        assert response.status == 429
        assert response.headers["Retry-After"] == "3600"
        assert (await response.json())["error"] == "rate-limited"
        assert len(ks.relay.deliveries) == 2
        # Per client: other addresses, same client.
        for n in range(2):
            response = await client.get(f"/api/v1/keys/x{n}@example.test")
            assert response.status == 200
        response = await client.get("/api/v1/keys/x9@example.test")
        assert response.status == 429
        # The admin API is not counted against clients.
        response = await client.get("/api/v1/admin/audit", headers=ADMIN)
        assert response.status == 200


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    settings = Settings(trusted_proxies=("127.0.0.1", "10.0.0.0/8"))

    def ip(peer: str, forwarded: str | None) -> str:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        request = make_mocked_request("GET", "/", headers=headers)
        request._transport_peername = (peer, 1234)  # type: ignore[attr-defined]
        return client_ip(request.clone(remote=peer), settings)

    assert ip("127.0.0.1", "198.51.100.7") == "198.51.100.7"
    assert ip("127.0.0.1", "203.0.113.1, 10.1.2.3, 198.51.100.7") == "198.51.100.7"
    assert ip("127.0.0.1", "198.51.100.7, 10.1.2.3") == "198.51.100.7"
    assert ip("192.0.2.9", "198.51.100.7") == "192.0.2.9"  # not a proxy: header ignored
    assert ip("127.0.0.1", None) == "127.0.0.1"


async def test_admin_api(tmp_path: Path, key_factory: KeyFactory, alice: TestKey) -> None:
    kim = key_factory.make("other-name@example.test")  # no user ID for the address: allowed
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        url = "/api/v1/admin/keys/kim@example.test"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
            response = await client.put(url, json=_upload(kim, ""), headers=headers)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await client.get("/api/v1/admin/audit", headers=headers)).status == 401
            assert (await client.delete(url, headers=headers)).status == 401
        assert ks.store.keys_for("kim@example.test") == []

        response = await client.put(url, json={"key": kim.public.decode()}, headers=ADMIN)
        assert response.status == 200
        assert (await response.json())["status"] == "registered"
        assert [k.fingerprint for k in ks.store.keys_for("kim@example.test")] == [kim.fingerprint]
        assert mails_to(ks.relay, "kim@example.test")[-1]["Subject"] == (
            "An OpenPGP key was registered for your address"
        )
        response = await client.put(url, json={"key": alice.secret.decode()}, headers=ADMIN)
        assert response.status == 422

        response = await client.get(
            "/api/v1/admin/audit", params={"address": "kim@example.test"}, headers=ADMIN
        )
        [entry] = (await response.json())["entries"]
        assert entry["action"] == "registered" and entry["actor"] == "admin-api"

        response = await client.delete(url, headers=ADMIN)
        assert (await response.json())["status"] == "withdrawn"
        assert ks.store.keys_for("kim@example.test") == []
        assert (await client.delete(url, headers=ADMIN)).status == 404

    async with (
        running_keyserver(tmp_path / "off", **{"keyserver.admin_token_file": None}) as ks,
        api_client(ks) as client,
    ):
        response = await client.get("/api/v1/admin/audit", headers=ADMIN)
        assert response.status == 404


async def test_a_failed_challenge_mail_leaves_nothing_pending(
    tmp_path: Path, alice: TestKey
) -> None:
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        ks.relay.rcpt_codes[alice.address] = "450 4.2.0 mailbox busy"
        response = await client.post("/api/v1/keys", json=_upload(alice, alice.address))
        assert response.status == 503
        assert (await response.json())["error"] == "mail-failed"
        assert ks.store.pending_for(alice.address, int(time.time())) == []


async def test_expiry_notices_go_out_once(tmp_path: Path, key_factory: KeyFactory) -> None:
    soon = key_factory.make("leo@example.test", expires="10d")
    later = key_factory.make("mia@example.test", expires="1y")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        for key in (soon, later):
            await client.put(
                f"/api/v1/admin/keys/{key.address}", json=_upload(key, ""), headers=ADMIN
            )
        before = len(ks.relay.deliveries)
        assert await ks.registry.notify_expiry() == 1
        [notice] = mails_to(ks.relay, soon.address)[-1:]
        assert notice["Subject"] == "Your OpenPGP key expires soon"
        assert len(ks.relay.deliveries) == before + 1
        assert await ks.registry.notify_expiry() == 0

        ks.registry.clock = lambda: time.time() + 11 * 86400
        assert await ks.registry.notify_expiry() == 1
        assert mails_to(ks.relay, soon.address)[-1]["Subject"] == "Your OpenPGP key has expired"
        assert await ks.registry.notify_expiry() == 0


async def test_tokens_and_queries_stay_out_of_the_access_log(
    tmp_path: Path, alice: TestKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        await client.post("/api/v1/keys", json=_upload(alice, alice.address))
        token = challenge_token(ks.relay, alice)
        await client.get(f"/confirm?token={token}")
        await client.post("/api/v1/confirm", json={"token": token})
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any('"GET /confirm"' in line for line in access), access
    assert token not in product_log(caplog.records)


async def test_pages_are_self_contained_and_strict(tmp_path: Path) -> None:
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        for path in ("/", "/confirm"):
            response = await client.get(path)
            assert response.status == 200
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            page = await response.text()
            assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"
            assert "http://" not in page and "https://" not in page, "external resource"
        for asset in ("app.js", "confirm.js", "style.css"):
            assert (await client.get(f"/static/{asset}")).status == 200
        assert (await client.get("/static/../service.py")).status == 404
        assert (await client.get("/confirm", allow_redirects=False)).status == 200

    missing = tmp_path / "none.mjs"
    async with running_keyserver(tmp_path / "b") as ks:
        from keystore.service.http import SETTINGS

        settings = ks.app[SETTINGS]
        object.__setattr__(settings, "openpgp_js", missing)
        async with api_client(ks) as client:
            assert (await client.get("/static/openpgp.min.mjs")).status == 404
            assert "Key generation is not available" in await (await client.get("/")).text()


async def test_openapi_document_lists_exactly_the_routes(tmp_path: Path) -> None:
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        response = await client.get("/api/v1/openapi.yaml")
        assert response.status == 200
        document = yaml.safe_load(await response.text())
        routes = {
            (route.resource.canonical, route.method.lower())
            for route in ks.app.router.routes()
            if route.resource is not None
            and route.resource.canonical.startswith("/api/")
            and route.method != "HEAD"
        }
    assert document["openapi"].startswith("3.")
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == routes


def test_openapi_document_lists_every_error_code_with_its_status() -> None:
    document = yaml.safe_load(server.OPENAPI.read_text())
    listed = document["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    sources = Path(server.__file__).read_text() + Path(registration.__file__).read_text()
    refused = set(re.findall(r'Refused\(\s*"([a-z-]+)"', sources))
    # Codes the HTTP layer answers itself carry their status beside them.
    direct = set(re.findall(r'(?:_error\(\s*\d+,|"error": )\s*"([a-z-]+)"', sources))
    assert refused <= set(server._STATUS)
    assert sorted(listed) == sorted(refused | direct | set(server._STATUS))
    statuses = {
        status
        for item in document["paths"].values()
        for operation in item.values()
        for status in operation["responses"]
    }
    assert {str(status) for status in server._STATUS.values()} <= statuses
    described = document["components"]["schemas"]["Error"]["description"]
    for code, status in server._STATUS.items():
        assert f"{code} ({status})" in described, code


async def test_notify_expiry_command_for_cron(tmp_path: Path, key_factory: KeyFactory) -> None:
    soon = key_factory.make("oscar@example.test", expires="5d")
    async with running_keyserver(tmp_path) as ks:
        ks.store.bind(soon.address, validate_key(soon.public).key)
        config = tmp_path / "gpgfilter.yaml"
        config.write_text(
            f"data_dir: {tmp_path / 'data'}\nhostname: mx.example.test\n"
            f"keyserver:\n  relay: 127.0.0.1:{ks.relay.port}\n"
        )
        command = ["keys", "notify-expiry", "--config", str(config)]
        first = await asyncio.to_thread(CliRunner().invoke, main, command)
        assert first.exit_code == 0 and "sent 1 expiry notice" in first.output, first.output
        assert mails_to(ks.relay, soon.address)[-1]["Subject"] == "Your OpenPGP key expires soon"
        again = await asyncio.to_thread(CliRunner().invoke, main, command)
        assert "sent 0 expiry notice" in again.output


def test_keyserver_refuses_to_start_with_an_unreadable_admin_token(tmp_path: Path) -> None:
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\ndomains: [example.test]\n"
        f"keyserver:\n  listen: 127.0.0.1:0\n  admin_token_file: {tmp_path / 'missing'}\n"
    )
    result = CliRunner().invoke(main, ["keyserver", "-c", str(config)])
    assert result.exit_code == 1
    assert "keyserver.admin_token_file: cannot read" in result.output
    assert "Traceback" not in result.output


async def test_the_service_checks_expiry_by_itself(tmp_path: Path, key_factory: KeyFactory) -> None:
    soon = key_factory.make("pia@example.test", expires="5d")
    async with running_keyserver(tmp_path, **{"keyserver.expiry_check_interval": "1h"}) as ks:
        ks.store.bind(soon.address, validate_key(soon.public).key)
        async with api_client(ks):  # starting the application starts the periodic check
            for _ in range(100):
                if mails_to(ks.relay, soon.address):
                    break
                await asyncio.sleep(0.1)
        [notice] = mails_to(ks.relay, soon.address)
        assert notice["Subject"] == "Your OpenPGP key expires soon"


async def test_header_protection_chosen_at_signup_and_changed_only_with_proof(
    tmp_path: Path, key_factory: KeyFactory, bob: TestKey
) -> None:
    """The choice made with the upload applies once the owner confirms; a later change needs
    a token mailed encrypted to the registered key, like a withdrawal; the admin sets it."""
    lena = key_factory.make("lena@example.test")
    async with running_keyserver(tmp_path) as ks, api_client(ks) as client:
        bad = {**_upload(lena, lena.address), "header_protection": "hide"}
        response = await client.post("/api/v1/keys", json=bad)
        assert response.status == 400 and "header_protection" in (await response.json())["message"]
        chosen = {**_upload(lena, lena.address), "header_protection": "hide-subject"}
        assert (await client.post("/api/v1/keys", json=chosen)).status == 202
        assert ks.store.keys_for(lena.address).settings.header_protection is None
        await client.post("/api/v1/confirm", json={"token": challenge_token(ks.relay, lena)})
        assert ks.store.keys_for(lena.address).settings.header_protection == "hide-subject"

        # Anyone can ask for a change; only the key's holder can carry it out.
        change = {"address": lena.address, "header_protection": "copy"}
        response = await client.post("/api/v1/header-protection", json=change)
        assert response.status == 202
        assert (await response.json())["status"] == "protection-pending"
        challenge = mails_to(ks.relay, lena.address)[-1]
        assert challenge["Subject"] == "Confirm the change of how your mail is stored"
        with pytest.raises(ToolError):
            decrypt_gpg(bob, ciphertext_of(challenge))
        assert ks.store.keys_for(lena.address).settings.header_protection == "hide-subject"
        token = challenge_token(ks.relay, lena)
        response = await client.post("/api/v1/confirm", json={"token": token})
        assert (await response.json())["status"] == "protection-changed"
        assert ks.store.keys_for(lena.address).settings.header_protection == "copy"
        again = await client.post("/api/v1/confirm", json={"token": token})
        assert again.status == 410

        # An update of the same key (no proof needed) changes no choice.
        response = await client.post("/api/v1/keys", json={**chosen, "header_protection": "off"})
        assert (await response.json())["status"] in ("unchanged", "renewed")
        assert ks.store.keys_for(lena.address).settings.header_protection == "copy"

        for body in ({"address": lena.address}, {**change, "header_protection": 1}):
            response = await client.post("/api/v1/header-protection", json=body)
            assert response.status == 400
        nobody = {"address": "nobody@example.test", "header_protection": "copy"}
        assert (await client.post("/api/v1/header-protection", json=nobody)).status == 404

        url = f"/api/v1/admin/header-protection/{lena.address}"
        off = {"header_protection": "off"}
        assert (await client.put(url, json=off)).status == 401
        response = await client.put(url, json=off, headers=ADMIN)
        assert (await response.json())["status"] == "protection-changed"
        assert ks.store.keys_for(lena.address).settings.header_protection == "off"
        response = await client.put(url, json={"header_protection": None}, headers=ADMIN)
        assert ks.store.keys_for(lena.address).settings.header_protection is None
        missing = "/api/v1/admin/header-protection/nobody@example.test"
        assert (await client.put(missing, json=off, headers=ADMIN)).status == 404
        # Every change of the setting is audited, whoever made it.
        changes = [
            e.actor for e in ks.store.audit_log(lena.address) if e.action == "protection-changed"
        ]
        assert changes == ["admin-api", "admin-api", "self-service"]
