"""``gpgfilter setup`` against a real Postfix and Dovecot: mail flows encrypted after it, a
second run changes nothing, and ``--undo`` leaves the configuration byte for byte as before."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpgfilter.ops.setup import DOVECOT_DROP_IN, Postconf, SetupError, plan_setup
from gpgfilter.process.config import load
from tests.support.e2e_stack import FilterProcess, Stack
from tests.support.mailstack import free_port, parse_main_cf, require_mail_stack, rewrite_ports
from tests.support.openpgp_tools import TestKey, decrypt_gpg
from tests.support.pgpmime_check import armored_part

ROOT = Path(__file__).resolve().parents[2]
USER = "alice@example.test"


def _message(n: int) -> bytes:
    return (
        f"From: sender@example.test\r\nTo: {USER}\r\nSubject: setup {n}\r\n"
        f"Message-ID: <setup-{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def _run_setup(stack: Stack, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gpgfilter", "setup", "--config", str(config)]
    command += ["--postfix-dir", str(stack.postfix.config_dir)]
    command += ["--dovecot-config", str(stack.dovecot.config_path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _files(stack: Stack) -> dict[str, bytes]:
    return {n: (stack.postfix.config_dir / n).read_bytes() for n in ("main.cf", "master.cf")}


@pytest.fixture(params=["lmtp", "smtp"])
def wired(
    request: pytest.FixtureRequest, tmp_path: Path, alice: TestKey
) -> Iterator[tuple[Stack, FilterProcess]]:
    """A plain Postfix → Dovecot stack and a running filter that is not wired in yet."""
    require_mail_stack()
    mode = request.param
    with Stack(tmp_path / "stack", mode="direct", users=[USER]) as stack:
        deliver = stack.dovecot.lmtp_port if mode == "lmtp" else free_port()
        gpgfilter = FilterProcess(
            tmp_path / "filter", mode=mode, port=free_port(), deliver_port=deliver
        )
        gpgfilter.import_key(alice.public)
        gpgfilter.start()
        try:
            yield stack, gpgfilter
        finally:
            gpgfilter.stop()


@pytest.mark.e2e
def test_setup_wires_mail_through_the_filter_again_changes_nothing_and_undo_restores(
    wired: tuple[Stack, FilterProcess], alice: TestKey
) -> None:
    stack, gpgfilter = wired
    before = _files(stack)

    dry = _run_setup(stack, gpgfilter.config_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout
    assert _files(stack) == before
    if gpgfilter.mode == "lmtp":
        assert f"virtual_transport: lmtp:inet:127.0.0.1:{stack.dovecot.lmtp_port} ->" in dry.stdout
    else:
        assert "content_filter: (not set) -> gpgfilter:[127.0.0.1]" in dry.stdout
    assert f"run postconf -c {stack.postfix.config_dir}" in dry.stdout

    done = _run_setup(stack, gpgfilter.config_path)
    assert done.returncode == 0, done.stderr
    assert "reload" in done.stdout  # the running Postfix was told
    stack.postfix.send("sender@example.test", [USER], _message(1))
    stored = stack.dovecot.wait_for(USER, 1)[0]
    assert b"multipart/encrypted" in stored
    assert b"body 1" in decrypt_gpg(alice, armored_part(stored))

    again = _run_setup(stack, gpgfilter.config_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    after_setup = _files(stack)

    undone = _run_setup(stack, gpgfilter.config_path, "--undo")
    assert undone.returncode == 0, undone.stderr
    assert _files(stack) == before
    assert after_setup != before
    stack.postfix.send("sender@example.test", [USER], _message(2))
    assert b"body 2" in stack.dovecot.wait_for(USER, 2)[1]  # straight to Dovecot, in clear

    nothing = _run_setup(stack, gpgfilter.config_path, "--undo")
    assert "nothing to undo" in nothing.stdout


@pytest.mark.e2e
def test_undo_after_the_admin_edited_main_cf_reverts_only_our_settings(
    wired: tuple[Stack, FilterProcess],
) -> None:
    stack, gpgfilter = wired
    postconf = ["postconf", "-c", str(stack.postfix.config_dir)]
    original = subprocess.run([*postconf, "-n"], capture_output=True, text=True, check=True)
    assert _run_setup(stack, gpgfilter.config_path).returncode == 0
    subprocess.run([*postconf, "-e", "delay_warning_time=4h"], check=True)
    undone = _run_setup(stack, gpgfilter.config_path, "--undo")
    assert undone.returncode == 0, undone.stderr
    assert "reverting gpgfilter's settings only" in undone.stdout
    now = subprocess.run([*postconf, "-n"], capture_output=True, text=True, check=True)
    assert now.stdout.replace("delay_warning_time = 4h\n", "") == original.stdout


def test_setup_parameters_are_the_documented_snippets(tmp_path: Path) -> None:
    """`setup` and postfix/*.cf (which the end-to-end harness applies) say the same."""
    from gpgfilter.ops.setup import content_filter_parameters, lmtp_parameters

    ports = {10025: 10025, 10026: 10026, 24: 24}
    lmtp = dict(
        line.split("=", 1)
        for line in parse_main_cf(
            rewrite_ports((ROOT / "postfix/lmtp-mode/main.cf").read_text(), ports)
        )
    )
    assert {k.strip(): v.strip() for k, v in lmtp.items()} == lmtp_parameters(load(None))
    main, master = content_filter_parameters(load(None, {"mode": "smtp"}))
    snippet = ROOT / "postfix/content-filter"
    documented = dict(
        line.split("=", 1) for line in parse_main_cf((snippet / "main.cf").read_text())
    )
    assert {k.strip(): v.strip() for k, v in documented.items()} == main
    from tests.support.mailstack import parse_master_cf

    entries = dict(parse_master_cf((snippet / "master.cf").read_text()))
    assert {k: v.split() for k, v in entries.items()} == {k: v.split() for k, v in master.items()}


def _postfix_dir(tmp_path: Path, main_cf: str) -> Postconf:
    directory = tmp_path / "postfix"
    directory.mkdir(parents=True)
    (directory / "main.cf").write_text(main_cf)
    (directory / "master.cf").write_text("smtp inet n - n - - smtpd\nlmtp unix - - n - - lmtp\n")
    return Postconf(directory)


def test_setup_refuses_a_postfix_that_does_not_deliver_over_lmtp(tmp_path: Path) -> None:
    postconf = _postfix_dir(tmp_path, "virtual_transport = virtual\n")
    with pytest.raises(SetupError, match="does not deliver mailboxes over LMTP"):
        plan_setup(load(None), postconf, dovecot_config=None)
    wired_smtp = _postfix_dir(tmp_path / "x", "content_filter = amavis:[127.0.0.1]:10024\n")
    with pytest.raises(SetupError, match="content_filter set"):
        plan_setup(load(None), wired_smtp, dovecot_config=None)


def test_recipient_delimiter_mismatch_is_reported(tmp_path: Path) -> None:
    postconf = _postfix_dir(
        tmp_path, "virtual_transport = lmtp:unix:private/dovecot-lmtp\nrecipient_delimiter = -\n"
    )
    plan = plan_setup(load(None), postconf, dovecot_config=None)
    assert any("recipient_delimiter is '-'" in note for note in plan.notes)
    assert "virtual_transport" in [c.name for c in plan.changes]


def test_dovecot_without_a_listener_gets_a_drop_in_that_undo_removes(tmp_path: Path) -> None:
    require_mail_stack()
    from gpgfilter.ops.setup import apply_plan, undo

    dovecot = tmp_path / "dovecot" / "dovecot.conf"
    (dovecot.parent / "conf.d").mkdir(parents=True)
    dovecot.write_text(f"base_dir = {tmp_path}/run\nprotocols = imap\n!include_try conf.d/*.conf\n")
    postconf = _postfix_dir(tmp_path, "virtual_transport = lmtp:unix:private/dovecot-lmtp\n")
    config = load(None, {"data_dir": str(tmp_path / "data"), "deliver": "127.0.0.1:2424"})
    plan = plan_setup(config, postconf, dovecot_config=dovecot)
    drop_in = dovecot.parent / "conf.d" / DOVECOT_DROP_IN
    assert str(drop_in) in [c.where for c in plan.changes]
    _record, warnings = apply_plan(plan, config, postconf, dovecot_config=dovecot)
    assert "port = 2424" in drop_in.read_text()
    assert warnings  # no Dovecot running here to reload
    assert not plan_setup(config, postconf, dovecot_config=dovecot).changes
    undo(config, postconf, dovecot_config=dovecot)
    assert not drop_in.exists()
