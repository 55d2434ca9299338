"""Whatever a client sends to the HTTP API, the answer is below 500 and names the problem;
and the gpg work behind an upload is bounded in parallelism and time.

The property tests run the real application (store, registry, fake relay) on a loopback port
in a thread of its own, so hypothesis can drive it with a plain HTTP client.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpgfilter.process.keyserver import build, open_store
from keystore import gpgbound
from keystore.gpgbound import Busy, ValidationSlots
from keystore.service.http import PathOnlyAccessLogger
from keystore.validate import KeyRejected, validate_key
from tests.support.fakes import Downstream
from tests.support.keyserver_harness import ADMIN_TOKEN, keyserver_config
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import TestKey


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _App:
    """The key service on 127.0.0.1:``port``, served from a background event loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.errors = _Errors()

    def __enter__(self) -> _App:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        logging.getLogger().addHandler(self.errors)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger().removeHandler(self.errors)
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        self.relay = Downstream(lmtp=False)
        await self.relay.start()
        config = keyserver_config(
            self.tmp_path,
            self.relay.port,
            **{
                "keyserver.rate_limit.per_client": 100000,
                "keyserver.rate_limit.per_address": 100000,
            },
        )
        self.store = open_store(config)
        app, _, _ = build(config, self.store)
        self.runner = web.AppRunner(app, access_log_class=PathOnlyAccessLogger)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.relay.stop()
        self.store.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body, headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_App]:
    with _App(tmp_path_factory.mktemp("hostile")) as running:
        yield running


def _check(app: _App, status: int, raw: bytes) -> None:
    errors, app.errors.records = app.errors.records, []
    assert status < 500, raw
    if status >= 400:
        answer = json.loads(raw)
        assert answer["error"] and answer["message"], answer
    assert not errors, [r.getMessage() for r in errors]


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_ADDRESSES = st.sampled_from(["alice@example.test", "nobody@example.test", "a@b", "@", ""])


def _fields(key_text: str) -> st.SearchStrategy[dict[str, Any]]:
    value = _JSON | _ADDRESSES | st.just(key_text) | st.just("bm90IGEga2V5")
    return st.fixed_dictionaries(
        {},
        optional={"address": value, "key": value, "key_base64": value, "token": value},
    )


_ENDPOINTS = st.sampled_from(
    [
        ("POST", "/api/v1/keys"),
        ("POST", "/api/v1/confirm"),
        ("POST", "/api/v1/withdraw"),
        ("PUT", "/api/v1/admin/keys/alice@example.test"),
    ]
)
_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(data=st.data(), endpoint=_ENDPOINTS)
def test_any_json_fields_get_an_answer_below_500(
    app: _App, alice: TestKey, data: st.DataObject, endpoint: tuple[str, str]
) -> None:
    body = data.draw(_fields(alice.public.decode("ascii")) | _JSON)
    method, path = endpoint
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, raw = app.request(method, path, json.dumps(body).encode("ascii"), headers)
    _check(app, status, raw)


_CHARSETS = st.sampled_from(
    [None, "utf-8", "UTF-8", "x-bogus", "utf-16", "latin1", "", "utf-8; x=y", "'utf-8'"]
)


@_SETTINGS
@given(body=st.binary(max_size=300), charset=_CHARSETS, endpoint=_ENDPOINTS)
def test_any_bytes_in_any_charset_get_an_answer_below_500(
    app: _App, body: bytes, charset: str | None, endpoint: tuple[str, str]
) -> None:
    content_type = "application/json" + (f"; charset={charset}" if charset is not None else "")
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, raw = app.request(*endpoint, body, headers)
    _check(app, status, raw)


@_SETTINGS
@given(
    address=st.binary(min_size=1, max_size=60) | st.text(min_size=1, max_size=60).map(str.encode)
)
def test_any_address_in_the_path_gets_an_answer_below_500(app: _App, address: bytes) -> None:
    quoted = urllib.parse.quote_from_bytes(address, safe="")
    status, raw = app.request("GET", f"/api/v1/keys/{quoted}")
    if status != 404:  # an empty segment is another route
        _check(app, status, raw)
    status, raw = app.request(
        "GET",
        f"/api/v1/admin/audit?address={quoted}&limit={quoted}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    _check(app, status, raw)


# -- gpg work ------------------------------------------------------------------------------------


async def test_validations_beyond_the_slots_wait_then_get_busy() -> None:
    slots = ValidationSlots(1, wait=0.2, queue=1)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def long_validation() -> None:
        async with slots.hold():
            entered.set()
            await release.wait()

    first = asyncio.create_task(long_validation())
    await entered.wait()
    waiting = asyncio.create_task(_hold_briefly(slots))
    await asyncio.sleep(0.05)
    with pytest.raises(Busy):  # the queue is full: told at once
        await _hold_briefly(slots)
    with pytest.raises(Busy):  # waited its 0.2 s, the slot stayed taken
        await waiting
    release.set()
    await first
    await _hold_briefly(slots)  # free again


async def _hold_briefly(slots: ValidationSlots) -> None:
    async with slots.hold():
        await asyncio.sleep(0)


def test_a_gpg_past_its_deadline_is_killed_and_the_upload_refused(
    alice: TestKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpgbound, "GPG_WALL_SECONDS", 0.001)
    with pytest.raises(KeyRejected, match=r"^checking the key took gpg more than 5 s of CPU"):
        validate_key(alice.public)
    monkeypatch.undo()
    assert validate_key(alice.public).key.fingerprint == alice.fingerprint
