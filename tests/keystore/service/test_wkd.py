"""Web Key Directory: the URLs GnuPG computes reach exactly the active keys of the store."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gpgfilter.process.config import ConfigError, load
from keystore.model import PendingChange
from keystore.service.wkd import StoreWkdLookup, wkd_hash, wkd_routes, zbase32
from keystore.storage.sqlite import SQLiteKeyStore
from keystore.validate import validate_key
from tests.keystore.service.test_wks import require_wks_client
from tests.support.openpgp_tools import KeyFactory, TestKey

DOMAIN = "example.test"
SUBMISSION = f"key-submission@{DOMAIN}"


def gnupg_url(address: str) -> str:
    """The advanced-layout URL that GnuPG itself computes for ``address``."""
    done = subprocess.run(
        [require_wks_client(), "--print-wkd-url", address],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def direct_form(url: str) -> tuple[str, str]:
    """(Host, path) of the direct layout for an advanced-layout URL."""
    parts = urlsplit(url)
    domain = parts.hostname.removeprefix("openpgpkey.") if parts.hostname else ""
    path = parts.path.replace(f"/.well-known/openpgpkey/{domain}/", "/.well-known/openpgpkey/")
    return domain, f"{path}?{parts.query}"


def imported_user_ids(data: bytes) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="wkd-", dir="/tmp") as home:
        base = ["gpg", "--homedir", home, "--batch", "--no-autostart"]
        subprocess.run([*base, "--import"], input=data, capture_output=True, check=True)
        listing = subprocess.run(
            [*base, "--with-colons", "-k"], capture_output=True, check=True
        ).stdout.decode("utf-8")
    return [line.split(":")[9] for line in listing.splitlines() if line.startswith("uid:")]


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TestKey]]:
    with KeyFactory(tmp_path_factory.mktemp("wkdkeys")) as factory:
        yield {
            "plain": factory.make(f"carol@{DOMAIN}"),
            "mixed": factory.make(f"Dave.Mixed@{DOMAIN}"),
            "utf8": factory.make(f"jörg@{DOMAIN}"),
            "revoked": factory.make(f"erin@{DOMAIN}"),
            "withdrawn": factory.make(f"frank@{DOMAIN}"),
            "pending": factory.make(f"grace@{DOMAIN}"),
            "other": factory.make("carol@elsewhere.test"),
        }


@pytest.fixture
def store(tmp_path: Path, people: dict[str, TestKey]) -> Iterator[SQLiteKeyStore]:
    store = SQLiteKeyStore(tmp_path / "keys.sqlite", create=True)
    for name in ("plain", "mixed", "utf8", "revoked", "withdrawn", "other"):
        validated = validate_key(people[name].public)
        for address in validated.addresses:
            store.bind(address, validated.key)
    store.revoke(people["revoked"].fingerprint)
    store.remove(f"frank@{DOMAIN}")
    waiting = validate_key(people["pending"].public)
    store.add_pending(
        PendingChange("0" * 64, f"grace@{DOMAIN}", waiting.key, 1, 2**40, origin="wks")
    )
    yield store
    store.close()


@pytest.fixture
async def client(store: SQLiteKeyStore) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    lookup = StoreWkdLookup(
        store,
        [DOMAIN],
        submission_address=SUBMISSION,
        submission_key=b"\x99submission-key",
        pending_seconds=3600,
    )
    app = web.Application()
    app.add_routes(wkd_routes(lookup))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def test_zbase32_matches_the_rfc_samples() -> None:
    assert zbase32(b"\x00") == "yy" and zbase32(b"\xf0\xbf\xc7") == "6n9hq"  # RFC 6189 sample


def test_hash_is_the_one_gnupg_computes() -> None:
    addresses = ["alice@example.org", "Alice.Mixed@Example.ORG", "jörg@example.test", "ÄRGER@x.y"]
    done = subprocess.run(
        [require_wks_client(), "--print-wkd-hash", *addresses],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = [line.split()[0] for line in done.stdout.splitlines()]
    assert [wkd_hash(a.rpartition("@")[0]) for a in addresses] == expected


@pytest.mark.parametrize("name", ["plain", "mixed", "utf8"])
async def test_gnupg_urls_reach_the_active_key_in_both_layouts(
    client: TestClient[web.Request, web.Application], people: dict[str, TestKey], name: str
) -> None:
    person = people[name]
    url = gnupg_url(person.address)
    parts = urlsplit(url)
    layouts = [(parts.hostname or "", f"{parts.path}?{parts.query}"), direct_form(url)]
    for host, path in layouts:
        response = await client.get(path, headers={"Host": host})
        assert response.status == 200, (host, path)
        assert response.content_type == "application/octet-stream"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        data = await response.read()
        assert data[:1] != b"-"  # binary, not armored
        uids = imported_user_ids(data)
        assert any(person.address in uid for uid in uids), uids
        # The hash alone is enough (older clients send no l=).
        bare = path.partition("?")[0]
        assert (await client.get(bare, headers={"Host": host})).status == 200


@pytest.mark.parametrize("address", [f"erin@{DOMAIN}", f"frank@{DOMAIN}", f"grace@{DOMAIN}"])
async def test_revoked_withdrawn_and_pending_keys_are_not_served(
    client: TestClient[web.Request, web.Application], address: str
) -> None:
    parts = urlsplit(gnupg_url(address))
    for host, path in [(parts.hostname or "", f"{parts.path}?{parts.query}")]:
        response = await client.get(path, headers={"Host": host})
        assert response.status == 404
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert (await client.get(path.partition("?")[0], headers={"Host": host})).status == 404


async def test_unknown_addresses_other_domains_and_bad_requests_are_404(
    client: TestClient[web.Request, web.Application],
) -> None:
    nobody = urlsplit(gnupg_url(f"nobody@{DOMAIN}"))
    elsewhere = urlsplit(gnupg_url("carol@elsewhere.test"))  # bound in the store, not served
    carol = urlsplit(gnupg_url(f"carol@{DOMAIN}"))
    cases = [
        (nobody.hostname, f"{nobody.path}?{nobody.query}"),
        (elsewhere.hostname, f"{elsewhere.path}?{elsewhere.query}"),
        ("elsewhere.test", direct_form(gnupg_url(f"carol@{DOMAIN}"))[1]),
        (carol.hostname, f"{carol.path}?l=dave.mixed"),  # l names another address: hash wins
        (DOMAIN, "/.well-known/openpgpkey/hu/not-a-hash"),
        (DOMAIN, f"/.well-known/openpgpkey/hu/{'y' * 31}"),
    ]
    for host, path in cases:
        response = await client.get(path, headers={"Host": host or ""})
        assert response.status == 404, (host, path)


async def test_policy_and_submission_address_in_both_layouts(
    client: TestClient[web.Request, web.Application],
) -> None:
    layouts = [
        (f"openpgpkey.{DOMAIN}", f"/.well-known/openpgpkey/{DOMAIN}"),
        (DOMAIN, "/.well-known/openpgpkey"),
    ]
    for host, prefix in layouts:
        policy = await client.get(f"{prefix}/policy", headers={"Host": host})
        assert policy.status == 200
        assert policy.headers["Access-Control-Allow-Origin"] == "*"
        assert "max-pending: 3600" in await policy.text()
        submission = await client.get(f"{prefix}/submission-address", headers={"Host": host})
        assert (await submission.text()).strip() == SUBMISSION
    unserved = await client.get("/.well-known/openpgpkey/policy", headers={"Host": "x.example"})
    assert unserved.status == 404
    advanced = "/.well-known/openpgpkey/x.example/policy"
    assert (await client.get(advanced, headers={"Host": "openpgpkey.x.example"})).status == 404


async def test_the_submission_address_key_is_served(
    client: TestClient[web.Request, web.Application],
) -> None:
    parts = urlsplit(gnupg_url(SUBMISSION))
    response = await client.get(f"{parts.path}?{parts.query}", headers={"Host": parts.hostname})
    assert response.status == 200
    assert await response.read() == b"\x99submission-key"


def test_publication_config_lists_domains_and_checks_them(tmp_path: Path) -> None:
    config = load(None, {"publication.domains": ["example.org", "example.net"]})
    assert config.publication.domains == ("example.org", "example.net")
    assert config.publication.submission == "key-submission@example.org"
    assert str(config.publication.wks_listen) == "127.0.0.1:10027"
    bad = [
        ({"publication.domains": "example.org"}, "publication.domains: expected a list"),
        ({"publication.domains": ["Example.org"]}, "publication.domains: 'Example.org'"),
        ({"publication.domains": [3]}, "publication.domains[0]: expected text"),
        (
            {"publication.domains": ["example.org"], "publication.submission_address": "k@x.y"},
            "publication.submission_address: must be an address in one of the domains",
        ),
        ({"publication.token_ttl": 5}, "publication.token_ttl: must be at least 60"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load(None, overrides)
