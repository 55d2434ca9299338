"""The ``gpgfilter`` command: run the filter, manage the key registry."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from gpgfilter.mailbox.queue import EnrolmentQueue
from gpgfilter.openpgp.engine import EngineError
from gpgfilter.ops import setup as setup_module
from gpgfilter.ops import sweeptimer
from gpgfilter.ops.commands import SetupError, run_command
from gpgfilter.ops.doctor import run_checks
from gpgfilter.ops.dovecot import DEFAULT_DOVECOT_CONFIG
from gpgfilter.ops.postfix import DEFAULT_POSTFIX_DIR, Postconf
from gpgfilter.process.config import Config, ConfigError, load
from gpgfilter.process.service import run
from keystore.logsafe import setup_logging
from keystore.model import HEADER_PROTECTION_MODES
from keystore.registration import MailError, Notice, Outcome, Policy, Refused, Registry
from keystore.storage.open import open_store
from keystore.store import KeyStore, StoreError
from keystore.validate import MAX_KEY_BYTES


def _load(ctx: click.Context, overrides: dict[str, Any] | None = None) -> Config:
    path: Path | None = ctx.obj["config_path"]
    try:
        return load(path, overrides)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None


def _config_after_command(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config_path"] = value


config_option = click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    expose_value=False,
    callback=_config_after_command,
    help="YAML configuration file (may also stand before the command).",
)


@click.group()
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML configuration file (default: embedded defaults).",
)
@click.version_option(package_name="gpgfilter")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Encrypt incoming mail to each recipient's OpenPGP key before it is stored."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


@main.command()
@config_option
@click.option("--listen", help="Address to listen on, HOST:PORT or unix:/path.")
@click.option("--mode", type=click.Choice(["lmtp", "smtp"]), help="Protocol spoken both ways.")
@click.option("--deliver", help="Downstream: Dovecot LMTP or Postfix reinjection, HOST:PORT.")
@click.option("--data-dir", help="Directory for the key store and gpg state.")
@click.option("--metrics-listen", help="HOST:PORT for the Prometheus endpoint.")
@click.pass_context
def serve(
    ctx: click.Context,
    listen: str | None,
    mode: str | None,
    deliver: str | None,
    data_dir: str | None,
    metrics_listen: str | None,
) -> None:
    """Run the filter."""
    overrides = {
        "listen": listen,
        "mode": mode,
        "deliver": deliver,
        "data_dir": data_dir,
        "metrics.listen": metrics_listen,
    }
    config = _load(ctx, overrides)
    setup_logging(config.log_level)
    try:
        run(config, config_path=ctx.obj["config_path"], overrides=overrides)
    except (StoreError, EngineError, OSError) as error:
        raise click.ClickException(str(error)) from None


@main.command()
@config_option
@click.option("--listen", help="Address to listen on, HOST:PORT or unix:/path.")
@click.pass_context
def keyserver(ctx: click.Context, listen: str | None) -> None:
    """Run the self-service key registration service (HTTP)."""
    from gpgfilter.process import keyserver as service  # noqa: PLC0415  (aiohttp is only needed here)

    config = _load(ctx, {"keyserver.listen": listen})
    setup_logging(config.log_level)
    try:
        service.run(config)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None
    except (StoreError, OSError) as error:
        raise click.ClickException(str(error)) from None


@main.group()
def keys() -> None:
    """Manage the registry of recipients' public keys."""


def _store(config: Config, *, create: bool) -> KeyStore:
    try:
        return open_store(config.keystore, config.keystore_path, create=create)
    except StoreError as error:
        raise click.ClickException(str(error)) from None


class _NoNotices:
    """The CLI audits its changes but mails no notices: an administrator moving 2,000 users in
    tells them once, in their own words, rather than 2,000 automatic mails."""

    async def send_challenge(self, *_args: object, **_kwargs: object) -> None:
        raise MailError("the command line sends no challenges")

    async def send_notice(self, notice: Notice) -> None:
        return None


def _registry(config: Config, store: KeyStore, domains: tuple[str, ...]) -> Registry:
    """The registration rules as the command line applies them: the admin's path (no
    challenge), audited with the actor "cli", no notice mails."""
    return Registry(
        store,
        _NoNotices(),
        Policy(gpg_binary=config.gpg.binary, min_valid_days=0, max_key_bytes=MAX_KEY_BYTES),
        domains=domains,
        delimiters=config.recipient_delimiter,
        enrolment=(
            EnrolmentQueue.under(config.data_dir) if config.mailbox.encrypt_on_enrolment else None
        ),
    )


def _split_keys(chunks: list[bytes], gnupg_home: Path | None, gpg: str) -> list[tuple[str, bytes]]:
    """Each public key of the inputs (and of a GnuPG home) as its own export, by fingerprint:
    gpg reads whatever another filter left (binary, armored, several blocks, pubring.gpg)."""
    base = [gpg, "--batch", "--no-tty", "--no-auto-check-trustdb", "--lock-never"]
    data = b"".join(chunks)
    if gnupg_home is not None:
        done = subprocess.run(
            [*base, "--homedir", str(gnupg_home), "--export"],
            capture_output=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0 and not done.stdout:
            raise click.ClickException(f"gpg could not export the keys of {gnupg_home}")
        data += done.stdout
    with tempfile.TemporaryDirectory(prefix="gpgfilter-import-") as tmp:
        try:
            return _keys_in(data, [*base, "--homedir", tmp])
        finally:
            # Importing, and asking for secret keys, start a gpg-agent in the scratch home: it
            # must not outlive the home (the refusal of secret keys needs it while it runs).
            subprocess.run(
                ["gpgconf", "--homedir", tmp, "--kill", "all"],
                capture_output=True,
                timeout=60,
                check=False,
            )


def _keys_in(data: bytes, home: list[str]) -> list[tuple[str, bytes]]:
    """Each public key in ``data`` as its own export, read with gpg in the scratch ``home``."""
    subprocess.run([*home, "--import"], input=data, capture_output=True, timeout=600, check=False)
    secret = subprocess.run(
        [*home, "--with-colons", "--list-secret-keys"],
        capture_output=True,
        timeout=60,
        check=False,
    ).stdout
    if secret.strip():
        raise click.ClickException(
            "the input holds a secret key: export the public keys only (nothing imported)"
        )
    listing = subprocess.run(
        [*home, "--with-colons", "--list-keys"], capture_output=True, timeout=600, check=False
    ).stdout.decode("utf-8", "replace")
    fingerprints: list[str] = []
    primary = False
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sub"):
            primary = fields[0] == "pub"
        elif fields[0] == "fpr" and primary and len(fields) > 9:
            fingerprints.append(fields[9])
            primary = False
    keys = []
    for fingerprint in fingerprints:
        exported = subprocess.run(
            [*home, "--export", fingerprint], capture_output=True, timeout=60, check=False
        ).stdout
        keys.append((fingerprint, exported))
    return keys


@keys.command("import")
@config_option
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--address", help="Bind each key to this address, whatever its user IDs say.")
@click.option(
    "--gnupg-home",
    type=click.Path(path_type=Path, file_okay=False),
    help="Also import every public key of this GnuPG home (read only).",
)
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.pass_context
def import_keys(
    ctx: click.Context,
    files: tuple[Path, ...],
    address: str | None,
    gnupg_home: Path | None,
    dry_run: bool,
) -> None:
    """Validate public keys and register them for their addresses in the served domains.

    FILES (- for standard input) may hold many keys. One line per key and a summary. Exit
    status: 0 every key registered, renewed, unchanged or revoked; 1 some key refused (the
    others were imported) or nothing could be done (unreadable input, store unavailable).
    """

    config = _load(ctx)
    setup_logging("warning")
    if not files and gnupg_home is None:
        raise click.UsageError("name key files (- for standard input) or --gnupg-home")
    if dry_run and address:
        # An explicit binding is one key for one address: nothing to preview but the binding.
        raise click.UsageError("--dry-run previews imports by user ID; it does not take --address")
    if gnupg_home is not None and not gnupg_home.is_dir():
        raise click.ClickException(f"{gnupg_home}: no such GnuPG home")
    chunks = []
    for path in files:
        try:
            chunks.append(sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes())
        except OSError as error:
            raise click.ClickException(f"{path}: cannot read: {error.strerror}") from None
    found = _split_keys(chunks, gnupg_home, config.gpg.binary)
    if not found:
        raise click.ClickException("no OpenPGP public key found in the input")
    domains: tuple[str, ...] = config.served_domains
    if not domains:
        click.echo("note: no domains: configured: keys are bound to all their user IDs", err=True)
        domains = tuple(
            sorted({u.rpartition("@")[2].rstrip(">").lower() for _, d in found for u in _uids(d)})
        )
    scratch = tempfile.TemporaryDirectory(prefix="gpgfilter-dry-")
    if dry_run and config.keystore.backend == "sqlite" and not config.keystore_path.exists():
        # Nothing registered yet: a dry run reports against an empty store, and makes none.
        store = open_store(config.keystore, Path(scratch.name) / "keys.sqlite", create=True)
    else:
        store = _store(config, create=not dry_run)
    registry = _registry(config, store, domains)
    counts: dict[str, int] = {}

    async def one(data: bytes) -> list[Outcome]:
        if address:
            return [await registry.admin_bind(address, data, actor="cli")]
        return await registry.admin_import(data, actor="cli", dry_run=dry_run)

    try:
        for fingerprint, data in found:
            try:
                outcomes = asyncio.run(one(data))
            except Refused as refused:
                stored = store.key(fingerprint) if refused.code == "key-revoked" else None
                if stored is not None and stored.revoked:
                    counts["unchanged"] = counts.get("unchanged", 0) + 1
                    click.echo(f"{fingerprint} is revoked: unchanged, mail stays held")
                    continue
                counts["refused"] = counts.get("refused", 0) + 1
                click.echo(f"{fingerprint} refused: {refused}")
                continue
            for outcome in outcomes:
                counts[outcome.action] = counts.get(outcome.action, 0) + 1
                if outcome.action == "revoked":
                    click.echo(
                        f"{fingerprint} is revoked: mail for {outcome.address} is held"
                        " (policy.unusable_key) until a new key is registered"
                    )
                else:
                    click.echo(f"{fingerprint} {outcome.action} for {outcome.address}")
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    finally:
        store.close()
        scratch.cleanup()
    summary = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
    click.echo(
        f"{len(found)} key(s): {summary}" + (" (dry run: nothing changed)" if dry_run else "")
    )
    if counts.get("refused"):
        sys.exit(1)


def _uids(data: bytes) -> list[str]:
    """Addresses named in a key's user IDs, for the domains of a registry without domains:."""
    return [m.decode("utf-8", "replace") for m in re.findall(rb"[\w.+-]+@[\w.-]+", data)]


@keys.command("list")
@config_option
@click.pass_context
def list_keys(ctx: click.Context) -> None:
    """Show every address and the key it is bound to."""
    config = _load(ctx)
    if config.keystore.backend == "sqlite" and not config.keystore_path.exists():
        click.echo(f"no key store yet at {config.keystore_path}", err=True)
        return
    store = _store(config, create=False)
    try:
        bindings = store.bindings()
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    for binding in bindings:
        key = binding.key
        expires = "never"
        if key.expires:
            expires = datetime.fromtimestamp(key.expires, UTC).strftime("%Y-%m-%d")
        usable = "usable" if key.usable_encryption_keys() else "UNUSABLE"
        click.echo(f"{binding.address}\t{key.fingerprint}\texpires {expires}\t{usable}")
    store.close()


@keys.command("remove")
@config_option
@click.argument("target")
@click.option(
    "--revoked-too",
    is_flag=True,
    help="Also remove a revoked key (mail for its addresses is then no longer held).",
)
@click.pass_context
def remove_key(ctx: click.Context, target: str, revoked_too: bool) -> None:
    """Remove an address's keys, or a key (by fingerprint) from every address."""
    config = _load(ctx)
    store = _store(config, create=False)
    registry = _registry(config, store, config.served_domains)
    try:
        outcomes = asyncio.run(registry.admin_remove(target, actor="cli", revoked_too=revoked_too))
    except Refused as refused:
        if refused.code == "revoked-key-stays":
            raise click.ClickException(f"{refused}; or remove it with --revoked-too") from None
        raise click.ClickException(str(refused)) from None
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    finally:
        store.close()
    click.echo(f"removed {len(outcomes)} binding(s)")


@keys.command("protect")
@config_option
@click.argument("address")
@click.argument("setting", type=click.Choice([*HEADER_PROTECTION_MODES, "default"]))
@click.pass_context
def protect_header(ctx: click.Context, address: str, setting: str) -> None:
    """Set an address's header protection: off, copy, hide-subject, or default (the
    configuration's policy.header_protection). The address must have a key registered."""
    config = _load(ctx)
    store = _store(config, create=False)
    mode = next((m for m in HEADER_PROTECTION_MODES if m == setting), None)
    registry = _registry(config, store, config.served_domains)
    try:
        outcome = asyncio.run(registry.admin_header_protection(address, mode, actor="cli"))
    except Refused as refused:
        if refused.code == "nothing-registered":
            raise click.ClickException(f"nothing registered for {address}") from None
        raise click.ClickException(f"{address}: {refused}") from None
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    finally:
        store.close()
    effective = mode or f"{config.policy.header_protection} (the default)"
    click.echo(f"{outcome.address}: header protection {effective}")


_postfix_dir_option = click.option(
    "--postfix-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_POSTFIX_DIR,
    show_default=True,
    help="Postfix configuration directory, as for postconf -c.",
)
_dovecot_option = click.option(
    "--dovecot-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_DOVECOT_CONFIG,
    show_default=True,
    help="Dovecot's configuration file.",
)


def _setup_sweep_timer(ctx: click.Context, directory: Path, *, dry_run: bool, undo: bool) -> None:
    """Write (or, with undo, remove) the sweep's units, and have systemd start the timer."""
    _load(ctx)  # a broken configuration would make every sweep fail: say so now
    config_path: Path | None = ctx.obj.get("config_path")
    systemctl = shutil.which("systemctl") if directory == sweeptimer.SYSTEMD_DIR else None
    if undo:
        plan = sweeptimer.plan_undo(directory, systemctl=systemctl)
        if not plan.files:
            click.echo(f"nothing to undo: no sweep timer of gpgfilter in {directory}")
            return
    else:
        # The program running now, else the one installed beside this Python (a
        # virtualenv's), else the one on PATH.
        candidates = [Path(sys.argv[0]), Path(sys.executable).parent / "gpgfilter"]
        found = shutil.which("gpgfilter")
        candidates += [Path(found)] if found else []
        usable = [c for c in candidates if c.name == "gpgfilter" and c.is_file()]
        if not usable:
            raise click.ClickException("cannot tell where the gpgfilter program is installed")
        program = str(usable[0].absolute())
        config = str(config_path.absolute()) if config_path else None
        plan = sweeptimer.plan_install(program, config, directory, systemctl=systemctl)
    for name in plan.files:
        click.echo(f"{'remove' if undo else 'write'} {directory / name}")
        if not undo and dry_run:
            click.echo(plan.files[name])
    for command in plan.commands:
        click.echo(f"run {shlex.join(command)}")
    if dry_run:
        click.echo("dry run: nothing was changed")
        return
    try:
        (sweeptimer.remove if undo else sweeptimer.install)(plan, run_command)
    except (SetupError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo("done" + ("" if undo else "; `gpgfilter setup --sweep-timer --undo` removes it"))


@main.command()
@config_option
@_postfix_dir_option
@_dovecot_option
@click.option("--dry-run", is_flag=True, help="Print every change and command; change nothing.")
@click.option("--undo", is_flag=True, help="Restore what an earlier setup changed.")
@click.option(
    "--route",
    type=click.Choice(["all", "enrolled"]),
    default=None,
    help="Route every message, or only those for addresses with a key, through the filter"
    " [default: route: in the configuration, else all].",
)
@click.option(
    "--sweep-timer",
    is_flag=True,
    help="Instead: install and start the mailbox sweep's systemd timer (docs/mailbox.md).",
)
@click.option(
    "--systemd-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=sweeptimer.SYSTEMD_DIR,
    show_default=True,
    help="Where --sweep-timer writes its units; systemctl is run only for the default.",
)
@click.pass_context
def setup(
    ctx: click.Context,
    postfix_dir: Path,
    dovecot_config: Path,
    dry_run: bool,
    undo: bool,
    route: str | None,
    sweep_timer: bool,
    systemd_dir: Path,
) -> None:
    """Wire gpgfilter into Postfix (and Dovecot's LMTP listener where needed).

    The mode (LMTP transport or content_filter) and the ports come from gpgfilter's
    configuration. Safe to run again: a second run changes nothing.
    """
    if sweep_timer:
        _setup_sweep_timer(ctx, systemd_dir, dry_run=dry_run, undo=undo)
        return
    config = _load(ctx, {"route": route})
    try:
        postconf = Postconf(postfix_dir)
        if undo:
            for line in setup_module.undo(
                config, postconf, dry_run=dry_run, dovecot_config=dovecot_config
            ):
                click.echo(line)
            if dry_run:
                click.echo("dry run: nothing was changed")
            return
        plan = setup_module.plan_setup(config, postconf, dovecot_config=dovecot_config)
        for note in plan.notes:
            click.echo(note)
        if not plan.changes:
            click.echo(f"nothing to change: gpgfilter is already wired in ({plan.mode} mode)")
            return
        for change in plan.changes:
            click.echo(f"change {change.describe()}")
        for command in plan.shown_commands:
            click.echo(f"run {shlex.join(command)}")
        if dry_run:
            click.echo("dry run: nothing was changed")
            return
        record, warnings = setup_module.apply_plan(
            plan, config, postconf, dovecot_config=dovecot_config
        )
    except SetupError as error:
        raise click.ClickException(str(error)) from None
    if route == "enrolled" and _load(ctx).route != "enrolled":
        warnings.append(
            "add `route: enrolled` to the configuration file, so that the filter and doctor"
            " know (the filter then refuses policy.no_key: defer at start)"
        )
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"done ({plan.mode} mode); `gpgfilter setup --undo` reverts it (record: {record})")


@main.command()
@config_option
@click.option(
    "--postfix-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Postfix configuration directory, as for postconf -c [default: /etc/postfix].",
)
@click.option("--no-postfix", is_flag=True, help="Skip the Postfix check (Postfix elsewhere).")
@click.option("--days", default=14, show_default=True, help="Warn of keys expiring this soon.")
@click.pass_context
def doctor(ctx: click.Context, postfix_dir: Path | None, no_postfix: bool, days: int) -> None:
    """Check every part of the mail path; one line each, with the fix. Exit status 1 on a fail."""
    if postfix_dir is None and not no_postfix:
        postfix_dir = DEFAULT_POSTFIX_DIR
    failed = False
    for check in run_checks(ctx.obj["config_path"], None if no_postfix else postfix_dir, days=days):
        click.echo(str(check))
        failed = failed or check.status == "fail"
    if failed:
        sys.exit(1)


@keys.command("notify-expiry")
@config_option
@click.pass_context
def notify_expiry(ctx: click.Context) -> None:
    """Mail owners whose key expires soon or has expired (each notice once; for cron)."""

    from gpgfilter.process import keyserver as service  # noqa: PLC0415

    config = _load(ctx)
    setup_logging(config.log_level)

    async def notify() -> int:
        store = _store(config, create=False)
        try:
            _, registry, mailer = service.build(config, store)
            try:
                return await registry.notify_expiry()
            finally:
                await mailer.close()
        finally:
            store.close()

    try:
        sent = asyncio.run(notify())
    except (ConfigError, StoreError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"sent {sent} expiry notice(s)")


from gpgfilter.process import mailbox_cli  # noqa: E402  (it adds to ``main``, defined above)

mailbox_cli.register(main, _load, config_option)
