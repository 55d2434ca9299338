"""``gpgfilter setup``: wire the filter into Postfix (and Dovecot where needed), auditably.

Postfix's own ``postconf -e`` / ``postconf -M -e`` make every change, so Postfix checks the
syntax and nothing edits its files by string manipulation. Every run first computes a plan
(parameter, old value, new value); ``--dry-run`` prints it and stops. What is changed is kept in
a record beside the filter's data, with the files as they were, so ``--undo`` restores them
byte for byte, or (when an administrator edited them since) reverts our parameters alone.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpgfilter.ops.commands import Runner, SetupError, run_command
from gpgfilter.ops.dovecot import (
    DEFAULT_DOVECOT_CONFIG,
    DOVECOT_DROP_IN,
    dovecot_drop_in,
    dovecot_lmtp_listeners,
    serves,
)
from gpgfilter.ops.postfix import (
    ROUTE_MAP,
    Postconf,
    content_filter_parameters,
    lmtp_parameters,
    probe_failed,
    route_map_text,
    route_probe,
    route_table,
)
from gpgfilter.process.config import Config, Endpoint


@dataclass(frozen=True, slots=True)
class Change:
    """One setting: ``old`` None means it was not set (main.cf) or did not exist."""

    where: str  # "main.cf", "master.cf" or a Dovecot drop-in file
    name: str
    old: str | None
    new: str | None

    def describe(self) -> str:
        old = "(not set)" if self.old is None else self.old
        new = "(removed)" if self.new is None else self.new
        return f"{self.where}: {self.name}: {old} -> {new}"


@dataclass
class Plan:
    mode: str
    changes: list[Change] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Dovecot may well not run while it is being set up: its reload may fail harmlessly.
    dovecot_reload: list[str] | None = None
    # route: enrolled: the lookup table's file, its text and mode (written before main.cf
    # names it), and the command that proves Postfix's own user can query the store with it.
    route_file: tuple[Path, str, int] | None = None
    route_probe: list[str] | None = None
    route_owner: str = "postfix"

    @property
    def shown_commands(self) -> list[list[str]]:
        return ([self.dovecot_reload] if self.dovecot_reload else []) + self.commands


def _filter_target(config: Config) -> str:
    return lmtp_parameters(config)["virtual_transport"]


def plan_setup(
    config: Config,
    postconf: Postconf,
    *,
    dovecot_config: Path | None = DEFAULT_DOVECOT_CONFIG,
    run: Runner = run_command,
) -> Plan:
    """What ``setup`` would change, without changing anything."""
    plan = Plan(config.mode if config.mode == "lmtp" else "content_filter")
    main: dict[str, str]
    master: dict[str, str] = {}
    if config.mode == "lmtp":
        main = lmtp_parameters(config)
        if postconf.effective("content_filter"):
            raise SetupError(
                "Postfix has content_filter set: gpgfilter is wired in content-filter mode"
                " (or another filter is). Run `gpgfilter setup --undo` first, or use mode: smtp."
            )
        if postconf.service("lmtp/unix") is None:
            raise SetupError("master.cf has no lmtp/unix service: Postfix cannot deliver over LMTP")
        target = main.pop("virtual_transport")
        if config.route == "enrolled":
            _plan_route(config, postconf, plan, main, target, run)
        else:
            _plan_route_all(config, postconf, plan, main, target)
        _plan_dovecot(config, plan, dovecot_config, run)
    else:
        if postconf.effective("virtual_transport") == _filter_target(config):
            raise SetupError("Postfix is wired in LMTP mode: run `gpgfilter setup --undo` first.")
        main, master = content_filter_parameters(config)
    _plan_postconf(config, postconf, plan, main, master, run)
    return plan


def _plan_route_all(
    config: Config, postconf: Postconf, plan: Plan, main: dict[str, str], target: str
) -> None:
    """Every mailbox delivery through the filter: it replaces the LMTP transports."""
    if ROUTE_MAP in (postconf.explicit("transport_maps") or ""):
        raise SetupError(
            "Postfix routes only enrolled recipients through gpgfilter (transport_maps):"
            " run `gpgfilter setup --undo` first to route every message."
        )
    routed = False
    for name in ("virtual_transport", "mailbox_transport"):
        current = postconf.effective(name)
        if current == target:
            routed = True
        elif current.startswith("lmtp:"):
            main[name] = target
            routed = True
            plan.notes.append(f"Postfix delivered over LMTP with {name} = {current}")
    if not routed:
        raise SetupError(
            "Postfix does not deliver mailboxes over LMTP (virtual_transport ="
            f" {postconf.effective('virtual_transport')}, mailbox_transport ="
            f" {postconf.effective('mailbox_transport') or '(none)'}): deliver to Dovecot"
            " over LMTP first, or use content-filter mode (mode: smtp)."
        )


def _plan_route(
    config: Config,
    postconf: Postconf,
    plan: Plan,
    main: dict[str, str],
    target: str,
    run: Runner,
) -> None:
    """Only enrolled recipients through the filter: a ``transport_maps`` table that reads the
    key store answers the filter's transport for them; the rest keep ``virtual_transport``
    (Dovecot). Addresses of local(8) domains cannot be routed so: local(8) expands aliases and
    .forward files after the table was asked, so their mail keeps passing the filter whole."""
    current = postconf.effective("virtual_transport")
    if current == target:
        raise SetupError(
            f"Postfix routes every message through gpgfilter (virtual_transport = {target}):"
            " run `gpgfilter setup --undo` first, then `gpgfilter setup --route enrolled`."
        )
    if not current.startswith("lmtp:"):
        raise SetupError(
            f"Postfix does not deliver virtual mailboxes over LMTP (virtual_transport ="
            f" {current}): --route enrolled sends unenrolled mail there directly, so deliver to"
            " Dovecot over LMTP first."
        )
    domains = postconf.expanded("virtual_mailbox_domains")
    if not domains:
        raise SetupError(
            "virtual_mailbox_domains is empty: --route enrolled routes addresses of virtual"
            " mailbox domains; mail of local(8) domains (mydestination) goes through alias and"
            " .forward expansion after routing, so it can only be filtered whole (route: all)."
        )
    plan.notes.append(f"addresses without a key go to {current} directly (virtual_transport)")
    mailbox = postconf.effective("mailbox_transport")
    if mailbox.startswith("lmtp:") and mailbox != target:
        main["mailbox_transport"] = target
        plan.notes.append(
            "mailbox_transport delivers local(8) mailboxes over LMTP: all their mail passes"
            " the filter (aliases and .forward are expanded after routing)"
        )
    table = route_table(postconf, config)
    maps = postconf.explicit("transport_maps") or ""
    if table not in maps:
        main["transport_maps"] = f"{table}, {maps}" if maps.strip() else table
    path = postconf.config_dir / ROUTE_MAP
    text, mode = route_map_text(config, domains)
    try:
        old: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    if old != text:
        where = (
            "PostgreSQL (keystore.dsn)"
            if config.keystore.backend == "postgresql"
            else str(config.keystore_path)
        )
        shown_old = None if old is None else "(another version)"
        plan.changes.append(
            Change(str(path), "transport table", shown_old, f"lookups in {where} for {domains}")
        )
        plan.route_file = (path, text, mode)
    owner = postconf.effective("mail_owner") or "postfix"
    plan.route_owner = owner
    probe = route_probe(postconf, config, domains, owner)
    plan.route_probe = probe


def _plan_postconf(
    config: Config,
    postconf: Postconf,
    plan: Plan,
    main: dict[str, str],
    master: dict[str, str],
    run: Runner,
) -> None:
    for name, entry in master.items():
        service = postconf.service(name)
        if service is None or service.split() != entry.split():
            plan.changes.append(Change("master.cf", name, service, entry))
            plan.commands.append(postconf.command("-M", "-e", f"{name} = {entry}"))
    for name, value in main.items():
        explicit = postconf.explicit(name)
        if explicit != value:
            plan.changes.append(Change("main.cf", name, explicit, value))
    assignments = [f"{c.name}={c.new}" for c in plan.changes if c.where == "main.cf"]
    if assignments:
        plan.commands.append(postconf.command("-e", *assignments))
    delimiter = postconf.effective("recipient_delimiter")
    if delimiter and set(delimiter) != set(config.recipient_delimiter):
        plan.notes.append(
            f"warning: Postfix's recipient_delimiter is {delimiter!r}, gpgfilter's is"
            f" {config.recipient_delimiter!r}; set recipient_delimiter: {delimiter!r} in the"
            " gpgfilter configuration so sub-addresses find their owner's key"
        )
    if plan.changes and _postfix_running(postconf, run):
        plan.commands.append(["postfix", "-c", str(postconf.config_dir), "reload"])


def _plan_dovecot(config: Config, plan: Plan, dovecot_config: Path | None, run: Runner) -> None:
    target = config.deliver_to
    if dovecot_config is None:
        plan.notes.append(f"Dovecot not checked; gpgfilter delivers to {target}")
        return
    listeners = dovecot_lmtp_listeners(dovecot_config, run)
    if listeners is None:
        plan.notes.append(
            f"no Dovecot configuration at {dovecot_config}; make sure an LMTP server listens"
            f" on {target}"
        )
        return
    if serves(listeners, target):
        plan.notes.append(f"Dovecot's LMTP already listens on {target}")
        return
    if target.is_unix:
        raise SetupError(
            f"Dovecot has no LMTP listener at {target.path}: set deliver: in the gpgfilter"
            " configuration to one of Dovecot's listeners"
            f" ({', '.join(map(str, listeners.inet)) or ', '.join(listeners.unix)})"
        )
    drop_in = dovecot_config.parent / "conf.d" / DOVECOT_DROP_IN
    plan.changes.append(Change(str(drop_in), "service lmtp inet_listener", None, str(target)))
    plan.dovecot_reload = ["doveadm", "-c", str(dovecot_config), "reload"]


def _postfix_running(postconf: Postconf, run: Runner) -> bool:
    try:
        done = run(["postfix", "-c", str(postconf.config_dir), "status"])
    except FileNotFoundError:
        return False
    return done.returncode == 0


# -- applying and undoing --------------------------------------------------------------------


@dataclass
class Record:
    """What setup changed, to undo it: the changes and the files before and after."""

    postfix_dir: str
    mode: str
    changes: list[dict[str, str | None]]
    files_before: dict[str, str]
    files_after: dict[str, str]
    created: list[str]
    at: int


def record_path(data_dir: Path, postfix_dir: Path) -> Path:
    digest = hashlib.sha256(str(postfix_dir.resolve()).encode()).hexdigest()[:16]
    return data_dir / "setup" / f"postfix-{digest}.json"


def _read_files(postconf: Postconf) -> dict[str, str]:
    return {
        str(p): p.read_text(encoding="utf-8", errors="surrogateescape")
        for p in (postconf.main_cf(), postconf.master_cf())
    }


def _write_atomically(path: Path, text: str) -> None:
    stat = path.stat()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
            out.write(text)
        os.chmod(tmp, stat.st_mode & 0o7777)
        os.chown(tmp, stat.st_uid, stat.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def apply_plan(
    plan: Plan,
    config: Config,
    postconf: Postconf,
    *,
    dovecot_config: Path | None = DEFAULT_DOVECOT_CONFIG,
    run: Runner = run_command,
) -> tuple[Path, list[str]]:
    """Make the planned changes and keep the record that undoes them; returns its path and
    warnings."""
    path = record_path(config.data_dir, postconf.config_dir)
    previous = _load_record(path)
    before = previous.files_before if previous else _read_files(postconf)
    created = list(previous.created) if previous else []
    warnings: list[str] = []
    if plan.route_file is not None:
        _write_route_table(plan, config, run)
        if str(plan.route_file[0]) not in created:
            created.append(str(plan.route_file[0]))
    for change in plan.changes:
        if plan.route_file is not None and change.where == str(plan.route_file[0]):
            continue
        if change.where not in ("main.cf", "master.cf") and change.new is not None:
            drop_in = Path(change.where)
            drop_in.parent.mkdir(parents=True, exist_ok=True)
            target = Endpoint.parse(change.new)
            drop_in.write_text(dovecot_drop_in(target), encoding="utf-8")
            created.append(str(drop_in))
            listeners = dovecot_lmtp_listeners(dovecot_config or DEFAULT_DOVECOT_CONFIG, run)
            if listeners is None or not serves(listeners, target):
                drop_in.unlink()
                raise SetupError(
                    f"Dovecot does not read {drop_in}: add `!include_try conf.d/*.conf` to"
                    f" {dovecot_config}, or an LMTP inet_listener on {target} yourself"
                )
    if plan.dovecot_reload:
        done = run(plan.dovecot_reload)
        if done.returncode != 0:
            warnings.append(
                "Dovecot was not reloaded (is it running?); it listens for gpgfilter once it"
                " (re)starts"
            )
    for command in plan.commands:
        done = run(command)
        if done.returncode != 0 or "warning:" in done.stderr:
            raise SetupError(f"{shlex.join(command)} failed: {done.stderr.strip()}")
    changes = [asdict(c) for c in plan.changes]
    if previous:
        known = {(c["where"], c["name"]) for c in previous.changes}
        changes = previous.changes + [c for c in changes if (c["where"], c["name"]) not in known]
    record = Record(
        postfix_dir=str(postconf.config_dir),
        mode=plan.mode,
        changes=changes,
        files_before=before,
        files_after=_read_files(postconf),
        created=created,
        at=int(time.time()),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(asdict(record), indent=2), encoding="utf-8")
    return path, warnings


def _write_route_table(plan: Plan, config: Config, run: Runner) -> None:
    """Write the table, then ask it as Postfix's own user would: a table Postfix cannot read
    would defer every enrolled recipient's mail, so it is refused before main.cf names it."""
    assert plan.route_file is not None
    path, text, mode = plan.route_file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)
        if mode & 0o040 and os.geteuid() == 0:
            owner = plan.route_owner
            with contextlib.suppress(KeyError):
                os.chown(tmp, 0, grp.getgrnam(owner).gr_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if plan.route_probe is None:
        return
    done = run(plan.route_probe)
    if probe_failed(done.returncode, done.stderr):
        path.unlink(missing_ok=True)
        where = (
            "the PostgreSQL store"
            if config.keystore.backend == "postgresql"
            else f"{config.keystore_path} (and its directory, -wal and -shm files)"
        )
        raise SetupError(
            f"Postfix's user cannot query {where} through {path}:"
            f" {done.stderr.strip()[-300:]}; give it read access (e.g. group postfix with"
            " g+rx on the directory and g+r on the files), then run setup again"
        )


def _load_record(path: Path) -> Record | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise SetupError(f"cannot read the setup record {path}: {error}") from None
    return Record(**data)


def undo(
    config: Config,
    postconf: Postconf,
    *,
    dry_run: bool = False,
    dovecot_config: Path | None = DEFAULT_DOVECOT_CONFIG,
    run: Runner = run_command,
) -> list[str]:
    """Restore what setup changed; returns what was (or, dry, would be) done."""
    path = record_path(config.data_dir, postconf.config_dir)
    record = _load_record(path)
    if record is None:
        return [f"nothing to undo: no setup record for {postconf.config_dir} ({path})"]
    done: list[str] = []
    current = _read_files(postconf)
    if current == record.files_after:
        for name, text in record.files_before.items():
            done.append(f"restore {name} as it was before setup")
            if not dry_run:
                _write_atomically(Path(name), text)
    else:
        done.append("main.cf or master.cf changed since setup: reverting gpgfilter's settings only")
        for change in record.changes:
            command = _revert_command(postconf, change)
            if command:
                done.append(shlex.join(command))
                if not dry_run:
                    _check(run(command), command)
    for created in record.created:
        done.append(f"remove {created}")
        if not dry_run:
            Path(created).unlink(missing_ok=True)
    if record.created and dovecot_config is not None:
        command = ["doveadm", "-c", str(dovecot_config), "reload"]
        done.append(shlex.join(command))
        if not dry_run:
            run(command)  # Dovecot may not run at all; nothing to reload then
    if _postfix_running(postconf, run):
        command = ["postfix", "-c", str(postconf.config_dir), "reload"]
        done.append(shlex.join(command))
        if not dry_run:
            _check(run(command), command)
    if not dry_run:
        path.unlink()
    return done


def _revert_command(postconf: Postconf, change: dict[str, str | None]) -> list[str] | None:
    name, old, where = change["name"], change["old"], change["where"]
    assert name is not None
    if where == "main.cf":
        return (
            postconf.command("-X", name) if old is None else postconf.command("-e", f"{name}={old}")
        )
    if where == "master.cf":
        return (
            postconf.command("-MX", name)
            if old is None
            else postconf.command("-M", "-e", f"{name} = {old}")
        )
    return None


def _check(done: subprocess.CompletedProcess[str], command: Sequence[str]) -> None:
    if done.returncode != 0:
        raise SetupError(f"{shlex.join(command)} failed: {done.stderr.strip()}")
