"""The commands the documentation shows must exist and parse: every ``gpgfilter`` command line
in a ``sh`` block is parsed by the real command-line interface (an unknown command or option
fails here), every other program must be installed or be one this machine cannot run, and every
repository path they name must exist. The commands' behaviour is tested where the features are
(tests/ops/, tests/keystore/, ...)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import click
import pytest

from gpgfilter.process.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "postfix" / "README.md", *ROOT.glob("docs/*.md")])
# Programs of a production host that the test machine does not have or must not run.
ELSEWHERE = {"systemctl", "journalctl", "adduser", "curl", "jq", "gpg-wks-client", "sudo"}
OPERATORS = {"&&", "||", "|", ";"}
REDIRECTIONS = {"<", ">", ">>"}  # the word after one is a file
KEYWORDS = {"while", "do", "done", "then", "fi", "if", "for"}
BUILTINS = {"read", "echo", "cd", "export", "test", "["}


def _commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for doc in DOCS:
        for block in re.findall(r"^```(?:sh|bash)\n(.*?)^```", doc.read_text(), re.M | re.S):
            text = block.replace("\\\n", " ")
            pending = ""
            for part in text.splitlines():
                line = f"{pending}\n{part}" if pending else part
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                lexer.commenters = "#"
                try:
                    words = list(lexer)
                except ValueError:  # a quoted string goes on over the next line
                    pending = line
                    continue
                pending = ""
                command: list[str] = []
                redirected = False
                for word in [*words, ";"]:
                    if word in OPERATORS:
                        while command and command[0] in KEYWORDS:
                            command.pop(0)
                        if command and command[0] not in BUILTINS:
                            found.append((f"{doc.name}: {line.strip()}", command))
                        command = []
                    elif word in REDIRECTIONS:
                        redirected = True
                    elif redirected:
                        redirected = False
                    else:
                        command.append(word)
    return found


COMMANDS = _commands()


def test_the_docs_show_commands() -> None:
    programs = {Path(c[0]).name for _, c in COMMANDS}
    assert {"gpgfilter", "postconf", "sqlite3"} <= programs


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command(where: str, command: list[str]) -> None:
    program = command[0]
    if Path(program).name == "gpgfilter":
        _parse(command[1:])
        return
    if "/" in program and not program.startswith("/"):
        assert (ROOT / program).exists() or program.startswith(".venv/"), where
        return
    if program in ELSEWHERE or "=" in program or program.startswith("$"):
        return
    assert shutil.which(Path(program).name), f"{where}: {program} is not installed"
    for word in command[1:]:
        if re.match(r"^(dist|postfix|keystore|bench|tests)/", word):
            assert (ROOT / word).exists(), f"{where}: {word} does not exist"


def _parse(args: list[str]) -> None:
    """Resolve subcommands and options as the real command would, without running anything."""
    command: click.Command = main
    context = command.make_context("gpgfilter", list(args), resilient_parsing=False)
    while isinstance(command, click.Group):
        rest = [*context._protected_args, *context.args]
        name, sub, remaining = command.resolve_command(context, rest)
        assert sub is not None, f"no such command {name}"
        command = sub
        context = sub.make_context(name or "", remaining, parent=context)


def test_the_documented_backup_restores_the_registry(tmp_path: Path, alice: object) -> None:
    """operations.md's backup command, run as written on a live store."""
    import subprocess

    from keystore.storage.sqlite import SQLiteKeyStore
    from keystore.validate import validate_key

    (backup,) = [c for _, c in COMMANDS if c[0] == "sqlite3"]
    live = tmp_path / "keys.sqlite"
    store = SQLiteKeyStore(live, create=True)
    validated = validate_key(alice.public)  # type: ignore[attr-defined]
    store.bind(validated.addresses[0], validated.key)
    paths = {"/var/lib/gpgfilter/": f"{tmp_path}/", "/var/backups/": f"{tmp_path}/b-"}
    command = [w for w in backup]
    for old, new in paths.items():
        command = [w.replace(old, new) for w in command]
    subprocess.run(command, check=True, timeout=60)  # while the store is open
    store.close()
    restored = SQLiteKeyStore(tmp_path / "b-gpgfilter-keys.sqlite")
    assert [b.address for b in restored.bindings()] == list(validated.addresses)
    restored.close()
