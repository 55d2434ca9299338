"""Postfix as setup and doctor see it: its configuration through ``postconf`` (so Postfix
checks the syntax and nothing edits its files by string manipulation), and the parameters
that route mail through the filter in either mode."""

from __future__ import annotations

import shlex
from pathlib import Path

from gpgfilter.ops.commands import Runner, SetupError, run_command
from gpgfilter.process.config import Config, Endpoint

DEFAULT_POSTFIX_DIR = Path("/etc/postfix")


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
        "content_filter": content_filter(listen),
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


def content_filter(listen: Endpoint) -> str:
    """The ``content_filter`` value that sends mail to the filter listening on ``listen``
    (setup writes it, doctor expects it)."""
    return f"gpgfilter:[{listen.host}]:{listen.port}"
