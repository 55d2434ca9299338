"""The filter as the service manager runs it: SIGHUP reloads, /health answers, SIGTERM stops."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.e2e_stack import FilterProcess
from tests.support.mailstack import free_port


def _wait_log(process: FilterProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while process.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{process.log()}"
        time.sleep(0.05)


def _health(process: FilterProcess) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{process.metrics_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sighup_reloads_health_answers_and_sigterm_stops(tmp_path: Path) -> None:
    process = FilterProcess(tmp_path, mode="lmtp", port=free_port(), deliver_port=free_port())
    process.start()
    try:
        status, body = _health(process)
        assert status == 200 and body["status"] == "ok"
        assert "engine auto: Sequoia for keys" in process.log()
        assert "event loop uvloop" in process.log()

        original = process.config_path.read_text()
        process.config_path.write_text(original + "policy:\n  no_key: defer\n")
        process.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _wait_log(process, "configuration reloaded (engine auto:")

        # A reload builds the engine anew, as the configuration now names it.
        process.config_path.write_text(original.replace("gpg:\n", "gpg:\n  engine: gnupg\n"))
        process.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _wait_log(process, "configuration reloaded (engine gnupg: gpg for every recipient)")

        process.config_path.write_text(original + "policy: [broken\n")
        process.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _wait_log(process, "configuration not reloaded")
        assert _health(process)[0] == 200

        (process.data_dir / "keys.sqlite").rename(tmp_path / "moved.sqlite")
        status, body = _health(process)
        assert status == 503 and body["status"] == "failing"
    finally:
        process.stop()
    assert process.log().rstrip().endswith("stopping: finishing messages in progress")
