"""The ``gpgfilter`` command: run the filter, manage the key registry."""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from gpgfilter.openpgp.engine import EngineError
from gpgfilter.ops import setup as setup_module
from gpgfilter.ops.commands import SetupError
from gpgfilter.ops.doctor import run_checks
from gpgfilter.ops.dovecot import DEFAULT_DOVECOT_CONFIG
from gpgfilter.ops.postfix import DEFAULT_POSTFIX_DIR, Postconf
from gpgfilter.process.config import Config, ConfigError, load
from gpgfilter.process.service import run
from keystore.logsafe import setup_logging
from keystore.storage.open import open_store
from keystore.store import KeyStore, KeyWasRevoked, StoreError, stored_state
from keystore.validate import KeyRejected, KeyRevoked, merge_key, validate_key


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


@keys.command("import")
@config_option
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--address", help="Bind the key to this address, whatever its user IDs say.")
@click.option("--add", is_flag=True, help="Add to the address's keys instead of replacing them.")
@click.pass_context
def import_keys(
    ctx: click.Context, files: tuple[Path, ...], address: str | None, add: bool
) -> None:
    """Validate public keys and register them for their addresses."""
    config = _load(ctx)
    setup_logging("warning")
    store = _store(config, create=True)
    failed = 0
    for path in files:
        try:
            data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
            validated = validate_key(data, address=address, gpg_binary=config.gpg.binary)
        except OSError as error:
            click.echo(f"{path}: cannot read: {error.strerror}", err=True)
            failed += 1
            continue
        except KeyRevoked as revoked:
            try:
                holders = store.revoke(revoked.fingerprint)
            except StoreError as error:
                raise click.ClickException(str(error)) from None
            if holders:
                click.echo(
                    f"{path}: {revoked.fingerprint} is revoked: mail for its {holders} address(es)"
                    " is held (policy.unusable_key) until a new key is registered"
                )
                continue
            click.echo(f"{path}: refused: {revoked}", err=True)
            failed += 1
            continue
        except KeyRejected as error:
            click.echo(f"{path}: refused: {error}", err=True)
            failed += 1
            continue
        try:
            key = validated.key
            stored = store.key(key.fingerprint)
            if stored is not None:
                # An update of a registered key is merged: a stored key only moves forward.
                if stored.revoked:
                    click.echo(f"{path}: {key.fingerprint} is revoked: unchanged, mail stays held")
                    continue
                key = merge_key(stored, data, address=address, gpg_binary=config.gpg.binary).key
            for address_bound in validated.addresses:
                store.bind(address_bound, key, replace=not add, expected=stored_state(stored))
                stored = key
        except KeyWasRevoked:
            click.echo(
                f"{path}: refused: {key.fingerprint} was revoked, and a revocation is forever:"
                " import a new key",
                err=True,
            )
            failed += 1
            continue
        except KeyRejected as error:
            click.echo(f"{path}: refused: {error}", err=True)
            failed += 1
            continue
        except StoreError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"{path}: {key.fingerprint} registered for {', '.join(validated.addresses)}")
    store.close()
    if failed:
        sys.exit(1)


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
    wanted = target.replace(" ", "")
    try:
        revoked = [
            b
            for b in store.bindings()
            if b.key.revoked
            and (b.address == wanted.lower() or b.key.fingerprint == wanted.upper())
        ]
        if revoked and not revoked_too:
            raise click.ClickException(
                f"{revoked[0].key.fingerprint} is revoked and keeps mail for"
                f" {revoked[0].address} held; register a new key instead, or remove it"
                " with --revoked-too"
            )
        removed = store.remove(wanted)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    store.close()
    if not removed:
        raise click.ClickException(f"nothing registered for {target}")
    click.echo(f"removed {removed} binding(s)")


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
@click.pass_context
def setup(
    ctx: click.Context,
    postfix_dir: Path,
    dovecot_config: Path,
    dry_run: bool,
    undo: bool,
    route: str | None,
) -> None:
    """Wire gpgfilter into Postfix (and Dovecot's LMTP listener where needed).

    The mode (LMTP transport or content_filter) and the ports come from gpgfilter's
    configuration. Safe to run again: a second run changes nothing.
    """
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
    import asyncio  # noqa: PLC0415

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
