"""``gpgfilter mailbox``: encrypting mail already stored in Dovecot (docs/mailbox.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable

import click

from gpgfilter.mailbox.dovecot import MailboxError
from gpgfilter.mailbox.queue import EnrolmentQueue
from gpgfilter.mailbox.replace import StepHook
from gpgfilter.mailbox.run import MailboxRun, RunSettings, UserReport
from gpgfilter.openpgp.engine import EngineError
from gpgfilter.openpgp.factory import make_engine
from gpgfilter.process.config import Config
from keystore.logsafe import setup_logging
from keystore.storage.open import open_store
from keystore.store import StoreError

log = logging.getLogger("gpgfilter.mailbox")

#: Set by the crash tests only (they stop the real process at a step); None in use.
STEP_HOOK: StepHook | None = None


def settings_from(
    config: Config, *, dry_run: bool, since_last: bool, throttle: float | None
) -> RunSettings:
    section = config.mailbox
    return RunSettings(
        doveadm=section.doveadm,
        dovecot_config=str(section.dovecot_config) if section.dovecot_config else None,
        skip_folders=section.skip_folders,
        throttle=section.throttle if throttle is None else throttle,
        timeout=config.gpg.timeout,
        dry_run=dry_run,
        since_last=since_last,
        header_protection=config.policy.header_protection,
    )


def encrypt_mailboxes(
    config: Config,
    users: list[str] | None,
    settings: RunSettings,
    *,
    echo: Callable[[str], None],
    terminal: bool,
    queued: bool = False,
) -> list[UserReport]:
    """Run over ``users`` (None: every address with a key); one report per user.

    ``queued``: first the addresses queued at enrolment, each over its whole mailbox (whatever
    ``since_last`` says: all its mail predates the key), each taken off the queue once done.
    """
    store = open_store(config.keystore, config.keystore_path, create=False)
    try:
        if users is None:
            users = sorted({b.address for b in store.bindings()})
        # Its own state: the command runs as root (doveadm), and gpg homes it made under the
        # filter's would no longer be writable by the filter's user.
        state = config.data_dir / "mailbox"
        engine = make_engine(config.gpg, home=state / "gnupg")

        def make(settings: RunSettings) -> MailboxRun:
            return MailboxRun(
                data_dir=state,
                engine=engine,
                keys_for=store.keys_for,
                settings=settings,
                step=STEP_HOOK,
            )

        reports: list[UserReport] = []
        if queued:
            queue = EnrolmentQueue.under(config.data_dir)
            first = queue.addresses()
            whole = make(dataclasses.replace(settings, since_last=False))
            for report in asyncio.run(_all(whole, first, echo=echo, terminal=terminal)):
                reports.append(report)
                if not settings.dry_run and _finished(report):
                    queue.done(report.user)
            users = [u for u in users if u not in first]
        if users:
            reports += asyncio.run(_all(make(settings), users, echo=echo, terminal=terminal))
        return reports
    finally:
        store.close()


def _finished(report: UserReport) -> bool:
    """Whether a queued address is done with: a run without failure, or one that cannot
    start for want of a key (the entry would never go; a new enrolment queues it again)."""
    if report.skipped is not None:
        return report.skipped.startswith("no ")
    return report.error is None and not report.total("failed")


async def _all(
    run: MailboxRun, users: list[str], *, echo: Callable[[str], None], terminal: bool
) -> list[UserReport]:
    reports = []
    for user in users:
        if terminal:
            with click.progressbar(length=1, label=user, file=sys.stderr) as bar:

                def progress(done: int, total: int) -> None:
                    bar.length = max(total, 1)
                    bar.update(done - bar.pos)

                report = await run.user(user, progress=progress)
        else:
            report = await run.user(user)
        reports.append(report)
        _report(report, dry_run=run.settings.dry_run, echo=echo)
    return reports


def _report(report: UserReport, *, dry_run: bool, echo: Callable[[str], None]) -> None:
    if report.skipped:
        echo(f"{report.user}: skipped: {report.skipped}")
        return
    if dry_run:
        for folder in report.folders:
            echo(
                f"{report.user}\t{folder.folder}\tto encrypt {folder.encrypted}"
                f"\tto finish {folder.finished}\talready encrypted {folder.already}"
            )
    echo(
        f"{report.user}: {'would encrypt' if dry_run else 'encrypted'} {report.total('encrypted')}"
        f", finished {report.total('finished')} left half done"
        f", already encrypted {report.total('already')}"
        f", gone meanwhile {report.total('vanished')}, failed {report.total('failed')}"
        f" in {len(report.folders)} folder(s) ({report.seconds:.1f} s)"
        + (
            f"; left in clear: {', '.join(report.skipped_folders)}"
            if report.skipped_folders
            else ""
        )
    )
    for folder in report.folders:
        for note in folder.notes:
            echo(f"{report.user}: {folder.folder}: {note}")
    if report.error:
        echo(f"{report.user}: stopped: {report.error}; run again to go on")


def register(
    main: click.Group,
    load: Callable[[click.Context], Config],
    config_option: Callable[[Callable[..., None]], Callable[..., None]],
) -> None:
    """Add the ``mailbox`` group to the command line."""

    @main.group()
    def mailbox() -> None:
        """Encrypt mail already stored in users' mailboxes."""

    @mailbox.command("encrypt")
    @config_option
    @click.argument("addresses", nargs=-1)
    @click.option("--all", "everyone", is_flag=True, help="Every address with a registered key.")
    @click.option("--dry-run", is_flag=True, help="Count what would change, per user and folder.")
    @click.option(
        "--since-last",
        is_flag=True,
        help="Only what was stored since the last run (the sweep, for a timer).",
    )
    @click.option(
        "--queued",
        is_flag=True,
        help="First the whole mailbox of each address queued at enrolment"
        " (mailbox.encrypt_on_enrolment).",
    )
    @click.option("--throttle", type=float, help="Messages per second at most (0: no limit).")
    @click.pass_context
    def encrypt(
        ctx: click.Context,
        addresses: tuple[str, ...],
        everyone: bool,
        dry_run: bool,
        since_last: bool,
        queued: bool,
        throttle: float | None,
    ) -> None:
        """Replace each clear message in the users' mailboxes by its encrypted copy."""
        if (everyone and addresses) or not (everyone or addresses or queued):
            raise click.UsageError("name addresses, or --all (not both), or --queued")
        if throttle is not None and throttle < 0:
            raise click.UsageError("--throttle must be 0 (no limit) or positive")
        config = load(ctx)
        setup_logging(config.log_level)
        settings = settings_from(config, dry_run=dry_run, since_last=since_last, throttle=throttle)
        terminal = sys.stderr.isatty()
        try:
            reports = encrypt_mailboxes(
                config,
                None if everyone else [a.strip().lower() for a in addresses],
                settings,
                echo=click.echo if terminal or dry_run else log.info,
                terminal=terminal,
                queued=queued,
            )
        except (StoreError, EngineError, MailboxError, OSError) as error:
            raise click.ClickException(str(error)) from None
        changed = sum(r.total("encrypted") + r.total("finished") for r in reports)
        failed = sum(r.total("failed") + bool(r.error) for r in reports)
        if not dry_run and not changed and not failed:
            click.echo("nothing to do: no message in clear in these mailboxes")
        if failed:
            sys.exit(1)
