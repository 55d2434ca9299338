"""``gpgfilter setup``: wire the filter into Postfix (and Dovecot where needed), auditably.

Postfix's own ``postconf -e`` / ``postconf -M -e`` make every change, so Postfix checks the
syntax and nothing edits its files by string manipulation. Every run first computes a plan
(parameter, old value, new value); ``--dry-run`` prints it and stops. What is changed is kept in
a record beside the filter's data, with the files as they were, so ``--undo`` restores them
byte for byte, or (when an administrator edited them since) reverts our parameters alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpgfilter.process.config import Config, Endpoint

DEFAULT_POSTFIX_DIR = Path("/etc/postfix")
DEFAULT_DOVECOT_CONFIG = Path("/etc/dovecot/dovecot.conf")
DOVECOT_DROP_IN = "99-gpgfilter.conf"


class SetupError(RuntimeError):
    """Setup cannot proceed; the message says why and what to do."""


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

    @property
    def shown_commands(self) -> list[list[str]]:
        return ([self.dovecot_reload] if self.dovecot_reload else []) + self.commands


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def run_command(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


class Postconf:
    """Postfix's configuration as ``postconf -c DIR`` reads and writes it."""

    def __init__(self, config_dir: Path, run: Runner = run_command) -> None:
        self.config_dir = config_dir
        self._run = run
        if not (config_dir / "main.cf").is_file():
            raise SetupError(f"no Postfix configuration in {config_dir} (main.cf missing)")

    def command(self, *args: str) -> list[str]:
        return ["postconf", "-c", str(self.config_dir), *args]

    def _query(self, *args: str) -> str:
        done = self._run(self.command(*args))
        if done.returncode != 0:
            raise SetupError(f"{shlex.join(self.command(*args))}: {done.stderr.strip()}")
        return done.stdout

    def explicit(self, name: str) -> str | None:
        """The value main.cf sets, or None when Postfix uses its default."""
        for line in self._query("-n", name).splitlines():
            key, sep, value = line.partition(" = ")
            if sep and key == name:
                return value
            if line == f"{name} =":
                return ""
        return None

    def effective(self, name: str) -> str:
        return self._query("-h", name).strip()

    def service(self, name: str) -> str | None:
        """A master.cf entry (``name/type``) in one line, or None when there is none."""
        done = self._run(self.command("-M", name))
        line = " ".join(done.stdout.split())
        return line or None

    def main_cf(self) -> Path:
        return self.config_dir / "main.cf"

    def master_cf(self) -> Path:
        return self.config_dir / "master.cf"


@dataclass(frozen=True, slots=True)
class DovecotListeners:
    inet: tuple[Endpoint, ...]
    unix: tuple[str, ...]


def dovecot_lmtp_listeners(config_file: Path, run: Runner = run_command) -> DovecotListeners | None:
    """Dovecot's LMTP listeners as ``doveconf`` reports them; None without Dovecot."""
    if not config_file.exists():
        return None
    try:
        done = run(["doveconf", "-c", str(config_file), "service/lmtp"])
    except FileNotFoundError:
        return None
    if done.returncode != 0:
        raise SetupError(f"doveconf -c {config_file}: {done.stderr.strip()}")
    inet: list[Endpoint] = []
    unix: list[str] = []
    base_dir = "/run/dovecot"
    base = run(["doveconf", "-c", str(config_file), "-h", "base_dir"])
    if base.returncode == 0 and base.stdout.strip():
        base_dir = base.stdout.strip()
    for kind, body in re.findall(r"(inet|unix)_listener \S+ \{(.*?)\}", done.stdout, re.S):
        settings = dict(re.findall(r"^\s*(\w+) = ?(.*)$", body, re.M))
        if kind == "inet":
            port = settings.get("port", "0")
            addresses = settings.get("address", "").split() or ["*"]
            for address in addresses:
                if port.isdigit() and int(port) > 0:
                    inet.append(Endpoint(address, int(port)))
        else:
            path = settings.get("path", "")
            if path and not path.startswith("/"):
                path = f"{base_dir}/{path}"
            unix.append(path)
    names = re.findall(r"unix_listener (\S+) \{", done.stdout)
    unix = [p if p else f"{base_dir}/{n}" for p, n in zip(unix, names, strict=True)]
    return DovecotListeners(tuple(inet), tuple(unix))


def _serves(listeners: DovecotListeners, target: Endpoint) -> bool:
    if target.is_unix:
        return target.path in listeners.unix
    wildcard = {"*", "0.0.0.0"} if ":" not in target.host else {"::", "[::]"}  # noqa: S104
    return any(
        e.port == target.port and (e.host == target.host or e.host in wildcard)
        for e in listeners.inet
    )


def _transport_to(endpoint: Endpoint, protocol: str) -> str:
    if endpoint.is_unix:
        return f"{protocol}:unix:{endpoint.path}"
    host = f"[{endpoint.host}]"
    return f"{protocol}:inet:{host}:{endpoint.port}" if protocol == "lmtp" else host


def lmtp_parameters(config: Config) -> dict[str, str]:
    """main.cf for LMTP mode; the same settings as ``postfix/lmtp-mode/main.cf``."""
    listen = config.listen
    if listen.is_unix:
        transport = f"lmtp:unix:{listen.path}"
    else:
        transport = f"lmtp:inet:{listen.host}:{listen.port}"
    return {
        "virtual_transport": transport,
        "lmtp_destination_recipient_limit": "50",
        "lmtp_destination_concurrency_limit": "8",
        "lmtp_data_done_timeout": "600s",
    }


def content_filter_parameters(config: Config) -> tuple[dict[str, str], dict[str, str]]:
    """main.cf and master.cf for content-filter mode; as ``postfix/content-filter/``."""
    listen = config.listen
    if listen.is_unix:
        raise SetupError("content-filter mode needs the filter on TCP (listen: HOST:PORT)")
    reinject = config.deliver_to
    if reinject.is_unix:
        raise SetupError("content-filter mode reinjects over TCP (deliver: HOST:PORT)")
    main = {
        "content_filter": f"gpgfilter:[{listen.host}]:{listen.port}",
        "gpgfilter_destination_recipient_limit": "1",
    }
    master = {
        "gpgfilter/unix": "gpgfilter unix - - n - 10 smtp"
        " -o syslog_name=postfix/gpgfilter"
        " -o smtp_send_xforward_command=yes"
        " -o disable_mime_output_conversion=yes"
        " -o smtp_generic_maps="
        " -o smtp_tls_security_level=none",
        f"{reinject.host}:{reinject.port}/inet": f"{reinject.host}:{reinject.port} inet n - n - 10"
        " smtpd"
        " -o syslog_name=postfix/gpgfilter-reinject"
        " -o content_filter="
        " -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,"
        "no_milters,no_address_mappings"
        " -o smtpd_helo_restrictions="
        " -o smtpd_client_restrictions="
        " -o smtpd_sender_restrictions="
        " -o smtpd_relay_restrictions="
        " -o smtpd_recipient_restrictions=permit_mynetworks,reject"
        " -o smtpd_data_restrictions="
        " -o mynetworks=127.0.0.0/8"
        " -o smtpd_authorized_xforward_hosts=127.0.0.0/8"
        " -o smtpd_tls_security_level=none"
        " -o smtpd_sasl_auth_enable=no",
    }
    return main, master


def dovecot_drop_in(target: Endpoint) -> str:
    """A Dovecot LMTP listener where the filter delivers (as ``postfix/dovecot/lmtp.conf``)."""
    return (
        "# Written by `gpgfilter setup`: the LMTP listener gpgfilter delivers to.\n"
        "# `gpgfilter setup --undo` removes this file.\n"
        "protocols = $protocols lmtp\n"
        "service lmtp {\n"
        "  inet_listener lmtp {\n"
        f"    address = {target.host}\n"
        f"    port = {target.port}\n"
        "  }\n"
        "}\n"
        "quota_full_tempfail = yes\n"
    )


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
        _plan_dovecot(config, plan, dovecot_config, run)
    else:
        if postconf.effective("virtual_transport") == _filter_target(config):
            raise SetupError("Postfix is wired in LMTP mode: run `gpgfilter setup --undo` first.")
        main, master = content_filter_parameters(config)
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
    return plan


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
    if _serves(listeners, target):
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
    for change in plan.changes:
        if change.where not in ("main.cf", "master.cf") and change.new is not None:
            drop_in = Path(change.where)
            drop_in.parent.mkdir(parents=True, exist_ok=True)
            target = Endpoint.parse(change.new)
            drop_in.write_text(dovecot_drop_in(target), encoding="utf-8")
            created.append(str(drop_in))
            listeners = dovecot_lmtp_listeners(dovecot_config or DEFAULT_DOVECOT_CONFIG, run)
            if listeners is None or not _serves(listeners, target):
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
