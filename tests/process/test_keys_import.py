"""``gpgfilter keys import`` of a whole keyring, as another filter leaves it: each key
validated and bound to its user IDs in the served domains, through the registry's admin rules
(audited as "cli"), with a line per key, a summary and an exit status a script can use."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner

from gpgfilter.process.cli import main
from gpgfilter.process.config import load
from keystore.storage.open import open_store
from tests.support.openpgp_tools import KeyFactory, TestKey, stop_gpg_daemons


@contextlib.contextmanager
def _keyring(tmp_path: Path, keys: list[TestKey]) -> Iterator[Path]:
    """One GnuPG home holding every public key, as zeyple or gpg-mailgate keep theirs; the
    agent gpg starts in it is stopped afterwards."""
    home = tmp_path / "theirs"
    home.mkdir(mode=0o700)
    try:
        for key in keys:
            subprocess.run(
                ["gpg", "--homedir", str(home), "--batch", "--import"],
                input=key.public,
                capture_output=True,
                check=True,
            )
        yield home
    finally:
        stop_gpg_daemons(home)


def test_a_keyring_is_imported_key_by_key_with_a_report(
    tmp_path: Path, key_factory: KeyFactory, alice: TestKey, bob: TestKey
) -> None:
    expired = key_factory.make_expired("old@example.test")
    revoked = key_factory.make_revoked("gone@example.test")
    foreign = key_factory.make("someone@elsewhere.test")
    two = key_factory.make_multi_uid(["carol@example.test", "c.smith@example.test"])
    with _keyring(tmp_path, [alice, bob, expired, revoked, foreign, two]) as home:
        config = tmp_path / "gpgfilter.yaml"
        config.write_text(f"data_dir: {tmp_path / 'data'}\ndomains: [example.test]\n")
        runner = CliRunner()
        command = ["-c", str(config), "keys", "import", "--gnupg-home", str(home)]

        dry = runner.invoke(main, [*command, "--dry-run"])
        assert dry.exit_code == 1, dry.output
        assert "(dry run: nothing changed)" in dry.output
        assert not (tmp_path / "data" / "keys.sqlite").exists()

        done = runner.invoke(main, command)
        assert done.exit_code == 1, done.output  # some keys refused, the others imported
        lines = done.output.splitlines()
        assert f"{alice.fingerprint} registered for alice@example.test" in lines
        assert f"{bob.fingerprint} registered for bob@example.test" in lines
        assert f"{two.fingerprint} registered for carol@example.test" in lines
        assert f"{two.fingerprint} registered for c.smith@example.test" in lines
        assert any(line.startswith(f"{expired.fingerprint} refused: ") for line in lines)
        assert f"{revoked.fingerprint} refused: the key is revoked" in lines
        assert any(line.startswith(f"{foreign.fingerprint} refused: no user ID") for line in lines)
        assert lines[-1] == "6 key(s): 3 refused, 4 registered"

        again = runner.invoke(main, command)
        assert again.output.splitlines()[-1] == "6 key(s): 3 refused, 4 unchanged"

        loaded = load(config)
        store = open_store(loaded.keystore, loaded.keystore_path, create=False)
        try:
            audit = store.audit_log(None, 100)
        finally:
            store.close()
        assert len(audit) == 4
        assert {entry.actor for entry in audit} == {"cli"}


def test_standard_input_with_many_keys(tmp_path: Path, alice: TestKey, bob: TestKey) -> None:
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\ndomains: [example.test]\n")
    result = CliRunner().invoke(
        main, ["-c", str(config), "keys", "import", "-"], input=alice.public + bob.public
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "2 key(s): 2 registered"


def test_dry_run_with_an_explicit_address_is_refused_not_ignored(tmp_path: Path) -> None:
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    keyfile = tmp_path / "k.asc"
    keyfile.write_text("not read")
    result = CliRunner().invoke(
        main,
        [
            "-c",
            str(config),
            "keys",
            "import",
            "--dry-run",
            "--address",
            "a@example.test",
            str(keyfile),
        ],
    )
    assert result.exit_code == 2 and "does not take --address" in result.output
    assert not (tmp_path / "data" / "keys.sqlite").exists()


def test_a_secret_key_in_the_input_is_refused_and_nothing_is_imported(
    tmp_path: Path, alice: TestKey, bob: TestKey
) -> None:
    """An admin who exported secret keys by mistake is told so; the public keys beside them
    are not imported either, and the secret material is never echoed."""
    config = tmp_path / "gpgfilter.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\ndomains: [example.test]\n")
    command = ["-c", str(config), "keys", "import", "-"]
    refused = CliRunner().invoke(main, command, input=bob.public + alice.secret)
    assert refused.exit_code == 1
    assert "the input holds a secret key" in refused.output
    assert "PRIVATE" not in refused.output
    assert not (tmp_path / "data" / "keys.sqlite").exists(), "nothing imported"
    done = CliRunner().invoke(main, command, input=bob.public)
    assert done.exit_code == 0, done.output
