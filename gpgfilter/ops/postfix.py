"""Postfix as setup and doctor see it: its configuration through ``postconf`` (so Postfix
checks the syntax and nothing edits its files by string manipulation), and the parameters
that route mail through the filter in either mode."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import quote, urlencode

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

    def expanded(self, name: str) -> str:
        """The value with ``$parameter`` references expanded, as Postfix uses it."""
        return self._query("-x", "-h", name).strip()

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


# -- routing only enrolled recipients through the filter --------------------------------------

ROUTE_MAP = "gpgfilter-route.cf"


def route_table(postconf: Postconf, config: Config) -> str:
    """The ``transport_maps`` entry that reads the key store. ``proxy:`` lets proxymap (not
    chrooted) hold the store open for every Postfix process, so a chrooted trivial-rewrite
    never needs the store's path inside its jail."""
    kind = "pgsql" if config.keystore.backend == "postgresql" else "sqlite"
    return f"proxy:{kind}:{postconf.config_dir / ROUTE_MAP}"


def route_query(config: Config) -> str:
    """The lookup: the filter's transport for an address with any binding, nothing otherwise.

    Any binding counts, a revoked or expired key's too: the filter holds that mail (4xx),
    which it could not if Postfix sent it past. Postfix looks up ``user+ext@domain``, then
    ``user@domain`` (with ``recipient_delimiter``); ``lower()`` matches how keys are bound
    (lower case), whatever case the sender used. ``LIMIT 1``: an address with two keys must
    still give one answer, or Postfix would read two joined by a comma as the transport.
    """
    target = lmtp_parameters(config)["virtual_transport"]
    if any(char in target for char in "'%\\\n"):
        raise SetupError(f"listen: {config.listen} cannot be written into an SQL query")
    # Postfix's template, not ours to run: Postfix substitutes %s with SQL quoting itself.
    return f"SELECT '{target}' FROM bindings WHERE address = lower('%s') LIMIT 1"  # noqa: S608


def route_map_text(config: Config, domains: str) -> tuple[str, int]:
    """The map file for ``route_table`` and the mode to write it with (0640 when it holds a
    database password: readable by root and Postfix only)."""
    lines = [
        "# Written by `gpgfilter setup` (route: enrolled); `gpgfilter setup --undo` removes it.",
        "# Answers gpgfilter's transport for addresses with a key in the key store.",
    ]
    mode = 0o644
    if config.keystore.backend == "postgresql":
        lines += _pgsql_lines(config.keystore.dsn or "")
        if any(line.startswith("password =") for line in lines):
            mode = 0o640
    else:
        lines.append(f"dbpath = {config.keystore_path}")
    lines.append(f"query = {route_query(config)}")
    # Only addresses of the mailbox domains are looked up: mail leaving the server never waits
    # for the store, and addresses of local(8) domains (aliases, .forward) are never routed.
    lines.append(f"domain = {domains}")
    return "\n".join(lines) + "\n", mode


def _pgsql_lines(dsn: str) -> list[str]:
    """The store's connection as Postfix's pgsql client takes it: one ``postgresql://`` URI
    carrying every libpq parameter of ``keystore.dsn`` (host, port, user, password, sslmode).
    """
    import psycopg  # noqa: PLC0415  (PostgreSQL only)
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:  # its message may quote the DSN, password included
        raise SetupError("keystore.dsn is not a valid PostgreSQL connection string") from None
    fields = {name: str(value) for name, value in params.items() if value is not None}
    password = fields.pop("password", "")
    # Postfix names the host in its log when a connection fails: the password stays out of it.
    lines = [f"hosts = postgresql:///?{urlencode(fields, quote_via=quote)}"]
    if fields.get("user"):
        lines.append(f"user = {fields['user']}")
    if fields.get("dbname"):
        lines.append(f"dbname = {fields['dbname']}")
    if password:
        lines.append(f"password = {password}")
    return lines


def route_probe(postconf: Postconf, config: Config, domains: str, owner: str) -> list[str]:
    """``postmap -q`` on the table as Postfix's user (``mail_owner``), who must read the store:
    exit status 0 or 1 (found or not) is an answer, anything else or a warning is not."""
    table = route_table(postconf, config).removeprefix("proxy:")
    first = domains.replace(",", " ").split()[0] if domains.strip() else "invalid"
    probe = ["postmap", "-c", str(postconf.config_dir), "-q", f"gpgfilter-probe@{first}", table]
    if os.geteuid() == 0:
        probe = ["setpriv", f"--reuid={owner}", f"--regid={owner}", "--init-groups", *probe]
    return probe


def probe_failed(returncode: int, stderr: str) -> bool:
    return returncode not in (0, 1) or "fatal" in stderr or "warning" in stderr
