"""``gpgfilter setup --sweep-timer``: the systemd timer that runs the mailbox sweep.

The units are written here, with this installation's program and configuration paths, rather
than copied from dist/ (which a wheel does not carry); tests/test_dist.py keeps the shipped
copies the same as what this writes for /usr/local/bin and /etc/gpgfilter.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from gpgfilter.ops.commands import Runner, SetupError

SYSTEMD_DIR = Path("/etc/systemd/system")
SERVICE = "gpgfilter-mailbox-sweep.service"
TIMER = "gpgfilter-mailbox-sweep.timer"
# What marks a unit file as ours: --undo removes nothing else.
_MARK = "# Written by gpgfilter setup --sweep-timer"

_SERVICE_TEXT = """\
# /etc/systemd/system/gpgfilter-mailbox-sweep.service
# Encrypts what mail clients stored over IMAP since the last run (Sent, archives, moved-in
# mail), and the whole mailbox of each address queued at enrolment; started by
# gpgfilter-mailbox-sweep.timer. docs/mailbox.md
[Unit]
Description=gpgfilter: encrypt mail stored in clear since the last sweep
Documentation=file:///usr/share/doc/gpgfilter/mailbox.md
After=dovecot.service

[Service]
Type=oneshot
# root: doveadm exec imap switches to each user's mail uid, as Dovecot's own processes do.
User=root
ExecStart={command}
Nice=10
IOSchedulingClass=idle
NoNewPrivileges=yes
PrivateTmp=yes
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
UMask=0077
"""

_TIMER_TEXT = """\
# /etc/systemd/system/gpgfilter-mailbox-sweep.timer
[Unit]
Description=gpgfilter: sweep mailboxes for mail stored in clear, every 15 minutes

[Timer]
OnBootSec=5min
OnUnitInactiveSec=15min
RandomizedDelaySec=60

[Install]
WantedBy=timers.target
"""


def units(program: str, config: str | None) -> dict[str, str]:
    """The two unit files' text for this program and configuration file."""
    command = [program, *(["--config", config] if config else [])]
    command += ["mailbox", "encrypt", "--all", "--since-last", "--queued"]
    return {
        SERVICE: _SERVICE_TEXT.format(command=shlex.join(command)),
        TIMER: _TIMER_TEXT,
    }


@dataclass(frozen=True, slots=True)
class TimerPlan:
    directory: Path
    files: dict[str, str]
    commands: list[list[str]]  # run after writing (none when systemd is not managing it)


def plan_install(
    program: str, config: str | None, directory: Path, *, systemctl: str | None
) -> TimerPlan:
    files = {name: f"{_MARK}\n{text}" for name, text in units(program, config).items()}
    commands = []
    if systemctl is not None:
        commands = [[systemctl, "daemon-reload"], [systemctl, "enable", "--now", TIMER]]
    return TimerPlan(directory, files, commands)


def plan_undo(directory: Path, *, systemctl: str | None) -> TimerPlan:
    """Only files that carry our mark are removed: an admin's own units stay."""
    files = {}
    for name in (SERVICE, TIMER):
        try:
            text = (directory / name).read_text()
        except FileNotFoundError:
            continue
        if text.startswith(_MARK):
            files[name] = text
    commands = []
    if systemctl is not None and files:
        commands = [[systemctl, "disable", "--now", TIMER], [systemctl, "daemon-reload"]]
    return TimerPlan(directory, files, commands)


def install(plan: TimerPlan, run: Runner) -> None:
    for name in plan.files:
        path = plan.directory / name
        if path.exists() and not path.read_text().startswith(_MARK):
            raise SetupError(f"{path} exists and was not written by gpgfilter: left alone")
    plan.directory.mkdir(parents=True, exist_ok=True)
    for name, text in plan.files.items():
        temporary = plan.directory / f".{name}.tmp"
        temporary.write_text(text)
        temporary.chmod(0o644)
        temporary.replace(plan.directory / name)
    _run_all(plan.commands, run)


def remove(plan: TimerPlan, run: Runner) -> None:
    # Stop the timer first: it could otherwise start the service between the two steps.
    _run_all(plan.commands[:1], run)
    for name in plan.files:
        (plan.directory / name).unlink(missing_ok=True)
    _run_all(plan.commands[1:], run)


def _run_all(commands: list[list[str]], run: Runner) -> None:
    for command in commands:
        done = run(command)
        if done.returncode != 0:
            raise SetupError(f"{shlex.join(command)} failed: {done.stderr.strip()[:500]}")
