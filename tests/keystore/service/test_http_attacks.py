"""Attacks on the running ``gpgfilter keyserver`` process, over loopback, as a stranger would
make them: forged log lines, inputs that used to end in a 500 with a traceback, clients that go
away mid-body, a flood of requests. Each must get a 4xx with a reason (or 503 when busy) and
leave at most one escaped line in the log."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.forgery import forged_self_signatures
from tests.support.mailstack import free_port
from tests.support.openpgp_tools import TestKey

FORGED = "2026-01-01 00:00:00,000 INFO keystore.registration: key FORGED registered for eve"
PER_CLIENT = 40


@dataclass
class Process:
    port: int
    log: Path
    data_dir: Path
    seen: int = 0  # bytes of the log already looked at

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        client: str = "192.0.2.1",
    ) -> tuple[int, dict[str, str]]:
        status, answer, _ = self.exchange(method, path, body, headers, client)
        return status, answer

    def exchange(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        client: str = "192.0.2.1",
    ) -> tuple[int, dict[str, str], dict[str, str]]:
        """One request as ``client`` (the service trusts loopback as its proxy)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body, {"X-Forwarded-For": client, **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"raw": raw.decode("utf-8", "replace")}
        return response.status, answer, dict(response.getheaders())

    def new_log(self) -> str:
        """What the process logged since the last call (after a moment for it to flush)."""
        time.sleep(0.3)
        data = self.log.read_bytes()
        fresh, self.seen = data[self.seen :], len(data)
        return fresh.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def keyserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    root = tmp_path_factory.mktemp("attacked")
    port = free_port()
    config = root / "gpgfilter.yaml"
    config.write_text(
        f"data_dir: {root / 'data'}\nhostname: mail.example.test\nlog_level: info\n"
        "domains: [example.test]\n"
        f"keyserver:\n  listen: 127.0.0.1:{port}\n  expiry_check_interval: 0\n"
        f"  relay: 127.0.0.1:{free_port()}\n  trusted_proxies: [127.0.0.1]\n"
        f"  rate_limit: {{per_client: {PER_CLIENT}, per_address: 1000}}\n"
    )
    log_path = root / "keyserver.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gpgfilter", "-c", str(config), "keyserver"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    attacked = Process(port, log_path, root / "data")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                attacked.request("GET", "/api/v1/openapi.yaml")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        yield attacked
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def _clean(log: str) -> None:
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


def test_a_forged_line_in_the_path_stays_inside_one_escaped_line(keyserver: Process) -> None:
    keyserver.new_log()
    for separator in ("%0a", "%0d%0a", "%0d", "%00%0a", "%c2%85", "%e2%80%a8"):
        path = "/api/v1/keys/x" + separator + FORGED.replace(" ", "%20")
        status, _ = keyserver.request("GET", path, client="192.0.2.10")
        assert status < 500
    log = keyserver.new_log()
    lines = [line for line in log.splitlines() if "FORGED" in line]
    assert len(lines) == 6, log
    for line in lines:
        assert not line.startswith("2026-01-01"), log
        assert "aiohttp.access" in line
        assert any(escaped in line for escaped in ("\\x", "\\n", "\\r", "\\u")), line
    assert "\x00" not in log
    _clean(log)


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"[" * 100_000, "application/json", 400),
        (b'{"address": "a@example.test", "key": "\\ud800"}', "application/json", 400),
        (b'{"address": "\\ud800@example.test", "key": "x"}', "application/json", 400),
        ('{"address": "a@example.test", "key_base64": "ä"}'.encode(), "application/json", 400),
        (b'{"address": "a@example.test", "key": "x"}', "application/json; charset=x-bogus", 415),
        (b'{"address": "a@example.test", "key": "x"}', "application/json; charset=utf-16", 415),
        (b'{"address": "a@example.test", "key": "x"}', "application/json; charset=latin1", 415),
        (b"\xff\xfe{", "application/json", 400),
        (b'{"address": "a@example.test", "key": 5}', "application/json", 400),
    ],
    ids=[
        "brackets",
        "surrogate-key",
        "surrogate-address",
        "non-ascii-base64",
        "bogus-charset",
        "utf16-charset",
        "latin1-charset",
        "not-utf8",
        "number",
    ],
)
def test_bad_input_gets_a_4xx_with_a_reason(
    keyserver: Process, body: bytes, content_type: str, expected: int
) -> None:
    keyserver.new_log()
    status, answer = keyserver.request(
        "POST", "/api/v1/keys", body, {"Content-Type": content_type}, client="192.0.2.11"
    )
    assert status == expected, answer
    assert answer["error"] and answer["message"]
    log = keyserver.new_log()
    _clean(log)
    assert "bogus" not in log


def test_a_client_going_away_mid_body_is_one_info_line_at_most(keyserver: Process) -> None:
    keyserver.new_log()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", keyserver.port), timeout=10) as conn:
            conn.sendall(
                b"POST /api/v1/keys HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.12\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                b'{"address": "a@exam'
            )
            time.sleep(0.2)
    log = keyserver.new_log()
    _clean(log)
    assert len(log.splitlines()) <= 3, log
    assert all(" INFO " in line for line in log.splitlines()), log


def test_a_flood_from_one_client_writes_a_bounded_number_of_rows(keyserver: Process) -> None:
    answers = [
        keyserver.request("GET", "/api/v1/keys/a@example.test", client="192.0.2.13")[0]
        for _ in range(300)
    ]
    assert answers.count(200) == PER_CLIENT and answers.count(429) == 300 - PER_CLIENT
    with sqlite3.connect(keyserver.data_dir / "keys.sqlite") as db:
        [(rows,)] = db.execute(
            "SELECT count(*) FROM events WHERE scope = 'client:192.0.2.13'"
        ).fetchall()
    assert rows <= PER_CLIENT
    _clean(keyserver.new_log())


def test_a_burst_of_costly_uploads_gets_busy_answers_not_a_queue(
    keyserver: Process, alice: TestKey
) -> None:
    """16 uploads at once of a key carrying forged self-signatures: the few validation slots
    and their short queue take some, the rest are told to come back (503 + Retry-After)."""
    binary = base64.b64decode(b"".join(alice.public.splitlines()[2:-2]))
    forged = forged_self_signatures(binary, 90)
    body = json.dumps(
        {"address": alice.address, "key_base64": base64.b64encode(forged).decode()}
    ).encode()
    headers = {"Content-Type": "application/json"}

    def upload(n: int) -> tuple[int, dict[str, str], dict[str, str]]:
        return keyserver.exchange("POST", "/api/v1/keys", body, headers, f"198.51.100.{n}")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(upload, range(16)))
    busy = [a for a in answers if a[0] == 503]
    assert busy and all(a[1]["error"] == "busy" and int(a[2]["Retry-After"]) > 0 for a in busy)
    assert {a[0] for a in answers} <= {422, 503}, answers
    refused = [a[1]["message"] for a in answers if a[0] == 422]
    assert refused and all("gpg could not import the key" in m for m in refused)
    _clean(keyserver.new_log())
